"""The codes each linear starts from, before any GSQ: one handler per way of getting them.

Every handler is called as ``handler(weight, hess, prefix) -> QuantizedWeight`` with ``weight``
f32 ``[N, K]`` on the run's device, ``hess`` its input Hessian f32 ``[K, K]`` (None when the
handler's ``needs_hessian`` is False) and ``prefix`` the linear's checkpoint name. The block driver
(quantize/pipeline.py, quantize/moe_block.py) asks :func:`start_quantizer` for the run's handler
once and never branches on the method itself; GSQ then refines what the handler returns
(quantize/gsq.py).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from gsq_format.format import normalize_bits
from gsq_format.qtypes import QuantizedWeight
from quantize.gptq import gptq_quantize, refit_scales
from quantize.gsq import refine_weight_space, ternary_random_options
from quantize.rtn import rtn_quantize


@dataclass(frozen=True)
class RTNStart:
    """Round to nearest on the group scale the scale search picks (quantize/rtn.py)."""

    bits: float
    group_size: int
    scale_search: str
    needs_hessian = False

    def __call__(self, weight: torch.Tensor, hess, prefix: str) -> QuantizedWeight:
        return rtn_quantize(weight, self.bits, self.group_size, search=self.scale_search)


@dataclass(frozen=True)
class GPTQStart:
    """GPTQ on the layer's Hessian (quantize/gptq.py), then, with ``refit``, each row's scales
    re-fitted to its codes by least squares on the same Hessian."""

    bits: float
    group_size: int
    damp: float
    act_order: bool
    scale_search: str
    refit: bool
    needs_hessian = True

    def __call__(self, weight: torch.Tensor, hess: torch.Tensor, prefix: str) -> QuantizedWeight:
        q = gptq_quantize(weight, hess, self.bits, self.group_size, damp=self.damp, act_order=self.act_order,
                          scale_search=self.scale_search)
        return refit_scales(weight, hess, q, damp=self.damp) if self.refit else q


@dataclass(frozen=True)
class CheckpointStart:
    """An existing checkpoint's codes and scales (``gsq-quantize --init``), by checkpoint name."""

    codes: dict  # prefix -> QuantizedWeight, on the run's device
    needs_hessian = False

    def __call__(self, weight: torch.Tensor, hess, prefix: str) -> QuantizedWeight:
        return self.codes[prefix]


@dataclass(frozen=True)
class TernaryRandomStart:
    """The GSQ reference's ternary init (``--gsq-ternary-init random``): GSQ from logits without a
    prior on the Hessian-weighted weight error. The reference starts its scales at zero (its group
    scales come from the GPTQ loop it skips for ternary); ours start at RTN's, whose codes the
    strength-0 logits ignore."""

    rtn: RTNStart
    options: object  # GSQOptions of the run
    steps: int
    seed: int
    damp: float
    needs_hessian = True

    def __call__(self, weight: torch.Tensor, hess: torch.Tensor, prefix: str) -> QuantizedWeight:
        seed = self.seed * 1_000_003 + zlib.crc32(prefix.encode())
        q, _ = refine_weight_space(weight, hess, self.rtn(weight, None, prefix),
                                   ternary_random_options(self.options, self.steps), seed, self.damp)
        return q


def start_quantizer(settings, init: dict | None = None):
    """The handler of a run's settings (quantize.settings.QuantizeSettings): ``init``'s codes when
    given (--init), RTN for ``--method rtn``, the random ternary init for ``gsq --bits 1.58
    --gsq-ternary-init random``, else GPTQ."""
    s = settings
    st = s.start
    rtn = RTNStart(s.bits, s.group_size, st.scale_search)
    if init is not None:
        return CheckpointStart(init)
    if s.method == "rtn":
        return rtn
    if s.method == "gsq" and s.gsq.ternary_init == "random" and normalize_bits(s.bits) == 1.58:
        return TernaryRandomStart(rtn, s.gsq.options, s.gsq.ternary_init_steps, s.seed, st.damp)
    return GPTQStart(s.bits, s.group_size, st.damp, st.act_order, st.scale_search, st.refit_scales)


def few_tokens_quantizer(settings, start):
    """For an MoE expert routed too few calibration tokens for a Hessian (``moe.min_tokens``):
    RTN, unless every code comes from a checkpoint (--init)."""
    if isinstance(start, CheckpointStart):
        return start
    return RTNStart(settings.bits, settings.group_size, settings.start.scale_search)

"""GSQ: Gumbel-Softmax grid assignment + scale learning for one transformer block.

Method (arXiv 2604.18556, checked against the public reference code IST-DASLab/GSQ):

* every quantized weight gets a small categorical distribution over grid values, held as logits;
  - 2-bit:   full grid {-2,-1,0,1}, 4 logits per weight;
  - 3-bit:   "local shift": 5 logits per weight over q0 + {-2,-1,0,+1,+2} (q0 = GPTQ code),
             shifts that leave [-4, 3] are masked to -inf, so no code can ever leave int3;
  - ternary: {-1,0,1} as sign * nonzero, one sign logit and one mask logit per weight,
             each a binary (2-class) Gumbel-softmax, i.e. a sigmoid with logistic noise;
* logit init centred on the GPTQ code: logits_v = std * (N(0,1) + alpha * (-(q-v)^2/2 - mean_v));
* soft forward: p = softmax((kappa * logits + g) / tau), g ~ Gumbel(0,1); W_soft = s * sum_v p_v v;
* tau linear 2 -> 0.05 and kappa linear 100 -> 500 over all optimisation steps of the block;
* loss = MSE(block(inputs; W_soft), targets), Lion betas (0.9, 0.95), logits lr 1e-4 wd 1.0,
  scales lr 5e-5 wd 0, cosine decay to 0.1x, no warm-up;
* hardening: argmax of the masked logits (no noise), learned scales kept.

The Gumbel noise is not kept for backward: `SoftWeightFunction` remembers the generator state
and regenerates the same noise in backward (as the reference does with the CUDA RNG state);
`GSQOptions.store_noise=True` keeps it instead (for the memory comparison and the tests).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from gsq_format.qtypes import QuantizedWeight
from gsq_format.format import FormatError, grid_range, normalize_bits

_EPS = 1e-10
LOCAL_SHIFTS = (-2, -1, 0, 1, 2)


# ----------------------------------------------------------------------------- options


@dataclass
class GSQOptions:
    """Hyper-parameters of one GSQ block refinement. The defaults are the method's constants as the
    reference code has them (schedules, Lion, init); the `paper` preset adds its shipped configs'
    learning rates, micro-batch and logits dtype (PRESETS)."""

    epochs: int = 10              # passes over the block's calibration inputs (paper: 20)
    batch_size: int = 64          # sequences per Lion step (the reference's 64)
    micro_batch_size: int = 16    # sequences per forward/backward; gradients accumulate to a step
    lr_logits: float = 1e-4
    lr_scales: float = 5e-5
    wd_logits: float = 1.0
    lion_betas: tuple[float, float] = (0.9, 0.95)
    min_lr_ratio: float = 0.1     # cosine decay to 0.1 x lr
    tau_start: float = 2.0
    tau_end: float = 0.05
    kappa_start: float = 100.0
    kappa_end: float = 500.0
    init_std: float = 0.01
    init_noise: float = 1.0       # weight of the N(0,1) term of the logit init (the reference's 1;
                                  # 0 starts every weight on its GPTQ code, not the reference's)
    alpha: float | None = None    # None -> 6 (3 for ternary_style "ours")
    store_noise: bool = False     # True: keep the Gumbel noise for backward (more memory)
    log_every: int = 1            # log the soft MSE every n steps
    keep_best: bool = True        # return the init if the hardened block is worse (see refine_block)
    logits_dtype: str = "float32"  # or "bfloat16": half the logits' memory (and Lion's state)
    ternary_style: str = "reference"  # the GSQ reference's ternary logits, or "ours" (GumbelGridLinear)
    token_norm_cap: float | None = None  # None: plain MSE (the reference); C: see token_weights
    compute_dtype: str = "float32"  # the block's training forward/backward: "float32", "bfloat16" (autocast), or
                                    # "auto": bfloat16 where the device multiplies bf16 natively (CUDA, AVX-512-BF16, AMX)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 when training should run under autocast on `device`, else None (float32)."""
        if self.compute_dtype == "float32":
            return None
        if self.compute_dtype == "bfloat16":
            return torch.bfloat16
        if self.compute_dtype != "auto":
            raise FormatError(f"GSQ compute_dtype must be float32, bfloat16 or auto, got {self.compute_dtype!r}")
        native = device.type == "cuda" or (device.type == "cpu" and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
        return torch.bfloat16 if native else None

    def strength(self, bits) -> float:
        if self.alpha is not None:
            return self.alpha
        return 3.0 if normalize_bits(bits) == 1.58 and self.ternary_style == "ours" else 6.0

    def logit_group(self, bits) -> tuple[float, float]:
        """(lr, weight decay) of the logits. The reference's ternary logits enter its sigmoids as
        2*kappa*l where ours enter as kappa*p: with p = 2l, its Lion steps on l are ours at twice
        the lr and half the weight decay (p*(1 - lr'*wd') = 2l*(1 - lr*wd))."""
        if normalize_bits(bits) == 1.58 and self.ternary_style == "reference":
            return 2.0 * self.lr_logits, 0.5 * self.wd_logits
        return self.lr_logits, self.wd_logits


# The `paper` preset is the reference's shipped configs (IST-DASLab/GSQ configs/*_gptq_gsq.yaml):
# one Lion step per 64 sequences in micro-batches of 2 (a fresh Gumbel draw each), 10 epochs --
# 640 steps per block over its 4096 calibration sequences of 4096 tokens -- logits lr 2e-4, scales
# lr 1e-4, bf16 logits. (Its group size, 128, is gsq-quantize's --group-size, not a GSQ option.)
# The `fast` preset: SmolLM2-135M on 2 CPU cores, which affords ~64 steps per block. Lion moves a logit
# by about lr per step, so at lr 1e-4 64 steps barely cross the init's logit gaps (~0.03); the
# preset takes the most steps it can (microbatch 1) and a 3x logits lr. Measured with
# benchmarks/gsq_block_sweep.py (2-bit MLP, blocks 0-2 of SmolLM2, 32 x 256 calibration tokens,
# block-output MSE on held-out text relative to GPTQ, geometric mean;
# benchmarks/results/gsq_block_sweep_*.log):
#   batch 4, lr 3e-3 / scales 2e-4 (the previous preset): x0.73, and x1.19 with the logits frozen
#     (the scale lr alone made blocks worse than GPTQ);
#   batch 1, lr 3e-3: x1.02 (steps too large);  batch 1, lr 1e-3 / 1e-4: x0.67;
#   batch 1, lr 3e-4 / scales 5e-5 (this preset): x0.58, and better than GPTQ on every block;
#   same with 4 epochs: x0.51, at twice the time.
# The scales' lr hardly matters at this step count (5e-5, 2e-5, 0 within 1 %).
# The `steps256` preset: the regime where GSQ beats GPTQ here, per block and on the whole model
# (docs/results/gsq-regime.md): 256 Lion steps of 4 sequences each (8 epochs over 128 calibration
# sequences: pass --gsq-nsamples 128), the reference's lr, the init without its N(0,1) term (which
# alone costs 1.29x the init's block error at 2 bits), bf16 matmuls where the CPU has them.
# SmolLM2-135M-Instruct MLP, whole model: gap to bf16 0.44x GPTQ's at 2 bits, 0.80x at 3. The main
# job's default: a 3-bit G=32 MLP block's GSQ takes 27.6 s on an idle 2-core AVX-512 EPYC, 2 threads
# (93 ms a step + 3.8 s of init and scoring; benchmarks/gsq_step_speed.py).
PRESETS: dict[str, dict] = {
    "paper": {"micro_batch_size": 2, "lr_logits": 2e-4, "lr_scales": 1e-4, "logits_dtype": "bfloat16"},
    "fast": {"epochs": 2, "batch_size": 1, "micro_batch_size": 1, "lr_logits": 3e-4, "lr_scales": 5e-5},
    "steps256": {"epochs": 8, "batch_size": 4, "micro_batch_size": 4, "lr_logits": 2e-4, "lr_scales": 1e-4,
                 "init_noise": 0.0, "compute_dtype": "auto"},
}


def options_from_spec(spec: str) -> GSQOptions:
    """GSQOptions from ``"PRESET[,FIELD=VALUE...]"`` (e.g. ``"fast,epochs=4,lr_logits=2e-4"``): a
    preset with any GSQOptions field overridden; FormatError for an unknown preset or field."""
    preset, *overrides = spec.split(",")
    if preset not in PRESETS:
        raise FormatError(f"unknown GSQ preset {preset!r} in {spec!r}; choose from {sorted(PRESETS)}")
    kw = dict(PRESETS[preset])
    types = {f.name: f.type for f in fields(GSQOptions)}
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in types or key == "lion_betas":
            raise FormatError(f"unknown or non-scalar GSQ option {key!r} in {spec!r}")
        kind = types[key].split(" |")[0]
        try:
            kw[key] = {"int": int, "float": float, "str": str}.get(kind, lambda v: v in ("1", "true", "True"))(value)
        except ValueError:
            raise FormatError(f"GSQ option {key}={value!r} in {spec!r} is not a {kind}") from None
    return GSQOptions(**kw)


# ----------------------------------------------------------------------------- schedules


def linear_schedule(start: float, end: float, step: int, total_steps: int) -> float:
    """Value at `step` in [0, total_steps): start at step 0, end at the last step."""
    if total_steps <= 1:
        return end
    return start + (end - start) * step / (total_steps - 1)


def cosine_lr_factor(step: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: 1 at step 0, cosine down to `min_ratio` at the last step, no warm-up."""
    if total_steps <= 1:
        return 1.0
    t = step / (total_steps - 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------- soft weight


def _gumbel(shape, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=generator.device)
    return -torch.log(-torch.log(u + _EPS) + _EPS)


def _logistic(shape, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=generator.device)
    return torch.log(u + _EPS) - torch.log1p(-u + _EPS)


def sample_noise(kind: str, shape, generator: torch.Generator) -> torch.Tensor:
    """Gumbel(0,1) noise for the categorical grids, Logistic(0,1) for the ternary binary logits.
    (The difference of two independent Gumbels is Logistic, so both are the same Gumbel-softmax.)"""
    return _logistic(shape, generator) if kind == "ternary" else _gumbel(shape, generator)


def _load_cpu_ext():
    if os.environ.get("GSQ_SOFT_KERNEL", "auto") == "torch":   # the torch-only path, for comparison
        return None
    try:
        from quantize import _C  # csrc/quantize/{gsq_soft,lion}.cpp, built by setup.py
    except ImportError:
        return None
    return _C


# On the CPU the noise comes from a counter-based generator (csrc/quantize/gsq_soft.cpp), 18x
# faster than torch.rand + two logs and regenerated for backward from a 63-bit key alone, and
# the soft weight and its gradient are computed by fused kernels that draw that same noise
# inline. Elsewhere (CUDA), or without the extension: `generator` and the torch formulas.
_CPU_EXT = _load_cpu_ext()
_KIND_ID = {"full": 0, "shift": 1, "ternary": 2}


class NoiseSource:
    """Draws the soft weight's noise for one forward and redraws the same noise for backward."""

    def __init__(self, kind: str, shape, generator: torch.Generator):
        self.kind, self.shape = kind, tuple(shape)
        self.fast = _CPU_EXT is not None and generator.device.type == "cpu"
        if self.fast:   # the key comes from `generator`, so a run stays a function of its seed
            self.key = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device="cpu"))
        else:
            self.state, self.device = generator.get_state(), generator.device

    def draw(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise; `generator` is advanced past it on the first (forward) draw."""
        if self.fast:
            return _CPU_EXT.noise(list(self.shape), self.key, self.kind == "ternary")
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.set_state(self.state)
        return sample_noise(self.kind, self.shape, generator)


def soft_codes(kind: str, logits: torch.Tensor, levels: torch.Tensor | None,
               mask: torch.Tensor | None, noise: torch.Tensor, kappa: float, tau: float) -> torch.Tensor:
    """Expected code E_p[v] per weight, float32 ``[N, K]``.

    logits: float32 ``[V, N, K]`` (categorical) or ``[2, N, K]`` (ternary: sign, nonzero).
    levels: float32 broadcastable to ``[V, N, K]``: the grid value of each logit.
    mask:   bool ``[V, N, K]``, True where the level is off the grid (3-bit local shift), or None.
    noise:  float32 like ``logits``.
    """
    z = (kappa * logits.float() + noise) / tau   # bf16 logits: the arithmetic stays float32
    if kind == "ternary":
        sign = torch.tanh(0.5 * z[0])          # = 2*sigmoid(z)-1 = E[+-1]
        nonzero = torch.sigmoid(z[1])
        return sign * nonzero
    if mask is not None:
        z = z.masked_fill(mask, float("-inf"))
    p = torch.softmax(z, dim=0)
    return (p * levels).sum(dim=0)


def soft_weight(kind, logits, scales, levels, mask, noise, kappa, tau, group_size) -> torch.Tensor:
    """W_soft float32 ``[N, K]`` = scales[n, k // G] * E_p[v]; scales float32 ``[N, K // G]``."""
    codes = soft_codes(kind, logits, levels, mask, noise, kappa, tau)
    return codes * scales.repeat_interleave(group_size, dim=1)


class SoftWeightFunction(torch.autograd.Function):
    """W_soft with the noise regenerated in backward instead of stored.

    forward draws noise through a NoiseSource (a counter-based key on the CPU, the generator's
    saved state elsewhere); backward redraws the identical noise from it and differentiates
    `soft_weight` again (recomputation: only logits and scales, which are parameters anyway, are kept).
    With `store_noise` the noise tensor itself is saved (the memory-hungry variant).
    On the CPU with float32 logits, both directions run the fused kernels of gsq_soft.cpp on
    the same noise instead of the torch formulas.
    `cfg` = (kind, levels, mask, kappa, tau, group_size, q0 int8 [N, K] or None, (qmin, qmax)).
    """

    @staticmethod
    def forward(ctx, logits, scales, generator, cfg, store_noise):
        kind, levels, mask, kappa, tau, group_size, q0, (qmin, qmax) = cfg
        source = NoiseSource(kind, logits.shape, generator)
        ctx.cfg = cfg
        ctx.fused = source.fast and not store_noise and logits.dtype == torch.float32
        if ctx.fused:
            ctx.save_for_backward(logits, scales)
            ctx.noise_source = source
            q = q0 if q0 is not None else torch.empty(0, dtype=torch.int8)
            ctx.q0 = q
            w, _ = _CPU_EXT.soft_forward(logits.contiguous(), scales.contiguous(), q, _KIND_ID[kind], qmin, qmax,
                                         kappa, tau, group_size, source.key)
            return w
        noise = source.draw(generator)
        if store_noise:
            ctx.save_for_backward(logits, scales, noise)
        else:
            ctx.save_for_backward(logits, scales)
            ctx.noise_source = source
        ctx.store_noise = store_noise
        return soft_weight(kind, logits, scales, levels, mask, noise, kappa, tau, group_size)

    @staticmethod
    def backward(ctx, grad_w):
        kind, levels, mask, kappa, tau, group_size, _, (qmin, qmax) = ctx.cfg
        if ctx.fused:
            logits, scales = ctx.saved_tensors
            g_logits, codes = _CPU_EXT.soft_backward(grad_w.float().contiguous(), logits.contiguous(),
                                                     scales.contiguous(), ctx.q0, _KIND_ID[kind], qmin, qmax,
                                                     kappa, tau, group_size, ctx.noise_source.key)
            n, k = codes.shape
            g_scales = (grad_w * codes).view(n, k // group_size, group_size).sum(-1)
            return g_logits, g_scales, None, None, None
        if ctx.store_noise:
            logits, scales, noise = ctx.saved_tensors
        else:
            logits, scales = ctx.saved_tensors
            noise = ctx.noise_source.draw()
        with torch.enable_grad():
            lg = logits.detach().requires_grad_(True)
            sc = scales.detach().requires_grad_(True)
            w = soft_weight(kind, lg, sc, levels, mask, noise, kappa, tau, group_size)
            g_logits, g_scales = torch.autograd.grad(w, (lg, sc), grad_w)
        return g_logits, g_scales, None, None, None


def lion_optimizer(groups: list[dict], betas: tuple[float, float]):
    """lion_pytorch's Lion whose update runs in one pass on the CPU (csrc/quantize/lion.cpp, same
    bits as lion_pytorch's six-pass update_fn, 11x faster over a block's 13M logits); any tensor
    the kernel does not take (CUDA, bf16 logits, no extension) goes to lion_pytorch's own."""
    from lion_pytorch import Lion
    from lion_pytorch.lion_pytorch import update_fn

    def update(p, grad, exp_avg, lr, wd, beta1, beta2):
        if (_CPU_EXT is not None and p.device.type == "cpu" and p.dtype == grad.dtype == torch.float32
                and p.is_contiguous() and grad.is_contiguous() and exp_avg.is_contiguous()):
            _CPU_EXT.lion_update(p.detach(), grad, exp_avg, lr, wd, beta1, beta2)
        else:
            update_fn(p, grad, exp_avg, lr, wd, beta1, beta2)

    opt = Lion(groups, betas=betas)
    opt.update_fn = update
    return opt


# ----------------------------------------------------------------------------- per-layer state


class GumbelGridLinear(nn.Module):
    """Stands in for one nn.Linear during refinement: y = x @ W^T + b with W soft or hard.

    Parameters: `logits` ``[V, N, K]`` float32 or ``logits_dtype`` (V = 4 for 2-bit, 5 for 3-bit, 2 for ternary),
    `scales` float32 ``[N, K // G]``. Buffers: `levels` (grid value per logit), `mask`.
    """

    def __init__(self, linear: nn.Linear, init: QuantizedWeight, std: float, alpha: float,
                 generator: torch.Generator, logits_dtype: torch.dtype = torch.float32,
                 ternary_style: str = "reference", init_noise: float = 1.0):
        super().__init__()
        self.bits = normalize_bits(init.bits)
        self.group_size = init.group_size
        self.kind = "ternary" if self.bits == 1.58 else ("shift" if self.bits == 3 else "full")
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        q = init.codes.float()                                     # [N, K]
        qmin, qmax = grid_range(self.bits)
        n, k = q.shape
        self.mask = None
        self.grid = (qmin, qmax)
        # the 3-bit local shift's centres, for the fused CPU kernels
        self.q0 = init.codes.contiguous() if self.kind == "shift" else None
        if self.kind == "full":
            levels = torch.arange(qmin, qmax + 1, dtype=torch.float32, device=q.device).view(-1, 1, 1)   # [4,1,1]
            self.levels = levels
        elif self.kind == "shift":
            shifts = torch.tensor(LOCAL_SHIFTS, dtype=torch.float32, device=q.device).view(-1, 1, 1)
            self.levels = q.unsqueeze(0) + shifts                                        # [5,N,K]
            self.mask = (self.levels < qmin) | (self.levels > qmax)
        else:
            self.levels = None
        if self.kind == "ternary" and ternary_style == "reference":
            # The reference's sign and mask logits l = std * (noise + alpha * [sign q, 2|q| - 1]),
            # which its sigmoids take as 2*kappa*l; ours take kappa*p, so p = 2l (refine_block
            # doubles the lr and halves the weight decay to match).
            prior = torch.stack([torch.sign(q), 2.0 * q.abs() - 1.0])
            std = 2.0 * std
        elif self.kind == "ternary":
            # Binary split of {-1,0,1}: logit difference of the 2-class version of the same
            # quadratic prior. sign: -(q-1)^2/2 + (q+1)^2/2 = 2q; nonzero vs zero: |q| - 1/2.
            # Centring (mean_v) is implicit in a logit difference.
            prior = torch.stack([2.0 * q, q.abs() - 0.5])
        else:
            prior = -0.5 * (q.unsqueeze(0) - self.levels) ** 2
            if self.mask is not None:
                # centre over the valid levels only; masked levels never matter (-inf later)
                valid = (~self.mask).float()
                mean = (prior * valid).sum(0, keepdim=True) / valid.sum(0, keepdim=True)
            else:
                mean = prior.mean(0, keepdim=True)
            prior = prior - mean
        # Logits default to float32: the reference defaults to bf16 logits on GPU, but bf16
        # softmax on CPU is slower and the 1e-4 Lion steps would round away at |logit| ~ 1.
        noise = torch.randn(prior.shape, generator=generator, device=generator.device)
        self.logits = nn.Parameter((std * (init_noise * noise + alpha * prior)).to(logits_dtype))
        self.scales = nn.Parameter(init.scales.detach().float().clone())
        self.generator = generator
        self.kappa, self.tau = 1.0, 1.0
        self.store_noise = False
        self.hard = False
        self.fixed: QuantizedWeight | None = None   # when set, hard mode uses exactly this weight

    def soft_cfg(self) -> tuple:
        """The `cfg` of SoftWeightFunction at the current tau and kappa."""
        return (self.kind, self.levels, self.mask, self.kappa, self.tau, self.group_size, self.q0, self.grid)

    def hard_codes(self) -> torch.Tensor:
        """Argmax codes, int8 ``[N, K]``, no noise; masked levels never win."""
        lg = self.logits.detach()
        if self.kind == "ternary":
            sign = torch.where(lg[0] >= 0, 1, -1)
            return (sign * (lg[1] > 0)).to(torch.int8)
        if self.mask is not None:
            lg = lg.masked_fill(self.mask, float("-inf"))
        # argmax over the last, contiguous axis: 5x faster on the CPU than over axis 0 (same ties: first wins)
        idx = lg.permute(1, 2, 0).contiguous().argmax(dim=-1).unsqueeze(0)
        levels = self.levels.expand_as(lg)
        return levels.gather(0, idx).squeeze(0).to(torch.int8)

    def hardened(self) -> QuantizedWeight:
        return QuantizedWeight(self.hard_codes(), self.scales.detach().float().clone(),
                               self.bits, self.group_size)

    def weight(self) -> torch.Tensor:
        if self.hard:
            return (self.fixed or self.hardened()).dequantize(torch.float32)
        return SoftWeightFunction.apply(self.logits, self.scales, self.generator, self.soft_cfg(),
                                        self.store_noise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)


# ----------------------------------------------------------------------------- block refinement


def _swap(block: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def token_weights(targets: torch.Tensor, cap: float | None, median: float) -> torch.Tensor | None:
    """Per-token loss weights ``[n, S, 1]``, or None for plain MSE (``cap`` None).

    Some tokens carry hidden states thousands of times larger than the rest (the attention sink
    at position 0 holds 84-99 % of the squared norm of SmolLM2's blocks 11-27's outputs,
    benchmarks/massive_activations.py): under plain MSE
    their error is the whole loss, and GSQ, and any choice made on that loss, serves them alone.
    A token whose target ``||y||^2`` exceeds ``cap`` x ``median`` is weighted ``cap * median /
    ||y||^2``, i.e. it counts with its relative error, as a token of ``cap`` x the median norm
    would; every other token keeps weight 1."""
    if cap is None:
        return None
    return (cap * median / _token_norm2(targets).clamp_min(1e-30)).clamp(max=1.0)


def _token_norm2(targets: torch.Tensor) -> torch.Tensor:
    """Squared norm of each token's hidden state, ``[n, S, 1]``."""
    return targets.float().pow(2).sum(-1, keepdim=True)


def _median_token_norm2(targets, batch_size: int) -> float:
    norms = [_token_norm2(targets[i:i + batch_size]).flatten() for i in range(0, targets.shape[0], batch_size)]
    return float(torch.cat(norms).median())


def _block_loss(out: torch.Tensor, target: torch.Tensor, cap: float | None, median: float) -> torch.Tensor:
    """Sum of squared errors, each token weighted by `token_weights`."""
    w = token_weights(target, cap, median)
    if w is None:
        return F.mse_loss(out, target, reduction="sum")
    return (F.mse_loss(out, target, reduction="none") * w).sum()


@torch.no_grad()
def _hard_mse(forward, layers: dict, weights: dict, inputs, targets, batch_size, cap=None, median=0.0) -> float:
    """Block-output (token-weighted) MSE with each layer's weight fixed to ``weights[name]``."""
    for name, m in layers.items():
        m.hard, m.fixed = True, weights[name]
    total, count = 0.0, 0
    try:
        for i in range(0, inputs.shape[0], batch_size):
            out = forward(inputs[i:i + batch_size])
            total += _block_loss(out, targets[i:i + batch_size], cap, median).item()
            count += out.numel()
    finally:
        for m in layers.values():
            m.hard, m.fixed = False, None
    return total / max(count, 1)


def gumbel_layers(block: nn.Module, names: list[str], init: dict[str, QuantizedWeight], options: GSQOptions,
                  generator: torch.Generator) -> dict[str, GumbelGridLinear]:
    """A GumbelGridLinear per linear of `names` (in that order, drawing their init noise from
    `generator`), as refine_block starts from; the block itself is not changed."""
    layers = {}
    for name in names:
        alpha = options.strength(init[name].bits)
        layers[name] = GumbelGridLinear(block.get_submodule(name), init[name], options.init_std, alpha, generator,
                                        getattr(torch, options.logits_dtype), options.ternary_style,
                                        options.init_noise)
        layers[name].store_noise = options.store_noise
    return layers


def hardened_init(block: nn.Module, names: list[str], init: dict[str, QuantizedWeight], options: GSQOptions,
                  seed: int) -> dict[str, QuantizedWeight]:
    """The codes refine_block would return after zero steps: the argmax of its initial logits
    (with the same seed), learned nothing. The difference to `init` prices the init's noise term."""
    gen = torch.Generator(device=init[names[0]].codes.device).manual_seed(int(seed))
    return {name: m.hardened() for name, m in gumbel_layers(block, names, init, options, gen).items()}


def lion_steps(options: GSQOptions, sequences: int) -> int:
    """Lion steps refine_block takes on ``sequences`` training sequences: every epoch, one a batch."""
    return options.epochs * math.ceil(sequences / min(options.batch_size, sequences))


def refine_block(block: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor],
                 names: list[str], init: dict[str, QuantizedWeight], inputs: torch.Tensor,
                 targets: torch.Tensor, options: GSQOptions, seed: int,
                 held_out: tuple | None = None, progress: Callable[[str], None] | None = None,
                 log_seconds: float = 60.0) -> tuple[dict[str, QuantizedWeight], dict]:
    """Refine the GPTQ init of the linears `names` of `block` by GSQ.

    inputs, targets: float32 ``[n, S, H]``; `forward` runs `block` as it currently is.
    held_out: (inputs, targets) of sequences GSQ does not train on, or None. With it and
    ``options.keep_best``, the result is whichever of the init and the hardened codes at each
    epoch's end has the lowest block-output MSE on them; without it, the last epoch's codes unless
    the init is better on the training inputs.
    `progress`: called with a progress line at most every `log_seconds` of training (a block can take
    many minutes, and the tqdm bar shows only on a terminal).
    Returns ({name: hardened QuantizedWeight}, log). The block's original linears are restored.
    Log: {"steps": [{step, epoch, soft_mse, tau, kappa, lr_logits}], "hard_mse": [the init's, then
    after each epoch with held_out, after the last epoch only without it (a forward over every
    training sequence an epoch was a third of a step's compute)], "scored_epochs": [the epochs
    those are after, 0 = the init], "held_out_mse": [likewise, with held_out], "chosen": index
    into them, "kept_init": chosen == 0, ...}; JSON-serialisable.
    """
    gen = torch.Generator(device=inputs.device).manual_seed(int(seed))
    frozen: list = []
    originals: dict[str, nn.Module] = {}
    n = inputs.shape[0]
    bs = min(options.batch_size, n)
    micro = min(options.micro_batch_size, bs)
    total = lion_steps(options, n)
    log = {"options": asdict(options), "seed": int(seed), "names": list(names),
           "total_steps": total, "steps": [], "hard_mse": [], "scored_epochs": [0]}
    try:
        layers = gumbel_layers(block, names, init, options, gen)
        for name in names:
            originals[name] = _swap(block, name, layers[name])
        params_logits = [m.logits for m in layers.values()]
        params_scales = [m.scales for m in layers.values()]
        frozen = [(p, p.requires_grad) for p in block.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        for p in params_logits + params_scales:
            p.requires_grad_(True)
        lr_logits, wd_logits = options.logit_group(next(iter(init.values())).bits)  # one bit width per run
        opt = lion_optimizer([{"params": params_logits, "lr": lr_logits, "weight_decay": wd_logits},
                              {"params": params_scales, "lr": options.lr_scales, "weight_decay": 0.0}],
                             tuple(options.lion_betas))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: cosine_lr_factor(s, total, options.min_lr_ratio))
        # Index 0 is the init's own error (the GPTQ codes, not the argmax of the noisy init
        # logits, which differs from them for a few % of the weights).
        start = {name: init[name] for name in names}
        cap = options.token_norm_cap
        median = _median_token_norm2(targets, bs) if cap is not None else 0.0  # of the training targets
        if cap is not None:
            log["median_token_norm2"] = median

        def score(weights):
            log["hard_mse"].append(_hard_mse(forward, layers, weights, inputs, targets, bs, cap, median))
            if held_out is not None:
                log.setdefault("held_out_mse", []).append(
                    _hard_mse(forward, layers, weights, held_out[0], held_out[1], bs, cap, median))

        score(start)
        best, best_weights = 0, start   # by the held-out MSE (only the best needs keeping)
        amp = options.autocast_dtype(inputs.device)
        step = 0
        started = last_log = time.monotonic()
        bar = tqdm(total=total, unit="step", desc="  GSQ", leave=False, dynamic_ncols=True,
                   disable=not sys.stderr.isatty())
        for epoch in range(options.epochs):
            order = torch.randperm(n, generator=gen, device=gen.device)
            for i in range(0, n, bs):
                idx = order[i:i + bs]
                tau = linear_schedule(options.tau_start, options.tau_end, step, total)
                kappa = linear_schedule(options.kappa_start, options.kappa_end, step, total)
                for m in layers.values():
                    m.tau, m.kappa = tau, kappa
                opt.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for j in range(0, len(idx), micro):
                    part = idx[j:j + micro]
                    # Mean over the whole step's elements, whatever the micro-batching.
                    with torch.autocast(inputs.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                        out = forward(inputs[part])
                    loss = _block_loss(out.float(), targets[part], cap, median) / (len(idx) * targets[0].numel())
                    if not loss.requires_grad:
                        raise RuntimeError("refine_block: `forward` ran without autograd (torch.no_grad?)")
                    loss.backward()
                    loss_sum += loss.item()
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                if step % options.log_every == 0 or step == total - 1:
                    log["steps"].append({"step": step, "epoch": epoch, "soft_mse": loss_sum,
                                         "tau": tau, "kappa": kappa, "lr_logits": lr})
                step += 1
                bar.update(1)
                bar.set_postfix(soft_mse=f"{loss_sum:.3e}", tau=f"{tau:.2f}", refresh=False)
                if progress is not None and time.monotonic() - last_log >= log_seconds:
                    last_log = time.monotonic()
                    left = (last_log - started) / step * (total - step)
                    progress(f"[gsq-quantize]   GSQ step {step}/{total}, soft MSE {loss_sum:.3e}, tau {tau:.2f}, "
                             f"~{left / 60:.1f} min left in this block")
            if held_out is None and epoch < options.epochs - 1:
                continue  # only the last epoch's codes can be chosen then: harden and score just those
            last = {name: m.hardened() for name, m in layers.items()}
            score(last)
            log["scored_epochs"].append(epoch + 1)
            if held_out is not None and log["held_out_mse"][-1] < log["held_out_mse"][best]:
                best, best_weights = len(log["held_out_mse"]) - 1, last
        bar.close()
        # Not in the reference, which returns the last epoch's codes: with few training tokens
        # (a CPU preset) GSQ can fit them and lose to its init on other text. With held-out
        # sequences the result is the best of the init and each epoch's codes on them; without,
        # the init when the last epoch's codes are worse on the training inputs.
        final = len(log["hard_mse"]) - 1   # the last epoch's index in hard_mse
        if not options.keep_best:
            chosen, result = final, last
        elif held_out is not None:
            chosen, result = best, best_weights
        else:
            worse = log["hard_mse"][-1] > log["hard_mse"][0]
            chosen, result = (0, start) if worse else (final, last)
        log["chosen"] = int(chosen)
        log["kept_init"] = chosen == 0
    finally:
        for name, old in originals.items():
            _swap(block, name, old)
        for p, flag in frozen:
            p.requires_grad_(flag)
    return result, log


# ----------------------------------------------------------------------------- GSQ in weight space


def cholesky_rows(hess: torch.Tensor, damp: float, pieces: int) -> torch.Tensor:
    """``L^T`` of the damped Hessian ``H + damp*mean(diag)*I = L L^T``, cut into ``pieces`` chunks of
    rows, f32 ``[pieces, K/pieces, K]``: a layer's output error on these rows, summed, is
    ``tr(dW H dW^T)`` (the Hessian-weighted weight error), so GSQ can minimise it in mini-batches."""
    k = hess.shape[0]
    h = hess + damp * hess.diagonal().mean().clamp(min=1e-8) * torch.eye(k, device=hess.device)
    lt = torch.linalg.cholesky(h).t().contiguous()
    pieces = max(1, min(pieces, k))
    while k % pieces:
        pieces -= 1
    return lt.view(pieces, k // pieces, k)


# Mini-batches the rows of L^T are cut into for GSQ in weight space (q/k, the ternary pre-stage):
# each step sees K/32 of them, so the step's cost is 1/32 of the full tr(dW H dW^T).
WEIGHT_SPACE_PIECES = 32


def refine_weight_space(weight: torch.Tensor, hess: torch.Tensor, start: QuantizedWeight, options, seed: int,
                        damp: float, pieces: int = WEIGHT_SPACE_PIECES, name: str = "lin"
                        ) -> tuple[QuantizedWeight, dict]:
    """GSQ of one linear (weight f32 ``[N, K]``) on its Hessian-weighted weight error
    ``tr(dW H dW^T)``, from the codes ``start``; no pass through the block. The float weight and
    its soft copy both run on the rows of ``L^T`` (``cholesky_rows``), so the bias, if any,
    plays no part. Returns (hardened codes, GSQ log naming the linear ``name``)."""
    options = replace(options, token_norm_cap=None)  # the rows of L^T are no tokens
    holder = torch.nn.Module()
    holder.lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.lin.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
    rows = cholesky_rows(hess, damp, pieces)
    with torch.no_grad():
        want = rows @ holder.lin.weight.t()  # [pieces, K/pieces, N]: the float layer on L^T
    refined, log = refine_block(holder, lambda inp: holder.lin(inp), ["lin"], {"lin": start}, rows, want,
                                options, seed)
    log["names"] = [name]
    return refined["lin"], log


def ternary_random_options(options, steps: int, pieces: int = WEIGHT_SPACE_PIECES):
    """The GSQ reference's ternary pre-stage from random logits: no prior (strength 0), its
    temperature starting at twice the block stage's, about ``steps`` Lion steps of one
    mini-batch of L^T rows each."""
    return replace(options, epochs=max(1, -(-steps // pieces)), batch_size=1, micro_batch_size=1, alpha=0.0,
                   tau_start=2.0 * options.tau_start)

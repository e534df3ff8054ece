"""The GEMM kernels that serve a GSQ weight, behind one interface, chosen per weight at load.

A kernel is a :class:`GSQKernel` subclass (the idea of vLLM's ``MPLinearKernel``):

* ``supports(n, k, group_size, bits, act_dtype, device) -> (ok, reason)``, a classmethod: whether it
  can serve an ``[N, K]`` weight for activations of ``act_dtype`` on ``device``, and why not;
* ``repack(qweight, scales)``: the checkpoint's tensors -> its own packed tensors, once at load;
* ``forward(x, bias)``: ``x @ W.T + bias``. The name is nn.Module's (``Module.apply`` is taken);
  no per-call checks, the weight was checked at load.

An instance is an ``nn.Module`` holding its packed tensors as parameters, so a vLLM layer holds it as
one submodule (``layer.gsq_kernel``; an MoE layer one per weight, ``gsq_w13`` / ``gsq_w2``, each with
every expert stacked) and vLLM moves and keeps the tensors with the layer.

The registry lists kernels in preference order: ``cuda`` (:mod:`gsq_vllm.kernels.cuda`), then ``cpu``
(:mod:`gsq_vllm.kernels.cpu`), which takes every shape the format allows and is the fallback. Others
may be registered with :func:`register_kernel`: the tests register ``cuda-emu``, the CUDA kernel's
real source run on the CPU by the emulator (tests/emu_util.py); serving code never imports it.

:func:`choose` reads ``GSQ_KERNEL`` (per weight, at load):

* ``auto`` (default): the first registered kernel that ``supports`` the weight, skipping those
  registered for explicit use only (``cuda-emu``): the CUDA kernel when the extension is built, a CUDA
  device holds the layer and it takes the shape; otherwise the CPU kernel;
* a kernel's name: that kernel, or the fallback for shapes it does not take; a kernel that cannot
  run here at all (``cuda`` without the extension or a CUDA device) is an error.

:func:`load_kernel` then repacks, and before a weight is served by a kernel with ``selfcheck`` set (the
CUDA one, real or emulated) runs it once per distinct (kernel, N, K, bits, G, dtype) on random
activations with that weight, against dequantize + matmul in fp32. A mismatch stops loading with an
error naming the layer; ``GSQ_KERNEL_SELFCHECK=fallback`` serves such weights with the fallback kernel
instead (with a warning); ``off`` skips the check.
"""

from __future__ import annotations

import abc
import logging
import os
from typing import ClassVar

import torch

from gsq_format.format import dequantize_packed, storage_bits

logger = logging.getLogger(__name__)

SELFCHECK_CHOICES = ("on", "fallback", "off")
SELFCHECK_MS = (1, 33)  # one partial 16-row block, one partial 64-row block
SELFCHECK_MAX_REL_ERR = 1e-2
# (kernel, N, K, bits, G, dtype) -> passed: each distinct problem is checked once per process
_selfcheck_results: dict[tuple, bool] = {}


class GSQKernel(torch.nn.Module, metaclass=abc.ABCMeta):
    """One weight (or one weight of every expert) in a kernel's layout, and the GEMM that reads it.

    ``n``, ``k``: the weight's output and input features; ``bits``: 2, 3 or 1.58; ``act_dtype``: the
    activations' dtype. After :meth:`load`, ``experts`` is None (one weight) or the number of experts,
    and the packed tensors are parameters named ``packed_names``."""

    name: ClassVar[str]  # GSQ_KERNEL's name for it
    title: ClassVar[str]  # in messages: "the gsq {title} kernel"
    auto: ClassVar[bool] = True  # GSQ_KERNEL=auto may choose it
    selfcheck: ClassVar[bool] = False  # checked against dequantize + matmul before it serves
    packed_names: ClassVar[tuple[str, ...]]  # what repack returns, in order

    def __init__(self, n: int, k: int, bits, group_size: int, act_dtype: torch.dtype) -> None:
        super().__init__()
        self.n, self.k, self.bits, self.group_size, self.act_dtype = n, k, bits, group_size, act_dtype
        self.storage_bits = storage_bits(bits)
        self.experts: int | None = None

    def extra_repr(self) -> str:
        experts = f", experts={self.experts}" if self.experts is not None else ""
        return f"{self.name}: N={self.n}, K={self.k}, bits={self.bits}, G={self.group_size}{experts}"

    @classmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        """Whether the kernel can run at all for a layer on ``device`` (its extension, its device)."""
        return True, ""

    @classmethod
    @abc.abstractmethod
    def supports(cls, n: int, k: int, group_size: int, bits, act_dtype: torch.dtype,
                 device: torch.device) -> tuple[bool, str]:
        """(True, "") when the kernel serves an ``[n, k]`` weight here, else (False, why not)."""

    @abc.abstractmethod
    def repack(self, qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Checkpoint ``qweight`` int32 ``[N, K*b/32]`` and ``scales`` ``[N, K/G]`` -> the packed
        tensors, named by ``packed_names``, on qweight's device."""

    @abc.abstractmethod
    def gemm(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """``x`` ``[M, K]`` -> ``[M, N]`` in x's dtype, with the held weight (``expert``'s, for a
        stack of experts). Called on every step: it reads its parameters and calls its op, no more."""

    def load(self, qweight: torch.Tensor, scales: torch.Tensor) -> "GSQKernel":
        """Repack one weight (``qweight`` ``[N, K*b/32]``) or every expert's (``[E, N, K*b/32]``,
        stacked along a first dim of the packed tensors) and hold the result. Returns self."""
        if qweight.dim() == 2:
            return self.hold(self.repack(qweight, scales))
        stacked = None
        for e in range(qweight.shape[0]):
            packed = self.repack(qweight[e], scales[e])
            if stacked is None:
                stacked = tuple(t.new_empty((qweight.shape[0], *t.shape)) for t in packed)
            for dst, t in zip(stacked, packed):
                dst[e].copy_(t)
        return self.hold(stacked, experts=qweight.shape[0])

    def hold(self, packed: tuple[torch.Tensor, ...], experts: int | None = None) -> "GSQKernel":
        """Hold already packed tensors (as parameters, so they move with the layer). Returns self."""
        self.experts = experts
        for name, t in zip(self.packed_names, packed, strict=True):
            self.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
        return self

    def packed(self, expert: int | None = None) -> tuple[torch.Tensor, ...]:
        """The packed tensors (of one expert, for a stack of experts)."""
        ts = tuple(getattr(self, name) for name in self.packed_names)
        return ts if expert is None else tuple(t[expert] for t in ts)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, expert: int | None = None) -> torch.Tensor:
        """``x`` ``[..., K]`` -> ``x @ W.T + bias`` ``[..., N]`` in x's dtype (W: ``expert``'s weight
        for a stack of experts)."""
        x2 = x.reshape(-1, x.shape[-1])
        y = self.gemm(x2, expert)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


# ---------------------------------------------------------------- registry

_registry: list[type[GSQKernel]] = []


def register_kernel(cls: type[GSQKernel], before: str | None = None) -> type[GSQKernel]:
    """Add a kernel to the registry (preference order), at the end or just before the kernel named
    ``before``; the last one is the fallback and must take every shape the format allows. Registering
    a name again replaces that kernel in place."""
    for i, c in enumerate(_registry):
        if c.name == cls.name:
            _registry[i] = cls
            return cls
    names = [c.name for c in _registry]
    _registry.insert(names.index(before) if before in names else len(_registry), cls)
    return cls


def registered_kernels() -> tuple[type[GSQKernel], ...]:
    return tuple(_registry)


def kernel_by_name(name: str) -> type[GSQKernel]:
    return next(c for c in _registry if c.name == name)


def _env_choice(var: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(var, default)
    if value not in choices:
        raise ValueError(f"{var}={value!r}: choose one of {', '.join(choices)}")
    return value


def choose(n: int, k: int, group_size: int, bits, act_dtype: torch.dtype, device: torch.device) -> type[GSQKernel]:
    """The kernel class that serves an ``[n, k]`` weight on ``device`` (``GSQ_KERNEL``: module doc)."""
    choice = _env_choice("GSQ_KERNEL", ("auto", *(c.name for c in _registry)), "auto")
    fallback = _registry[-1]
    if choice == "auto":
        candidates = [c for c in _registry if c.auto]
    else:
        forced = kernel_by_name(choice)
        ok, why = forced.available(device)
        if not ok:
            raise ValueError(f"GSQ_KERNEL={choice}, but the gsq {forced.title} kernel is not usable here ({why})")
        candidates = [forced]
    reasons = []
    for cls in [*candidates, fallback]:
        ok, why = cls.supports(n, k, group_size, bits, act_dtype, device)
        if ok:
            return cls
        reasons.append(f"{cls.name}: {why}")
    raise ValueError(f"no gsq kernel serves N={n}, K={k}, bits={bits}, G={group_size}, {act_dtype} on {device} "
                     f"({'; '.join(reasons)})")


# ---------------------------------------------------------------- load and self-check


def passes_selfcheck(kernel: GSQKernel, qweight: torch.Tensor, scales: torch.Tensor, layer_name: str) -> bool:
    """Run ``kernel`` on random activations against dequantize + matmul (fp32), once per distinct
    problem (for a stack of experts: expert 0, ``qweight[0]``). False only in fallback mode; a mismatch
    raises otherwise."""
    mode = _env_choice("GSQ_KERNEL_SELFCHECK", SELFCHECK_CHOICES, "on")
    if mode == "off":
        return True
    bits, g, n, k, dtype = kernel.bits, kernel.group_size, kernel.n, kernel.k, kernel.act_dtype
    key = (kernel.name, n, k, bits, g, dtype)
    if key not in _selfcheck_results:
        expert = None if kernel.experts is None else 0
        if expert is not None:
            qweight, scales = qweight[0], scales[0]
        w = dequantize_packed(qweight, scales.float(), bits, g).to(qweight.device)
        gen = torch.Generator().manual_seed(0)
        worst = 0.0
        for m in SELFCHECK_MS:
            a = torch.randn(m, k, generator=gen).to(dtype).to(qweight.device)
            got = kernel(a, expert=expert).float()
            ref = a.float() @ w.t()
            rel = ((got - ref).norm() / ref.norm()).item()
            worst = max(worst, rel if torch.isfinite(got).all() else float("inf"))
        _selfcheck_results[key] = worst <= SELFCHECK_MAX_REL_ERR
        if not _selfcheck_results[key]:
            msg = (f"gsq: load-time self-check failed for layer {layer_name or '?'}: the "
                   f"{kernel.name} kernel differs from dequantize + matmul by relative error {worst:.3g} "
                   f"(N={n}, K={k}, bits={bits}, G={g}, {dtype}; limit {SELFCHECK_MAX_REL_ERR})")
            if mode == "on":
                raise RuntimeError(msg + ". Set GSQ_KERNEL_SELFCHECK=fallback to serve such layers on the "
                                   "slower dequantize path.")
            logger.warning("%s; serving layers of this shape on the dequantize path", msg)
    return _selfcheck_results[key]


def load_kernel(qweight: torch.Tensor, scales: torch.Tensor, bits, group_size: int, act_dtype: torch.dtype,
                layer_name: str) -> GSQKernel:
    """The kernel that serves a loaded weight (``qweight`` ``[N, K*b/32]``, or ``[E, N, K*b/32]`` for
    every expert of an MoE layer; ``scales`` alike): chosen, repacked and, where it asks for it,
    self-checked (module doc)."""
    n, k = qweight.shape[-2], qweight.shape[-1] * 32 // storage_bits(bits)
    cls = choose(n, k, group_size, bits, act_dtype, qweight.device)
    kernel = cls(n, k, bits, group_size, act_dtype).load(qweight, scales)
    if cls.selfcheck and not passes_selfcheck(kernel, qweight, scales, layer_name):
        kernel = _registry[-1](n, k, bits, group_size, act_dtype).load(qweight, scales)
    return kernel


# The product's kernels, in preference order (imported here, after the interface they implement).
from gsq_vllm.kernels.cpu import CPUKernel  # noqa: E402
from gsq_vllm.kernels.cuda import CUDAKernel  # noqa: E402

register_kernel(CUDAKernel)
register_kernel(CPUKernel)

__all__ = ["GSQKernel", "CPUKernel", "CUDAKernel", "SELFCHECK_MAX_REL_ERR", "SELFCHECK_MS", "choose",
           "kernel_by_name", "load_kernel", "passes_selfcheck", "register_kernel", "registered_kernels"]

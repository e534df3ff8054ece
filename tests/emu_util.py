"""Shared by the emulator tests: random layers in the kernel layout, the error bound, and the
``cuda-emu`` kernel of the vLLM plugin.

The bound is what the kernel's arithmetic allows, no more: the codes enter
the tensor cores exactly, the scales are applied to fp32 partial sums, so
the reference weight is ``q * s`` exactly (float64); the sums are fp32 (at
most ``K + splits`` roundings, each <= 2^-24 of the running sum of
magnitudes), and the output is rounded to fp16/bf16 once.
"""

from __future__ import annotations

import torch

from gsq_vllm import cuda_gemm as cg
from gsq_format.format import grid_range, pack_codes
from gsq_vllm.kernels import CUDAKernel, register_kernel

MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def random_layer(n: int, k: int, bits, g: int, dtype: torch.dtype, seed: int):
    """-> (w [N, K] float64 dequantized weight q * s, b_repacked, s_repacked)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = grid_range(bits)
    q = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.005).to(dtype)
    b_r, s_r = cg.repack(pack_codes(q, bits), s, bits, g)
    w = (q.double().view(n, -1, g) * s.double().unsqueeze(-1)).view(n, k)
    return w, b_r, s_r


def random_activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randn(m, k, generator=gen) + 0.1).to(dtype)


def check_against_float64(c: torch.Tensor, a: torch.Tensor, w_t: torch.Tensor, splits: int = 1) -> None:
    """Every element of c within the fp32-accumulation + output-rounding bound of float64."""
    assert torch.isfinite(c).all(), f"{int((~torch.isfinite(c)).sum())} non-finite outputs (unwritten or poisoned)"
    ref = a.double() @ w_t.double().t()
    mag = a.double().abs() @ w_t.double().abs().t()
    k = a.shape[1]
    bound = 2.0 ** -MANTISSA_BITS[c.dtype] * ref.abs() + (k + splits + 2) * 2.0**-24 * mag + 1e-30
    err = (c.double() - ref).abs()
    bad = err > bound
    if bad.any():
        i, j = [int(x) for x in bad.nonzero()[0]]
        raise AssertionError(
            f"{int(bad.sum())} of {c.numel()} outputs out of bound; e.g. C[{i},{j}] = {c[i, j].item()} "
            f"vs {ref[i, j].item()} (bound {bound[i, j].item():.3g})")


class EmulatedCUDAKernel(CUDAKernel):
    """``GSQ_KERNEL=cuda-emu``: the CUDA kernel's layout, shape rules and load-time self-check, its real
    source run on the CPU by the emulator (``torch.ops.gsq.gemm_emulated``, gsq_vllm/cuda_emu.py; slow,
    for tests and tiny models). Never chosen by ``GSQ_KERNEL=auto``."""

    name = "cuda-emu"
    title = "emulated CUDA"
    auto = False

    @classmethod
    def available(cls, device):
        return True, ""

    def gemm(self, x, expert=None):
        b, s = (self.b, self.s) if expert is None else (self.b[expert], self.s[expert])
        return torch.ops.gsq.gemm_emulated(x, b, s, self.storage_bits, self.group_size, self.n, self.k)


def register_emulated_kernel() -> None:
    """Make ``GSQ_KERNEL=cuda-emu`` available in this process (idempotent): registered just before
    the CPU fallback, so GSQ_KERNEL's choices read auto, cuda, cuda-emu, cpu."""
    from gsq_vllm import cuda_emu  # noqa: F401  (registers torch.ops.gsq.gemm_emulated)

    register_kernel(EmulatedCUDAKernel, before="cpu")

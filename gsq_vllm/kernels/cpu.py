"""The CPU kernels (``torch.ops.gsq.cpu_gemm``, csrc/cpu/; :mod:`gsq_vllm.cpu_gemm`): the fallback."""

from __future__ import annotations

import logging

import torch

from gsq_vllm import cpu_gemm
from gsq_vllm.kernels import GSQKernel

_logged = False


def _log_cpu_kernel_once() -> None:
    """Say once per process which CPU kernel serves (cpuid's choice or GSQ_CPU_ISA)."""
    global _logged
    if not _logged:
        _logged = True
        isa = cpu_gemm.cpu_isa() or "torch (C++ extension not built)"
        cpp = cpu_gemm._cpp
        tl = cpp.tl_in_use(1) if cpp is not None and hasattr(cpp, "tl_in_use") else ""
        tables = (f"; table lookups {tl} up to {cpp.TL_MAX_ROWS} rows (int8 tables; GSQ_CPU_TL=off: fused only)"
                  if tl else "")
        # under vLLM's logger, so the line shows where vLLM's own INFO lines do
        logging.getLogger("vllm.gsq").info(
            "gsq: CPU GEMM kernel %s (fused up to %d rows%s; GSQ_CPU_ISA forces one)", isa, cpu_gemm.cpp_max_rows(), tables)


class CPUKernel(GSQKernel):
    """Fused dequantize + GEMM on bit planes (``lo``, ``hi``; ``s`` the checkpoint's scales, as they
    are): the C++ extension's kernels, or torch without it. Takes every shape the format allows, any
    activation dtype; it is the fallback. On a device other than the CPU (a CUDA layer the CUDA kernel
    does not take) it runs the same blocked dequantize + matmul in torch there."""

    name = "cpu"
    title = "CPU"
    packed_names = ("lo", "hi", "s")

    @classmethod
    def supports(cls, n, k, group_size, bits, act_dtype, device) -> tuple[bool, str]:
        why = cpu_gemm.shape_problem(n, k, bits, group_size)
        return why is None, why or ""

    def hold(self, packed, experts=None):
        _log_cpu_kernel_once()
        self.torch_path = packed[0].device.type != "cpu"  # the C++ op is the CPU's
        return super().hold(packed, experts)

    def repack(self, qweight, scales):
        lo, hi = cpu_gemm.repack_for_cpu(qweight.cpu(), self.bits, self.group_size)
        return lo.to(qweight.device), hi.to(qweight.device), scales.contiguous()

    def gemm(self, x, expert=None):
        lo, hi, s = (self.lo, self.hi, self.s) if expert is None else (self.lo[expert], self.hi[expert], self.s[expert])
        if self.torch_path:
            return cpu_gemm._blocked_gemm(x, lo, hi, s, self.storage_bits, self.group_size, use_cpp=False)
        return torch.ops.gsq.cpu_gemm(x, lo, hi, s, self.storage_bits, self.group_size)

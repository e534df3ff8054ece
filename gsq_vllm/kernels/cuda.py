"""The CUDA W2A16/W3A16 kernel (``torch.ops.gsq.gemm``, csrc/gsq_gemm.cu; :mod:`gsq_vllm.cuda_gemm`)."""

from __future__ import annotations

import torch

from gsq_vllm import cuda_gemm
from gsq_vllm.kernels import GSQKernel


class CUDAKernel(GSQKernel):
    """The Marlin-style CUDA GEMM: its shape rules are the extension's (csrc/gsq_rules.h), its
    activations fp16 or bf16; packed ``b`` int32 and ``s`` (scales in the activation dtype), laid out
    by :func:`gsq_vllm.cuda_gemm.repack`. Self-checked at load: it has never run on a GPU."""

    name = "cuda"
    title = "CUDA"
    selfcheck = True
    packed_names = ("b", "s")

    @classmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        built = cuda_gemm.cuda_kernel_available()
        ok = torch.device(device).type == "cuda" and built
        return ok, "" if ok else f"layer on {device}, extension built: {built}"

    @classmethod
    def supports(cls, n, k, group_size, bits, act_dtype, device) -> tuple[bool, str]:
        ok, why = cls.available(device)
        if not ok:
            return False, why
        why = cuda_gemm.shape_problem(n, k, bits, group_size)
        if why is not None:
            return False, why
        if act_dtype not in cuda_gemm.MAGIC:
            return False, f"activations {act_dtype}: the kernel takes {', '.join(map(str, cuda_gemm.MAGIC))}"
        return True, ""

    def repack(self, qweight, scales):
        # The kernel reads its scales in the activation dtype; supports() checked the shape.
        return cuda_gemm.repack(qweight, scales, self.bits, self.group_size, dtype=self.act_dtype, check=False)

    def gemm(self, x, expert=None):
        b, s = (self.b, self.s) if expert is None else (self.b[expert], self.s[expert])
        return cuda_gemm.launch(x, b, s, self.storage_bits, self.group_size, self.n, self.k)

"""``GSQLinearMethod``: how a vLLM linear layer holds and applies GSQ weights.

Parameters (per tensor-parallel rank, ``N = sum(output_partition_sizes)``,
``K = input_size_per_partition``, ``b`` = storage bits, ``G`` = group size):

* ``qweight`` int32 ``[N, K*b/32]``: the checkpoint's packed codes, packed
  along the *input* dim, so fused QKV / gate-up loading (which slices the
  output dim) and row-parallel sharding (which slices whole words of the
  input dim) need no special cases.
* ``scales`` ``[N, K/G]`` in the checkpoint's scale dtype.

After loading, :meth:`process_weights_after_loading` repacks once for the
kernel that ``apply`` will use: the CUDA kernel (``gsq_vllm.cuda_gemm``) when
the extension is built, a CUDA device holds the layer and it supports the
shape; otherwise the CPU bit-plane layout of ``gsq_vllm.cpu_gemm``. The
original ``qweight`` is dropped so only one packed copy stays in memory.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

from gsq_vllm import cpu_gemm
from gsq_vllm.format import FormatError, check_group_size, storage_bits


def _cuda_gemm_module():
    """``gsq_vllm.cuda_gemm`` if importable and usable, else None (CPU machines)."""
    try:
        from gsq_vllm import cuda_gemm
    except ImportError:
        return None
    try:
        return cuda_gemm if cuda_gemm.cuda_kernel_available() else None
    except Exception:
        return None


# The v2 loader is what lets vLLM's parameter classes place fused shards.
@register_weight_loader_v2_supported_method
class GSQLinearMethod(LinearMethodBase):
    """Weight-only GSQ linear: ``y = x @ (s * q).T + bias``."""

    def __init__(self, quant_config) -> None:
        self.quant_config = quant_config
        self.fmt = quant_config.fmt

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        g = self.fmt.group_size
        sb = self.fmt.storage_bits
        k = input_size_per_partition
        name = extra_weight_attrs.get("prefix", "") or type(layer).__name__
        try:
            check_group_size(k, g, f"gsq layer {name} (input features per rank)")
        except FormatError as e:
            raise ValueError(str(e)) from None
        if k % 32:
            raise ValueError(f"gsq: input features per rank ({k}) must be a multiple of 32")
        n = sum(output_partition_sizes)
        weight_loader = extra_weight_attrs["weight_loader"]
        qweight = PackedvLLMParameter(
            data=torch.empty(n, k * sb // 32, dtype=torch.int32),
            input_dim=1,
            output_dim=0,
            packed_dim=1,
            packed_factor=Fraction(32, sb) if 32 % sb else 32 // sb,
            weight_loader=weight_loader,
        )
        scales = GroupQuantScaleParameter(
            data=torch.empty(n, k // g, dtype=self.fmt.torch_scale_dtype),
            input_dim=1,
            output_dim=0,
            weight_loader=weight_loader,
        )
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("scales", scales)
        layer.gsq_n = n
        layer.gsq_k = k
        layer.gsq_act_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        bits, g = self.fmt.bits, self.fmt.group_size
        n, k = layer.gsq_n, layer.gsq_k
        qweight = layer.qweight.data
        scales = layer.scales.data
        cuda = _cuda_gemm_module() if qweight.is_cuda else None
        if cuda is not None and cuda.cuda_supports(n, k, bits, g):
            # The CUDA kernel reads its scales in the activation dtype.
            b, s = cuda.repack(qweight, scales, bits, g, dtype=layer.gsq_act_dtype)
            layer.gsq_kernel = "cuda"
            layer.gsq_b = torch.nn.Parameter(b, requires_grad=False)
            layer.gsq_s = torch.nn.Parameter(s, requires_grad=False)
        else:
            lo, hi = cpu_gemm.repack_for_cpu(qweight.cpu(), bits, g)
            layer.gsq_kernel = "cpu"
            layer.gsq_lo = torch.nn.Parameter(lo.to(qweight.device), requires_grad=False)
            layer.gsq_hi = torch.nn.Parameter(hi.to(qweight.device), requires_grad=False)
            layer.gsq_s = torch.nn.Parameter(scales.contiguous(), requires_grad=False)
        del layer.qweight
        del layer.scales

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` [..., K] -> [..., N] in x's dtype."""
        x2 = x.reshape(-1, x.shape[-1])
        bits = storage_bits(self.fmt.bits)
        if layer.gsq_kernel == "cuda":
            from gsq_vllm import cuda_gemm

            y = cuda_gemm.gsq_gemm(
                x2, layer.gsq_b, layer.gsq_s, self.fmt.bits, self.fmt.group_size, layer.gsq_n, layer.gsq_k
            )
        else:
            y = torch.ops.gsq.cpu_gemm(x2, layer.gsq_lo, layer.gsq_hi, layer.gsq_s, bits, self.fmt.group_size)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

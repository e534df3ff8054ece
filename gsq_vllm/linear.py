"""``GSQLinearMethod``: how a vLLM linear layer holds and applies GSQ weights.

Parameters (per tensor-parallel rank, ``N = sum(output_partition_sizes)``,
``K = input_size_per_partition``, ``b`` = storage bits, ``G`` = group size):

* ``qweight`` int32 ``[N, K*b/32]``: the checkpoint's packed codes, packed
  along the *input* dim, so fused QKV / gate-up loading (which slices the
  output dim) and row-parallel sharding (which slices whole words of the
  input dim) need no special cases.
* ``scales`` ``[N, K/G]`` in the checkpoint's scale dtype.

The layer's shape is checked against the format once, in :meth:`create_weights`.
After loading, :meth:`process_weights_after_loading` hands both to
:func:`gsq_vllm.kernels.load_kernel`, which chooses the kernel (``GSQ_KERNEL``),
repacks once for it and self-checks it (``GSQ_KERNEL_SELFCHECK``; both described
in :mod:`gsq_vllm.kernels`). The layer then holds that kernel as one submodule,
``layer.gsq_kernel``, with its packed tensors as parameters; the checkpoint-layout
``qweight`` and ``scales`` are dropped so only one packed copy stays in memory.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

from gsq_format.format import PACK_BLOCK, FormatError, check_group_size
from gsq_vllm.kernels import load_kernel


def check_input_features(k: int, group_size: int, what: str, per_rank: bool) -> None:
    """The format's rule for a layer's input features (per rank): whole groups and whole packed
    words. Raises ValueError naming the layer (``what``), with a hint when tensor parallelism cut K."""
    try:
        check_group_size(k, group_size, what)
    except FormatError as e:
        raise ValueError(f"{e}{'; or use a smaller tensor-parallel size' if per_rank else ''}") from None
    if k % PACK_BLOCK:
        raise ValueError(f"{what}: must be a multiple of {PACK_BLOCK} (whole packed words)")


# The v2 loader is what lets vLLM's parameter classes place fused shards.
@register_weight_loader_v2_supported_method
class GSQLinearMethod(LinearMethodBase):
    """Weight-only GSQ linear: ``y = x @ (s * q).T + bias``."""

    def __init__(self, quant_config, prefix: str = "") -> None:
        self.quant_config = quant_config
        self.fmt = quant_config.fmt
        self.prefix = prefix  # the layer's name in the model, for errors

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
        name = self.prefix or type(layer).__name__
        # Row-parallel layers hold K / tp_size input features per rank; groups must not straddle ranks.
        per_rank = f"{k} input features per rank of {input_size}" if k != input_size else f"{k} input features"
        check_input_features(k, g, f"gsq layer {name} ({per_rank})", per_rank=k != input_size)
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
        layer.params_dtype = params_dtype  # the activations' dtype, for the kernel choice (as vLLM's methods keep it)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        name = self.prefix or getattr(layer, "prefix", "")
        kernel = load_kernel(layer.qweight.data, layer.scales.data, self.fmt.bits, self.fmt.group_size,
                             layer.params_dtype, name)
        del layer.qweight
        del layer.scales
        layer.gsq_kernel = kernel
        # A plain attribute, not a parameter: vLLM code that needs a layer's float weight (MLA's
        # kv_b_proj, absorbed into attention at load) finds the device through `qweight` and then
        # calls `apply` on an identity matrix, which gives exactly the dequantized weight.
        layer.qweight = kernel.packed()[0].data

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` [..., K] -> [..., N] in x's dtype."""
        # forward, not __call__: a kernel has no hooks, and this runs for every layer on every step
        return layer.gsq_kernel.forward(x, bias)

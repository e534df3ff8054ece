"""``GSQMoEMethod``: how a vLLM MoE layer (``RoutedExperts``) holds and applies GSQ experts.

Parameters (per tensor-parallel rank; ``E`` local experts, ``H`` hidden size,
``I`` = ``intermediate_size_per_partition``, ``b`` storage bits, ``G`` group):

* ``w13_qweight`` int32 ``[E, 2I, H*b/32]``: gate (rows ``0:I``) and up
  (rows ``I:2I``) codes, packed along the input dim like the dense layers;
* ``w13_scales`` ``[E, 2I, H/G]``;
* ``w2_qweight`` int32 ``[E, H, I*b/32]``: down codes;
* ``w2_scales`` ``[E, H, I/G]``.

Checkpoints name them per expert, as the model does
(``...mlp.experts.3.gate_proj.qweight``, ``...experts.3.down_proj.scales``);
vLLM's expert loader maps those onto expert 3's slice, gate/up into the two
halves of ``w13`` (tensor parallel cuts them along the output dim) and down
into ``w2`` (cut along the packed input dim, so ``I`` per rank must hold whole
groups and whole words: checked here, naming the layer).

After loading, each expert is repacked once for the kernel the dense layers
would use (``GSQ_KERNEL``): the CPU bit-plane layout, or the CUDA kernel's
(real or emulated, self-checked like the dense layers). ``apply`` gets vLLM's
routing (``topk_weights``, ``topk_ids``), groups the tokens per expert and
runs gate/up, SiLU-and-mul, down and the weighted sum, expert by expert.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.utils import set_weight_attrs

from gsq_vllm import cpu_gemm
from gsq_format.format import FormatError, check_group_size, storage_bits
from gsq_vllm.linear import GSQLinearMethod


class GSQMoEMethod(FusedMoEMethodBase):
    """Weight-only GSQ experts with a gated SiLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, quant_config, moe, prefix: str = "") -> None:
        super().__init__(moe)
        self.quant_config = quant_config
        self.fmt = quant_config.fmt
        self.prefix = prefix
        # Kernel choice, repacking and the load-time self-check are the dense layers'.
        self._dense = GSQLinearMethod(quant_config, prefix)

    def _check_k(self, k: int, what: str, per_rank: bool) -> None:
        name = f"gsq experts {self.prefix} ({what}: {k} input features{' per rank' if per_rank else ''})"
        try:
            check_group_size(k, self.fmt.group_size, name)
        except FormatError as e:
            raise ValueError(f"{e}{'; or use a smaller tensor-parallel size' if per_rank else ''}") from None
        if k % 32:
            raise ValueError(f"{name}: must be a multiple of 32 (whole packed words)")

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        e, h, i = num_experts, hidden_size, intermediate_size_per_partition
        sb, g = self.fmt.storage_bits, self.fmt.group_size
        if self.moe.activation != MoEActivation.SILU or self.moe.has_bias:
            raise ValueError(f"gsq experts {self.prefix}: only bias-free SiLU-gated experts are supported "
                             f"(this layer: {self.moe.activation.value}, bias {self.moe.has_bias})")
        self._check_k(h, "gate/up", per_rank=False)
        self._check_k(i, "down", per_rank=self.moe.tp_size > 1)
        extra_weight_attrs.update({"quant_method": FusedMoeWeightScaleSupported.GROUP.value, "is_transposed": False})
        shapes = {
            "w13_qweight": ((e, 2 * i, h * sb // 32), torch.int32),
            "w13_scales": ((e, 2 * i, h // g), self.fmt.torch_scale_dtype),
            "w2_qweight": ((e, h, i * sb // 32), torch.int32),
            "w2_scales": ((e, h, i // g), self.fmt.torch_scale_dtype),
        }
        for name, (shape, dtype) in shapes.items():
            p = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, p)
            set_weight_attrs(p, extra_weight_attrs)
        layer.gsq_h, layer.gsq_i = h, i
        layer.gsq_act_dtype = params_dtype

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig | None:
        return FusedMoEQuantConfig.make()  # weight-only: no activation quantization for vLLM to do

    def _repack(self, layer, name: str, qweight: torch.Tensor, scales: torch.Tensor, n: int, k: int):
        """One weight of every expert -> (kernel, per-expert packed tensors)."""
        probe = SimpleNamespace(gsq_n=n, gsq_k=k, gsq_act_dtype=layer.gsq_act_dtype, prefix=f"{self.prefix}.{name}")
        bits, g = self.fmt.bits, self.fmt.group_size
        kernel = self._dense._choose_kernel(probe, qweight)
        if kernel != "cpu":
            from gsq_vllm import cuda_gemm

            packed = [cuda_gemm.repack(qweight[x], scales[x], bits, g, dtype=layer.gsq_act_dtype)
                      for x in range(qweight.shape[0])]
            if self._dense._kernel_passes_selfcheck(probe, kernel, qweight[0], scales[0], *packed[0]):
                return kernel, [(b, s) for b, s in packed]
        out = []
        for x in range(qweight.shape[0]):
            lo, hi = cpu_gemm.repack_for_cpu(qweight[x].cpu(), bits, g)
            out.append((lo.to(qweight.device), hi.to(qweight.device), scales[x].contiguous()))
        return "cpu", out

    def process_weights_after_loading(self, layer) -> None:
        h, i = layer.gsq_h, layer.gsq_i
        kernel13, w13 = self._repack(layer, "w13", layer.w13_qweight.data, layer.w13_scales.data, 2 * i, h)
        kernel2, w2 = self._repack(layer, "w2", layer.w2_qweight.data, layer.w2_scales.data, h, i)
        layer.gsq_kernels = (kernel13, kernel2)
        # Plain lists of tensors (not parameters): apply indexes them per expert.
        layer.gsq_w13, layer.gsq_w2 = w13, w2
        for name in ("w13_qweight", "w13_scales", "w2_qweight", "w2_scales"):
            delattr(layer, name)

    def _gemm(self, kernel: str, x: torch.Tensor, packed, n: int, k: int) -> torch.Tensor:
        if kernel == "cpu":
            lo, hi, s = packed
            return torch.ops.gsq.cpu_gemm(x, lo, hi, s, storage_bits(self.fmt.bits), self.fmt.group_size)
        return self._dense._gemm(kernel, x, packed[0], packed[1], n, k)

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        """``x`` [M, H]; ``topk_weights`` [M, k] fp32; ``topk_ids`` [M, k] global expert ids ->
        routed output [M, H] in x's dtype (vLLM adds shared experts and reduces across ranks)."""
        h, i = layer.gsq_h, layer.gsq_i
        ids = topk_ids.long()
        expert_map = getattr(layer, "expert_map", None)
        if expert_map is not None:  # expert parallel: global -> local id, -1 = another rank's
            ids = expert_map[ids].long()
        if getattr(layer, "apply_router_weight_on_input", False):
            raise NotImplementedError("gsq experts: apply_router_weight_on_input is not supported")
        out = torch.zeros(x.shape[0], h, dtype=torch.float32, device=x.device)
        for e in ids.unique().tolist():
            if e < 0:
                continue
            tok, slot = (ids == e).nonzero(as_tuple=True)
            xe = x[tok].contiguous()
            gate_up = self._gemm(layer.gsq_kernels[0], xe, layer.gsq_w13[e], 2 * i, h)
            act = (F.silu(gate_up[:, :i].float()) * gate_up[:, i:].float()).to(x.dtype)
            y = self._gemm(layer.gsq_kernels[1], act, layer.gsq_w2[e], h, i)
            out.index_add_(0, tok, y.float() * topk_weights[tok, slot].float().unsqueeze(1))
        return out.to(x.dtype)

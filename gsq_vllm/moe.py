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

After loading, each of the two weights gets its kernel the way a dense layer
does (:func:`gsq_vllm.kernels.load_kernel`: ``GSQ_KERNEL``, self-checked on
expert 0), every expert repacked once and stacked: ``layer.gsq_w13`` and
``layer.gsq_w2``, submodules holding the packed tensors as parameters.
``apply`` gets vLLM's routing (``topk_weights``, ``topk_ids``), groups the
tokens per expert and runs gate/up, SiLU-and-mul, down and the weighted sum,
expert by expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.utils import set_weight_attrs

from gsq_vllm.kernels import load_kernel
from gsq_vllm.linear import check_input_features


class GSQMoEMethod(FusedMoEMethodBase):
    """Weight-only GSQ experts with a gated SiLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, quant_config, moe, prefix: str = "") -> None:
        super().__init__(moe)
        self.quant_config = quant_config
        self.fmt = quant_config.fmt
        self.prefix = prefix

    def _check_k(self, k: int, what: str, per_rank: bool) -> None:
        name = f"gsq experts {self.prefix} ({what}: {k} input features{' per rank' if per_rank else ''})"
        check_input_features(k, self.fmt.group_size, name, per_rank)

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
        layer.params_dtype = params_dtype  # the activations' dtype, for the kernel choice

    def get_fused_moe_quant_config(self, layer) -> FusedMoEQuantConfig | None:
        return FusedMoEQuantConfig.make()  # weight-only: no activation quantization for vLLM to do

    def process_weights_after_loading(self, layer) -> None:
        for w in ("w13", "w2"):  # [E, N, K*b/32]: gate/up N = 2I, K = H; down N = H, K = I
            kernel = load_kernel(getattr(layer, f"{w}_qweight").data, getattr(layer, f"{w}_scales").data,
                                 self.fmt.bits, self.fmt.group_size, layer.params_dtype, f"{self.prefix}.{w}")
            delattr(layer, f"{w}_qweight")
            delattr(layer, f"{w}_scales")
            setattr(layer, f"gsq_{w}", kernel)

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        """``x`` [M, H]; ``topk_weights`` [M, k] fp32; ``topk_ids`` [M, k] global expert ids ->
        routed output [M, H] in x's dtype (vLLM adds shared experts and reduces across ranks)."""
        w13, w2 = layer.gsq_w13, layer.gsq_w2
        h, i = w2.n, w2.k
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
            gate_up = w13.forward(xe, expert=e)
            act = (F.silu(gate_up[:, :i].float()) * gate_up[:, i:].float()).to(x.dtype)
            y = w2.forward(act, expert=e)
            out.index_add_(0, tok, y.float() * topk_weights[tok, slot].float().unsqueeze(1))
        return out.to(x.dtype)

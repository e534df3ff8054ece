"""``GSQConfig``: vLLM's view of a GSQ checkpoint's ``quantization_config``.

All validation is delegated to :class:`gsq_format.format.GSQQuantConfig` (the
single owner of the format) so vLLM, ``gsq-serve`` and the quantizer agree
on what a valid checkpoint is. Imports vLLM: only load through the plugin.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

from gsq_format.format import QUANT_METHOD, FormatError, GSQQuantConfig, is_excluded

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def _moe_layer_types() -> tuple[type, ...]:
    # vLLM 0.32 names the expert weights layer RoutedExperts; older ones FusedMoE.
    import vllm.model_executor.layers.fused_moe as fused_moe

    return tuple(getattr(fused_moe, n) for n in ("RoutedExperts", "FusedMoE") if hasattr(fused_moe, n))


def _is_router(layer: torch.nn.Module, prefix: str) -> bool:
    """An MoE router (vLLM's GateLinear, or a replicated linear named like one)."""
    try:
        from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
    except ImportError:
        GateLinear = ()
    return isinstance(layer, GateLinear) or prefix.rsplit(".", 1)[-1] in ROUTER_NAMES


class GSQConfig(QuantizationConfig):
    """Weight-only 2/3-bit (and ternary) group-wise symmetric quantization.

    ``fmt``: the validated :class:`GSQQuantConfig` (bits, group_size,
    modules_to_not_convert, scale_dtype).
    """

    def __init__(self, fmt: GSQQuantConfig) -> None:
        super().__init__()
        self.fmt = fmt

    def __repr__(self) -> str:
        return f"GSQConfig(bits={self.fmt.bits}, group_size={self.fmt.group_size})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # The Marlin-style CUDA kernel uses sm_80 async copies and bf16 MMA.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GSQConfig":
        try:
            fmt = GSQQuantConfig.from_dict(config)
        except FormatError as e:
            raise ValueError(f"invalid gsq quantization_config: {e}") from None
        return cls(fmt)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, _moe_layer_types()):
            if is_excluded(prefix, self.fmt.modules_to_not_convert):
                from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod

                return UnquantizedFusedMoEMethod(layer.moe_config)
            from gsq_vllm.moe import GSQMoEMethod

            return GSQMoEMethod(self, layer.moe_config, prefix)
        if isinstance(layer, LinearBase):
            # Routers stay in the checkpoint's float dtype: the format never quantizes them.
            if is_excluded(prefix, self.fmt.modules_to_not_convert) or _is_router(layer, prefix):
                from gsq_vllm.dense import GSQDenseLinearMethod

                return GSQDenseLinearMethod()
            from gsq_vllm.linear import GSQLinearMethod

            return GSQLinearMethod(self, prefix)
        if isinstance(layer, VocabParallelEmbedding):  # embed_tokens and lm_head: never quantized
            from gsq_vllm.dense import GSQDenseEmbeddingMethod

            return GSQDenseEmbeddingMethod()
        return None

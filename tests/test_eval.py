import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantize.cli import main as quantize_main
from quantize.data import load_split, tokenize_sequences
from quantize.eval_cli import main as eval_main
from quantize.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", layers=2)


def test_eval_bf16_matches_transformers_loss(tiny, tmp_path, capsys):
    js = tmp_path / "ppl.json"
    assert eval_main([str(tiny), "--nsamples", "3", "--seqlen", "32", "--json", str(js), "--no-progress"]) == 0
    row = json.loads(js.read_text())[0]
    # independent reference: transformers' own loss on the same held-out windows
    tok = AutoTokenizer.from_pretrained(str(tiny))
    ids = tokenize_sequences(load_split("wikipedia", "eval"), tok, 32, 3)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert row["kind"] == "bf16"
    assert math.isclose(row["ppl"], math.exp(loss), rel_tol=1e-4)
    assert "ppl" in capsys.readouterr().out


def test_eval_table_bf16_vs_quantized(tiny, tmp_path, capsys):
    q = tmp_path / "q3"
    assert quantize_main(["--model", str(tiny), "--out", str(q), "--method", "gptq", "--bits", "3",
                          "--group-size", "32", "--nsamples", "4", "--seqlen", "64"]) == 0
    capsys.readouterr()
    js = tmp_path / "ppl.json"
    assert eval_main([str(tiny), str(q), "--nsamples", "2", "--seqlen", "32", "--json", str(js), "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(js.read_text())
    assert [r["kind"] for r in rows] == ["bf16", "gptq-3b-g32"]
    assert str(q) in out and all(math.isfinite(r["ppl"]) for r in rows)
    assert rows[0]["ppl"] != rows[1]["ppl"]


def test_dense_int8_quality_benchmark_scores_both_heads(tiny, tmp_path):
    """benchmarks/dense_int8_quality.py: the float-head perplexity is gsq-eval's, and the int8
    head (gsq::cpu_dense_int8) moves it a little and keeps nearly every top-1 token."""
    from benchmarks.dense_int8_quality import main as quality_main
    from gsq_vllm import cpu_gemm

    if not cpu_gemm.cpp_kernel_available():
        pytest.skip("gsq_vllm._C_cpu not built")

    js, ev = tmp_path / "q.json", tmp_path / "ppl.json"
    quality_main([str(tiny), "--nsamples", "2", "--seqlen", "64", "--threads", "1", "--json", str(js)])
    assert eval_main([str(tiny), "--nsamples", "2", "--seqlen", "64", "--json", str(ev), "--no-progress"]) == 0
    row = json.loads(js.read_text())["rows"][0]
    assert math.isclose(row["ppl_float_head"], json.loads(ev.read_text())[0]["ppl"], rel_tol=1e-5)
    assert row["ppl_int8_head"] != row["ppl_float_head"]  # the int8 head really ran
    assert abs(row["ppl_change"]) < 0.02 and row["top1_agreement"] > 0.9, row


def test_tl_quality_benchmark_scores_three_ways(tiny, tmp_path):
    """benchmarks/tl_quality.py: the quantized linears really run on gsq::cpu_gemm (the fused way
    agrees with the dequantized float model to bf16 precision, not bit for bit), and the tables
    really run (their KL from fused is not zero) and keep nearly every top-1 token."""
    from benchmarks.tl_quality import main as tl_quality_main
    from gsq_vllm import cpu_gemm

    if not cpu_gemm.cpp_kernel_available() or not cpu_gemm._cpp.supported_tl():
        pytest.skip("gsq_vllm._C_cpu not built, or no table-lookup kernel on this CPU")
    q = tmp_path / "q2"
    assert quantize_main(["--model", str(tiny), "--out", str(q), "--method", "rtn", "--bits", "2",
                          "--group-size", "32"]) == 0
    js = tmp_path / "tl.json"
    tl_quality_main([str(q), "--nsamples", "2", "--seqlen", "64", "--rows", "5", "--threads", "1", "--json", str(js)])
    out = json.loads(js.read_text())
    rows = {r["way"]: r for r in out["rows"]}
    assert out["tables"] in cpu_gemm._cpp.supported_tl()
    assert rows["fused"]["kl_from_fused"] == 0 and 0 < rows["float"]["kl_from_fused"] < 1e-3
    assert 0 < rows["tables"]["kl_from_fused"] < 0.05 and rows["tables"]["top1_agreement_with_fused"] > 0.9, rows

"""lm-eval through the server agrees with lm-eval on the same checkpoint offline (slow).

benchmarks/lm_eval_served.py on the tiny 2-bit checkpoint: lm-eval's local-completions model
against gsq-serve (our CPU kernels) and lm-eval's hf model on the checkpoint dequantized by
quantize.evaluate, both float32, on a local loglikelihood_rolling task over held-out text.
They must agree within 1 % in word perplexity (float32 rounding only; measured 0.1 %).
"""

import json

import pytest

pytest.importorskip("vllm", reason="vllm not installed")
pytest.importorskip("lm_eval", reason="lm-eval not installed")
import plugin_tiny  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_served_and_offline_lm_eval_agree(tmp_path, monkeypatch):
    from benchmarks import lm_eval_served

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    tok = plugin_tiny.make_tokenizer_dir(tmp_path / "tok")
    plugin_tiny.make_tiny_checkpoint(tmp_path / "ckpt", tok, bits=2, group_size=32)
    out = tmp_path / "lm_eval.json"
    rc = lm_eval_served.main([str(tmp_path / "ckpt"), "--docs", "3", "--max-length", "256",
                              "--server-args", "--max-model-len 512 --dtype float32 --enforce-eager",
                              "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    for metric in ("word_perplexity", "byte_perplexity"):
        assert res["served"][metric] == pytest.approx(res["offline"][metric], rel=0.01), metric
    assert res["offline"]["byte_perplexity"] > 1

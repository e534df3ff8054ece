"""The embedded default model (SmolLM2-135M-Instruct, hidden 576) through the real pipeline."""


import pytest

from gsq_format.format import checkpoint_bits_per_weight
from quantize.cli import main as quantize_main


def test_default_model_rejects_group_128_before_any_work(tmp_path, capsys):
    rc = quantize_main(["--model", "default", "--out", str(tmp_path / "out"), "--group-size", "128"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "does not divide its 576" in err[-1]
    assert not any("block 1/" in line for line in err)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["2", "3"])
def test_default_model_rtn_checkpoint_size(tmp_path, bits):
    out = tmp_path / "q"
    # The 41-point "mse" scale search, not the default 80x2(x2)-point |e|^2.4 one: the size does not
    # depend on it, and on 2 AVX2 cores the default search alone takes 2-3 min of this model
    # (tests/test_rtn_gptq.py checks that search).
    assert quantize_main(["--model", "default", "--out", str(out), "--method", "rtn", "--bits", bits,
                          "--group-size", "64", "--nsamples", "2", "--seqlen", "64", "--scale-search", "mse"]) == 0
    bpw, n = checkpoint_bits_per_weight(out)
    # per block: q, o [576, 576]; k, v [192, 576] (3 kv heads x 64); gate, up, down 576 x 1536
    assert n == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert abs(bpw - (int(bits) + 16 / 64)) / (int(bits) + 16 / 64) < 0.02

"""Every bad input: one clear error line on stderr, exit code != 0, no checkpoint at --out."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from quantize.cli import main as quantize_main
from quantize.eval_cli import main as eval_main
from quantize.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", layers=1)


@pytest.fixture
def model(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "model")


def _quantize(model, out, *extra):
    return quantize_main(["--model", str(model), "--out", str(out), "--method", "gptq", "--group-size", "32",
                          "--nsamples", "2", "--seqlen", "32", *extra])


def _check_failed(rc, capsys, out, pattern):
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert err and err[-1].startswith("gsq-quantize: error:") and pattern in err[-1], err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_missing_model_folder(tmp_path, capsys):
    _check_failed(_quantize(tmp_path / "nope", tmp_path / "out"), capsys, tmp_path / "out", "does not exist")


def test_missing_safetensors(model, tmp_path, capsys):
    (model / "model.safetensors").unlink()
    _check_failed(_quantize(model, tmp_path / "out"), capsys, tmp_path / "out", "no .safetensors")


def test_truncated_safetensors(model, tmp_path, capsys):
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _check_failed(_quantize(model, tmp_path / "out"), capsys, tmp_path / "out", "corrupt or truncated")


def test_corrupt_safetensors_header(model, tmp_path, capsys):
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"#" * 32
    f.write_bytes(bytes(data))
    _check_failed(_quantize(model, tmp_path / "out"), capsys, tmp_path / "out", "corrupt or truncated")


def test_unknown_architecture(model, tmp_path, capsys):
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    _check_failed(_quantize(model, tmp_path / "out"), capsys, tmp_path / "out", "not supported")


@pytest.mark.parametrize("bits", ["4", "8", "abc"])
def test_unsupported_bits(model, tmp_path, capsys, bits):
    _check_failed(_quantize(model, tmp_path / "out", "--bits", bits), capsys, tmp_path / "out", "bits must be")


def test_group_size_not_dividing_k(model, tmp_path, capsys):
    # tiny hidden size is 64: G=128 cannot divide the attention inputs
    rc = quantize_main(["--model", str(model), "--out", str(tmp_path / "out"), "--group-size", "128"])
    _check_failed(rc, capsys, tmp_path / "out", "does not divide its 64")


def test_nan_weights(model, tmp_path, capsys):
    f = model / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    _check_failed(_quantize(model, tmp_path / "out"), capsys, tmp_path / "out", "NaN or Inf")


def test_empty_calibration_text(model, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _check_failed(_quantize(model, tmp_path / "out", "--calib", str(empty)), capsys, tmp_path / "out", "no text")


def test_eval_rejects_corrupt_checkpoint(model, tmp_path, capsys):
    out = tmp_path / "q"
    assert _quantize(model, out) == 0
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    capsys.readouterr()
    rc = eval_main([str(out), "--nsamples", "1", "--seqlen", "16", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith("gsq-eval: error:") and "corrupt or truncated" in err[-1]

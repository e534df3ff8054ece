"""End-to-end scale tuning (quantize/e2e.py, gsq-quantize --e2e-epochs)."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from gsq_format.format import read_quant_config
from quantize.cli import main as quantize_main
from quantize.data import load_split, tokenize_sequences
from quantize.e2e import GroupScaledLinear, kl_from_teacher, logits
from quantize.evaluate import load_model
from quantize.tiny import build_tiny_llama, build_tiny_moe

ARGS = ["--method", "gptq", "--bits", "2", "--group-size", "32", "--nsamples", "16", "--seqlen", "64"]


def _kl_on(folder_float, folder_q, ids):
    """KL(float || quantized) over ``ids`` through transformers' own forward of both checkpoints."""
    ref, _ = load_model(folder_float)
    q, _ = load_model(folder_q)
    with torch.no_grad():
        return kl_from_teacher(q(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float()).item()


def test_group_scaled_linear_is_codes_times_scales():
    torch.manual_seed(0)
    codes = torch.randint(-2, 2, (6, 64), dtype=torch.int8)
    scales = torch.rand(6, 2) + 0.5
    m = GroupScaledLinear(codes, scales)
    with torch.no_grad():
        m.rel.copy_(torch.randn(6, 2) * 0.1)
    w = codes.float() * (scales * (1 + m.rel.detach())).repeat_interleave(32, dim=1)
    x = torch.randn(3, 64)
    torch.testing.assert_close(m(x), x @ w.t())


def test_e2e_lowers_the_kl_and_keeps_every_code(tmp_path):
    tiny = build_tiny_llama(tmp_path / "model", layers=2)
    assert quantize_main(["--model", str(tiny), "--out", str(tmp_path / "plain"), *ARGS]) == 0
    assert quantize_main(["--model", str(tiny), "--out", str(tmp_path / "e2e"), *ARGS,
                          "--e2e-epochs", "6", "--e2e-lr", "1e-2"]) == 0
    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "e2e" / "model.safetensors"))
    assert a.keys() == b.keys()
    qweights = [k for k in a if k.endswith(".qweight")]
    assert qweights and all(torch.equal(a[k], b[k]) for k in qweights)  # the codes are GPTQ's
    moved = [k for k in a if k.endswith(".scales") and not torch.equal(a[k], b[k])]
    assert len(moved) == len(qweights)  # every linear's scales trained
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith(".scales"))
    assert read_quant_config(tmp_path / "e2e").quantizer["e2e_epochs"] == 6
    assert "end-to-end scales, epoch 6/6: mean KL" in (tmp_path / "e2e.log").read_text()  # progress, in a file too
    # On the calibration windows, what the stage minimises, the tuned checkpoint is closer to the float
    # model. (On held-out text this random model gains little: docs/results/quality.md measures SmolLM2 instead.)
    ids = tokenize_sequences(load_split("wikipedia", "calib"), AutoTokenizer.from_pretrained(str(tiny)), 64, 16)
    assert _kl_on(tiny, tmp_path / "e2e", ids) < 0.85 * _kl_on(tiny, tmp_path / "plain", ids)


def test_tune_checkpoint_is_the_stage_on_a_finished_checkpoint(tmp_path):
    """quantize.e2e.tune_checkpoint (benchmarks/quality.py's ``+e2e``): the same stage as
    --e2e-epochs, run on a finished checkpoint: codes kept, scales as the pipeline's stage trains them
    (up to the stored scales' bf16 rounding at the start), the KL lowered, the stage recorded."""
    from quantize.e2e import E2EOptions, tune_checkpoint

    tiny = build_tiny_llama(tmp_path / "model", layers=2)
    assert quantize_main(["--model", str(tiny), "--out", str(tmp_path / "plain"), *ARGS]) == 0
    assert quantize_main(["--model", str(tiny), "--out", str(tmp_path / "e2e"), *ARGS,
                          "--e2e-epochs", "6", "--e2e-lr", "1e-2"]) == 0
    ids = tokenize_sequences(load_split("wikipedia", "calib"), AutoTokenizer.from_pretrained(str(tiny)), 64, 16)
    tune_checkpoint(tiny, tmp_path / "plain", tmp_path / "tuned", ids, E2EOptions(epochs=6, lr=1e-2, batch_size=4),
                    seed=0, log=lambda m: None)
    a, b, c = (load_file(str(tmp_path / f / "model.safetensors")) for f in ("plain", "tuned", "e2e"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith(".scales"))
    scales = [k for k in a if k.endswith(".scales")]
    assert scales and all(not torch.equal(a[k], b[k]) for k in scales)
    for k in scales:  # the pipeline's stage and this one agree to well within what the stage moves
        moved = (c[k].float() - a[k].float()).abs().max()
        diff = (b[k].float() - c[k].float()).abs()
        assert diff.max() < 0.15 * moved and (diff / c[k].float().abs()).max() < 2 ** -6, k  # 2-4 bf16 ulps
    assert read_quant_config(tmp_path / "tuned").quantizer["e2e"]["epochs"] == 6
    assert _kl_on(tiny, tmp_path / "tuned", ids) < 0.85 * _kl_on(tiny, tmp_path / "plain", ids)


def test_e2e_forward_matches_transformers(tmp_path):
    """The stage's own forward (embedding, blocks through call_block, norm, head) is transformers' forward."""
    tiny = build_tiny_llama(tmp_path / "model", layers=2)
    model, _ = load_model(tiny)
    with torch.device("cpu"):
        rotary = type(model.model.rotary_emb)(config=model.config)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(logits(model, rotary, ids), model(input_ids=ids).logits.float())


def test_e2e_is_refused_for_moe_before_any_work(tmp_path, capsys):
    folder = build_tiny_moe(tmp_path / "m", "qwen3_moe", layers=2, seed=0)
    rc = quantize_main(["--model", str(folder), "--out", str(tmp_path / "q"), *ARGS, "--e2e-epochs", "1"])
    assert rc == 2
    assert "end-to-end scale tuning is for dense models" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_bad_e2e_settings_are_refused_before_any_work(tmp_path, capsys):
    tiny = build_tiny_llama(tmp_path / "model", layers=1)
    for bad in (["--e2e-epochs", "-1"], ["--e2e-epochs", "1", "--e2e-lr", "0"]):
        assert quantize_main(["--model", str(tiny), "--out", str(tmp_path / "q"), *ARGS, *bad]) == 2
        assert "--e2e-epochs must be >= 0 and --e2e-lr > 0" in capsys.readouterr().err
        assert not (tmp_path / "q").exists()


class Killed(Exception):
    pass


def test_run_killed_in_the_e2e_stage_resumes_to_the_same_checkpoint(tmp_path):
    from quantize.e2e import E2EOptions
    from quantize.pipeline import BlockPipeline
    from quantize.settings import QuantizeSettings

    model = build_tiny_llama(tmp_path / "model", layers=2)
    ids = tokenize_sequences(load_split("wikipedia", "calib"), AutoTokenizer.from_pretrained(str(model)), 64, 8)
    settings = QuantizeSettings(method="gptq", bits=2, group_size=32, nsamples=8, seqlen=64, e2e=E2EOptions(epochs=2))
    ref = BlockPipeline(model, tmp_path / "ref", settings, log=lambda m: None)
    ref.check()
    ref.run(ids)

    def kill_after_epoch_1(msg):
        if "end-to-end scales, epoch 1/" in msg:
            raise Killed

    work = tmp_path / "work"
    first = BlockPipeline(model, tmp_path / "out", settings, work_dir=work, log=kill_after_epoch_1)
    first.check()
    with pytest.raises(Killed):
        first.run(ids)
    assert not (tmp_path / "out").exists() and not (work / "e2e_scales.safetensors").exists()
    msgs = []
    second = BlockPipeline(model, tmp_path / "out", settings, work_dir=work, log=msgs.append)
    second.check()
    second.run(ids)
    assert any("resuming at block 2" in m for m in msgs)  # no block quantized again, the stage run again
    assert sum("end-to-end scales, epoch" in m for m in msgs) == 2
    assert (tmp_path / "ref" / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()

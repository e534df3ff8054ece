import json

import pytest
import torch
from safetensors.torch import load_file

from gsq_format.format import checkpoint_bits_per_weight, read_quant_config, unpack_codes
from quantize.cli import main as quantize_main
from quantize.evaluate import load_model
from quantize.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", layers=2)


ARGS = ["--nsamples", "4", "--seqlen", "64"]


@pytest.mark.parametrize("method,bits,g", [("rtn", "2", 32), ("gptq", "3", 64), ("gptq", "1.58", 32)])
def test_quantize_tiny_end_to_end(tiny, tmp_path, method, bits, g):
    out = tmp_path / "q"
    rc = quantize_main(["--model", str(tiny), "--out", str(out), "--method", method, "--bits", bits,
                        "--group-size", str(g), *ARGS])
    assert rc == 0
    qcfg = read_quant_config(out)
    assert qcfg.method == method and qcfg.group_size == g
    tensors = load_file(str(out / "model.safetensors"))
    src = load_file(str(tiny / "model.safetensors"))
    # every linear inside blocks quantized, embeddings and norms copied bit for bit
    for name, t in src.items():
        prefix = name[: -len(".weight")]
        if name.startswith("model.layers.") and "norm" not in name:
            assert f"{prefix}.qweight" in tensors and name not in tensors
        else:
            assert torch.equal(tensors[name], t)
    bpw, _ = checkpoint_bits_per_weight(out)
    expected = qcfg.storage_bits + 16 / g
    assert abs(bpw - expected) / expected < 0.02
    # quantized weights are close to the originals (relative error of a 2/3-bit grid)
    w = src["model.layers.0.mlp.up_proj.weight"].float()
    codes = unpack_codes(tensors["model.layers.0.mlp.up_proj.qweight"], qcfg.bits)
    deq = codes.float().reshape(w.shape[0], -1, g) * tensors["model.layers.0.mlp.up_proj.scales"].float().unsqueeze(-1)
    rel = (deq.reshape_as(w) - w).norm() / w.norm()
    assert rel < 0.8
    model, kind = load_model(out)
    assert kind == f"{method}-{bits}b-g{g}"
    assert torch.allclose(model.model.layers[0].mlp.up_proj.weight, deq.reshape_as(w), atol=1e-6)
    assert not (out.parent / ".q.work").exists()


def test_skip_attention_and_modules_to_not_convert(tiny, tmp_path):
    out = tmp_path / "q"
    assert quantize_main(["--model", str(tiny), "--out", str(out), "--method", "rtn", "--group-size", "32",
                          "--skip-attention", "--modules-to-not-convert", "down_proj", *ARGS]) == 0
    names = load_file(str(out / "model.safetensors")).keys()
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert "model.layers.1.mlp.up_proj.qweight" in names
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {"self_attn", "down_proj", "lm_head"} <= set(cfg["modules_to_not_convert"])


def test_gptq_beats_rtn_on_tiny_block_outputs(tiny, tmp_path, capsys):
    errs = {}
    for m in ("rtn", "gptq"):
        assert quantize_main(["--model", str(tiny), "--out", str(tmp_path / m), "--method", m, "--bits", "2",
                              "--group-size", "32", "--nsamples", "8", "--seqlen", "64"]) == 0
        log = capsys.readouterr().err
        errs[m] = [float(l.rsplit(" ", 1)[1]) for l in log.splitlines() if "rel. output MSE" in l]
    assert errs["gptq"][0] < errs["rtn"][0]


@pytest.mark.parametrize("method,extra", [("gptq", ["--no-act-order", "--no-refit-scales"]), ("gptq", ["--true-sequential"]),
                                          ("gptq", ["--e2e-epochs", "1"]),
                                          ("gsq", ["--preset", "fast", "--gsq-epochs", "1"]),
                                          ("gsq", ["--bits", "3", "--preset", "fast", "--gsq-epochs", "1"])])
def test_every_tensor_has_an_explicit_device(tiny, tmp_path, method, extra):
    # The GPU path (--device cuda) cannot run here. With torch's default device set to meta, any
    # tensor the pipeline creates without naming its device lands on meta and the run fails
    # (meta tensors have no data), so a run that matches the plain one is the check we can do.
    args = ["--model", str(tiny), "--method", method, "--bits", "2", "--group-size", "32", *ARGS, *extra]
    assert quantize_main([*args, "--out", str(tmp_path / "plain"), "--device", "cpu"]) == 0
    torch.set_default_device("meta")
    try:
        rc = quantize_main([*args, "--out", str(tmp_path / "meta"), "--device", "cpu"])
    finally:
        torch.set_default_device(None)
    assert rc == 0
    a, b = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "meta" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_device_flag_refuses_absent_or_unknown_devices(tiny, tmp_path, capsys):
    args = ["--model", str(tiny), "--method", "rtn", *ARGS]
    assert quantize_main([*args, "--out", str(tmp_path / "a"), "--device", "tpu"]) == 2
    assert "--device must be" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert quantize_main([*args, "--out", str(tmp_path / "b"), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("method,extra", [("gptq", []), ("gsq", ["--preset", "fast", "--gsq-epochs", "1"])])
def test_activations_spilled_to_disk_give_the_same_checkpoint(tiny, tmp_path, capsys, method, extra):
    args = ["--model", str(tiny), "--method", method, "--bits", "2", "--group-size", "32", *ARGS, *extra]
    assert quantize_main([*args, "--out", str(tmp_path / "mem"), "--activation-budget", "100"]) == 0
    assert "exceed the budget" not in capsys.readouterr().err
    assert quantize_main([*args, "--out", str(tmp_path / "disk"), "--activation-budget", "0"]) == 0
    assert "exceed the budget" in capsys.readouterr().err
    a, b = load_file(str(tmp_path / "mem" / "model.safetensors")), load_file(str(tmp_path / "disk" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".disk.work").exists()


def test_gsq_trains_on_its_subset_while_hessians_use_all(tiny, tmp_path):
    args = ["--model", str(tiny), "--method", "gsq", "--bits", "2", "--group-size", "32", "--nsamples", "6",
            "--seqlen", "64", "--preset", "fast", "--gsq-epochs", "1"]
    assert quantize_main([*args, "--out", str(tmp_path / "sub"), "--gsq-nsamples", "2"]) == 0
    logs = json.loads((tmp_path / "sub" / "gsq_logs.json").read_text())
    assert {blk["total_steps"] for blk in logs.values()} == {2}   # 1 epoch x 2 sequences, batch 1
    assert quantize_main([*args, "--out", str(tmp_path / "all")]) == 0
    full = json.loads((tmp_path / "all" / "gsq_logs.json").read_text())
    assert {blk["total_steps"] for blk in full.values()} == {6}
    assert quantize_main([*args, "--out", str(tmp_path / "bad"), "--gsq-nsamples", "7"]) == 2


def test_gsq_held_out_sequences_are_scored_not_trained_on(tiny, tmp_path, capsys):
    args = ["--model", str(tiny), "--method", "gsq", "--bits", "2", "--group-size", "32", "--nsamples", "6",
            "--seqlen", "64", "--preset", "fast", "--gsq-epochs", "2", "--gsq-nsamples", "2"]
    assert quantize_main([*args, "--out", str(tmp_path / "h"), "--gsq-held-out", "3", "--gsq-token-norm-cap", "10"]) == 0
    logs = json.loads((tmp_path / "h" / "gsq_logs.json").read_text())
    for blk in logs.values():
        assert blk["total_steps"] == 4 and len(blk["held_out_mse"]) == 3   # init + 2 epochs
        assert blk["options"]["token_norm_cap"] == 10 and blk["median_token_norm2"] > 0
        assert blk["held_out_mse"][blk["chosen"]] == min(blk["held_out_mse"])
    report = json.loads((tmp_path / "h" / "report.json").read_text())
    for b in report["blocks"]:  # the report's "final" is the codes kept, not the last epoch's
        blk = logs[f"model.layers.{b['index']}"]
        assert b["gsq_final_mse"] == blk["hard_mse"][blk["chosen"]]
    for bad in ("5", "-1"):  # 2 trained + 5 > 6 sequences; negative
        assert quantize_main([*args, "--out", str(tmp_path / "bad"), "--gsq-held-out", bad]) == 2
        assert "--gsq-held-out must be" in capsys.readouterr().err
    assert quantize_main([*args, "--out", str(tmp_path / "bad"), "--gsq-token-norm-cap", "0"]) == 2
    assert "--gsq-token-norm-cap must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cholesky_rows_give_the_hessian_weighted_error():
    from quantize.gsq import cholesky_rows

    torch.manual_seed(0)
    x = torch.randn(300, 64)
    hess = x.t() @ x
    dw = torch.randn(16, 64)
    rows = cholesky_rows(hess, 0.01, 8)
    assert rows.shape == (8, 8, 64)
    damped = hess + 0.01 * hess.diagonal().mean() * torch.eye(64)
    got = sum((r @ dw.t()).pow(2).sum() for r in rows)
    torch.testing.assert_close(got, torch.trace(dw @ damped @ dw.t()), rtol=1e-4, atol=1e-3)


def _weight_space_problem(n=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, k, generator=g) @ (torch.eye(k) + torch.randn(k, k, generator=g) / k ** 0.5)
    return torch.randn(n, k, generator=g) / k ** 0.5, x.t() @ x


def _weighted_error(w, q, hess, damp):
    dw = w - q.dequantize()
    return torch.trace(dw @ (hess + damp * hess.diagonal().mean() * torch.eye(hess.shape[0])) @ dw.t()).item()


def test_weight_space_refine_minimises_the_hessian_weighted_error():
    from quantize.gsq import GSQOptions
    from quantize.gsq import refine_weight_space
    from quantize.rtn import rtn_quantize

    w, hess = _weight_space_problem()
    start = rtn_quantize(w, 2, 32)
    q, log = refine_weight_space(w, hess, start, GSQOptions(epochs=8, batch_size=1, micro_batch_size=1,
                                                            lr_logits=1e-3), seed=0, damp=0.01, pieces=8)
    # the loss GSQ saw is exactly tr(dW H dW^T) (no bias, no forward pass), per output element
    assert log["hard_mse"][0] * w.numel() == pytest.approx(_weighted_error(w, start, hess, 0.01), rel=1e-4)
    assert _weighted_error(w, q, hess, 0.01) < _weighted_error(w, start, hess, 0.01) and log["chosen"] > 0


def test_ternary_random_init_starts_from_no_prior_and_beats_rtn():
    from quantize.gsq import GSQOptions
    from quantize.gsq import refine_weight_space, ternary_random_options
    from quantize.rtn import rtn_quantize

    opts = ternary_random_options(GSQOptions(**{"epochs": 2, "batch_size": 1, "micro_batch_size": 1,
                                                "lr_logits": 3e-4}), steps=400, pieces=8)
    assert (opts.alpha, opts.tau_start, opts.epochs, opts.batch_size) == (0.0, 4.0, 50, 1)
    w, hess = _weight_space_problem()
    start = rtn_quantize(w, 1.58, 32)
    q, log = refine_weight_space(w, hess, start, opts, seed=0, damp=0.01, pieces=8)
    assert log["total_steps"] == 400 and log["scored_epochs"][log["chosen"]] == opts.epochs  # the last epoch's codes
    assert _weighted_error(w, q, hess, 0.01) < _weighted_error(w, start, hess, 0.01)
    # strength 0: what it found is its own, not RTN's codes moved a little
    assert (q.codes != start.codes).float().mean() > 0.1


def test_ternary_random_init_in_the_pipeline(tiny, tmp_path, capsys):
    args = ["--model", str(tiny), "--method", "gsq", "--bits", "1.58", "--group-size", "32", *ARGS,
            "--preset", "fast", "--gsq-epochs", "1", "--gsq-ternary-init", "random", "--gsq-ternary-init-steps", "64"]
    assert quantize_main([*args, "--out", str(tmp_path / "r")]) == 0
    assert quantize_main([*args[:-4], "--out", str(tmp_path / "g")]) == 0
    a, b = load_file(str(tmp_path / "r" / "model.safetensors")), load_file(str(tmp_path / "g" / "model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a if k.endswith("qweight"))
    assert read_quant_config(tmp_path / "r").quantizer["ternary_init"] == "random"
    for bad in (["--bits", "2"], ["--method", "gptq"]):
        assert quantize_main([*args, *bad, "--out", str(tmp_path / "bad")]) == 2
        assert "--gsq-ternary-init random needs" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_reference_attention_mode(tiny, tmp_path):
    """q/k by weight-space GSQ, v/o on the attention output, then the MLP with Hessians taken
    through the quantized attention: the attention left in the block is the quantized one."""
    from quantize.activations import ActivationSpace
    from quantize.gsq import GSQOptions, refine_block
    from quantize.pipeline import BlockPipeline
    from quantize.settings import GSQSettings, QuantizeSettings

    s = QuantizeSettings(method="gsq", bits=2, group_size=32, nsamples=4, seqlen=64,
                         gsq=GSQSettings(options=GSQOptions(epochs=1, batch_size=1, micro_batch_size=1),
                                         attention_mode="reference"))
    pipe = BlockPipeline(tiny, tmp_path / "q", s)
    pipe.check()
    block = pipe.reader.load_into(pipe.layers[0], "model.layers.0").eval()
    space = ActivationSpace((4, 64, 64), torch.device("cpu"), tmp_path, 1 << 30)
    x = space.new("inputs")
    x[0:4] = torch.randn(4, 64, 64)
    rotary = type(pipe.model.model.rotary_emb)(config=pipe.model.config)
    pos_emb = rotary(x[0:1], torch.arange(64).unsqueeze(0))
    result = {}
    logs, float_targets = pipe._quantize_attention_first(block, pipe.names[0], x, pos_emb, space, result,
                                                         refine_block, 0)
    assert sorted(result) == sorted(f"self_attn.{p}_proj" for p in "qkvo")
    assert logs["self_attn.q_proj"]["names"] == ["self_attn.q_proj"] and logs["v_o"]["names"] == [
        "self_attn.v_proj", "self_attn.o_proj"]
    assert logs["self_attn.q_proj"]["total_steps"] == 32  # Cholesky rows in 32 pieces, batch 1, 1 epoch
    for n, q in result.items():
        assert torch.equal(block.get_submodule(n).weight, q.dequantize())
    assert float_targets.shape == (4, 64, 64)
    # and through the CLI: the MLP's GSQ log carries the attention runs
    assert quantize_main(["--model", str(tiny), "--out", str(tmp_path / "cli"), "--method", "gsq", "--bits", "2",
                          "--group-size", "32", *ARGS, "--preset", "fast", "--gsq-epochs", "1",
                          "--attention-mode", "reference"]) == 0
    cli_logs = json.loads((tmp_path / "cli" / "gsq_logs.json").read_text())
    assert cli_logs["model.layers.1"]["names"] == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert set(cli_logs["model.layers.1"]["attention"]) == {"self_attn.q_proj", "self_attn.k_proj", "v_o"}


def _one_block(tiny, tmp_path, **start):
    """(pipeline, float block 0, its inputs, rotary embeddings, activation space) for a tiny GPTQ run."""
    from quantize.activations import ActivationSpace
    from quantize.pipeline import BlockPipeline
    from quantize.settings import QuantizeSettings, StartSettings

    s = QuantizeSettings(method="gptq", bits=2, group_size=32, nsamples=4, seqlen=64, start=StartSettings(**start))
    pipe = BlockPipeline(tiny, tmp_path / "q", s)
    pipe.check()
    block = pipe.reader.load_into(pipe.layers[0], "model.layers.0").eval().float()
    space = ActivationSpace((4, 64, 64), torch.device("cpu"), tmp_path, 1 << 30)
    x = space.new("inputs")
    x[0:4] = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(0))
    rotary = type(pipe.model.model.rotary_emb)(config=pipe.model.config)
    return pipe, block, x, rotary(x[0:1], torch.arange(64).unsqueeze(0)), space


def test_hessians_of_linears_reading_one_tensor_are_accumulated_once_and_equal_each_linears_own(tiny, tmp_path):
    from quantize.block_forward import run_block_with_hessians

    pipe, block, x, pos_emb, _ = _one_block(tiny, tmp_path)
    names = pipe.names[0]
    # the reference: every linear's own input, hooked separately, one sum of x x^T per linear
    seen = {n: [] for n in names}
    hooks = [block.get_submodule(n).register_forward_hook(
        lambda mod, inp, out, n=n: seen[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).clone()))
        for n in names]
    with torch.no_grad():
        for b in range(0, 4, 3):  # the same batches as below: [0:3] and [3:4]
            block(x[b:b + 3], attention_mask=None, position_embeddings=pos_emb)
    for h in hooks:
        h.remove()
    _, hess, counts = run_block_with_hessians(block, names, x, pos_emb, 3, None)
    for n in names:
        a = torch.cat(seen[n])
        assert counts[n] == a.shape[0] == 4 * 64, n
        assert torch.allclose(hess[n], a.t() @ a, rtol=1e-5, atol=1e-3), n
    q, k, v = (hess[f"self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v and hess["mlp.gate_proj"] is hess["mlp.up_proj"]
    assert hess["self_attn.o_proj"] is not q and hess["mlp.down_proj"] is not hess["mlp.gate_proj"]


def test_true_sequential_takes_each_stage_hessian_after_the_earlier_stages_are_quantized(tiny, tmp_path):
    import copy

    from quantize.block_forward import linear_stages, run_block, run_block_with_hessians
    from quantize.gptq import gptq_quantize

    pipe, block, x, pos_emb, space = _one_block(tiny, tmp_path, true_sequential=True, act_order=False,
                                                refit_scales=False)
    float_block = copy.deepcopy(block)
    names = pipe.names[0]
    stages = linear_stages(block, names, x[0:1], pos_emb)
    assert [sorted(st) for st in stages] == [sorted(f"self_attn.{p}_proj" for p in "qkv"), ["self_attn.o_proj"],
                                              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    result, errors = {}, {}
    targets, _ = pipe._quantize_block(block, 0, names, x, pos_emb, space, None, result, errors, {})
    # the targets are the float block's outputs, not those of the partly quantized block
    assert torch.allclose(targets[0:4], run_block(float_block, x, pos_emb, 4, space.new("t"))[0:4], atol=1e-5)
    # each stage's codes are GPTQ on the Hessian of a block whose earlier stages hold their codes
    check = copy.deepcopy(float_block)
    for stage in stages:
        _, hess, _ = run_block_with_hessians(check, stage, x, pos_emb, 4, None)
        for n in stage:
            w = float_block.get_submodule(n).weight.data
            assert torch.equal(result[n].codes, gptq_quantize(w, hess[n], 2, 32).codes), n
        with torch.no_grad():
            for n in stage:
                check.get_submodule(n).weight.copy_(result[n].dequantize())
    # and not the float block's Hessians, which the default takes for every linear
    _, float_hess, _ = run_block_with_hessians(float_block, ["mlp.down_proj"], x, pos_emb, 4, None)
    w = float_block.get_submodule("mlp.down_proj").weight.data
    assert not torch.equal(result["mlp.down_proj"].codes, gptq_quantize(w, float_hess["mlp.down_proj"], 2, 32).codes)


def test_refit_scales_keeps_gptq_codes_and_lowers_the_block_error(tiny, tmp_path, capsys):
    args = ["--model", str(tiny), "--method", "gptq", "--bits", "2", "--group-size", "32", *ARGS]
    errs, tensors = {}, {}
    for tag, extra in (("plain", ["--no-refit-scales"]), ("refit", [])):
        assert quantize_main([*args, "--out", str(tmp_path / tag), *extra]) == 0
        errs[tag] = [float(ln.rsplit(" ", 1)[1]) for ln in capsys.readouterr().err.splitlines()
                     if "rel. output MSE" in ln]
        tensors[tag] = load_file(str(tmp_path / tag / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # block 0: same inputs, so the same GPTQ codes
    assert torch.equal(tensors["plain"][f"{name}.qweight"], tensors["refit"][f"{name}.qweight"])
    assert not torch.equal(tensors["plain"][f"{name}.scales"], tensors["refit"][f"{name}.scales"])
    assert errs["refit"][0] < errs["plain"][0]


def test_progress_bars_on_a_terminal_only(tiny, tmp_path):
    """On a terminal: a per-block bar (with rate/ETA) and a per-step GSQ bar; piped: only log lines."""
    import os
    import pty
    import subprocess
    import sys

    def cmd(out):
        return [sys.executable, "-c", "import sys; from quantize.cli import main; sys.exit(main())", "--model",
                str(tiny), "--out", str(tmp_path / out), "--method", "gsq", "--bits", "2", "--group-size", "32",
                *ARGS, "--preset", "fast", "--gsq-epochs", "1"]

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(cmd("tty"), stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(120) == 0
    tty = b"".join(chunks).decode(errors="replace")
    assert "gsq-quantize:" in tty and ("block/s" in tty or "s/block" in tty), tty[-2000:]
    assert "GSQ:" in tty and ("step/s" in tty or "s/step" in tty)
    assert "[gsq-quantize] block 2/2" in tty  # log lines still printed, above the bar
    piped = subprocess.run(cmd("piped"), capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0
    assert "block/s" not in piped.stderr and "s/block" not in piped.stderr and "step/s" not in piped.stderr
    assert "[gsq-quantize] block 2/2" in piped.stderr
    # the same lines, time-stamped, in <out>.log, which a run in the background can be followed by
    logged = (tmp_path / "piped.log").read_text()
    assert "[gsq-quantize] block 2/2" in logged and "gsq-quantize: wrote" in logged

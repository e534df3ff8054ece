"""GSQ unit tests: fast, synthetic data, CPU only."""

import argparse
import json

import pytest
import torch
import torch.nn as nn

from gsq_format.format import grid_range, pack_codes, unpack_codes
from quantize.cli import add_gsq_arguments, gsq_options_from_args
from quantize.gsq import (PRESETS, GSQOptions, GumbelGridLinear, SoftWeightFunction, cosine_lr_factor,
                          hardened_init, linear_schedule, refine_block, soft_weight)
from gsq_format.qtypes import QuantizedWeight

BITS = [2, 3, 1.58]


def rtn(weight: torch.Tensor, bits, group_size: int) -> QuantizedWeight:
    """Round-to-nearest, absmax scale per group: the GPTQ-free init of these tests."""
    qmin, qmax = grid_range(bits)
    wg = weight.reshape(weight.shape[0], -1, group_size)
    scales = wg.abs().amax(-1).clamp_min(1e-8) / max(-qmin, qmax)
    codes = torch.clamp(torch.round(wg / scales[..., None]), qmin, qmax)
    return QuantizedWeight(codes.reshape(weight.shape).to(torch.int8), scales.float(), bits,
                           group_size)


class OneLinearBlock(nn.Module):
    """A "transformer block" that is one linear: the least-squares layer problem."""

    def __init__(self, k: int, n: int):
        super().__init__()
        self.proj = nn.Linear(k, n)

    def forward(self, x):
        return self.proj(x)


def ls_problem(k=128, n=32, samples=32, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    block = OneLinearBlock(k, n)
    with torch.no_grad():
        block.proj.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
        block.proj.bias.copy_(torch.randn(n, generator=g) * 0.1)
    # correlated features: a random mixing matrix on top of the identity
    mix = torch.eye(k) + torch.randn(k, k, generator=g) / k ** 0.5
    inputs = torch.randn(samples, seq, k, generator=g) @ mix
    with torch.no_grad():
        targets = block(inputs)
    return block, inputs, targets


def test_schedules_hit_endpoints():
    total = 37
    assert linear_schedule(2.0, 0.05, 0, total) == pytest.approx(2.0)
    assert linear_schedule(2.0, 0.05, total - 1, total) == pytest.approx(0.05)
    assert linear_schedule(100, 500, total - 1, total) == pytest.approx(500)
    vals = [linear_schedule(2.0, 0.05, s, total) for s in range(total)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    assert cosine_lr_factor(0, total, 0.1) == pytest.approx(1.0)
    assert cosine_lr_factor(total - 1, total, 0.1) == pytest.approx(0.1)


def test_refine_block_reports_progress_to_log():
    block, inputs, targets = ls_problem(k=64, n=8, samples=8, seq=4)
    init = {"proj": rtn(block.proj.weight.detach(), 2, 32)}
    lines = []
    refine_block(block, block, ["proj"], init, inputs, targets, GSQOptions(epochs=2, batch_size=4), seed=1,
                 progress=lines.append, log_seconds=0.0)
    assert [line.split(",")[0] for line in lines] == [f"[gsq-quantize]   GSQ step {s}/4" for s in (1, 2, 3, 4)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compute_dtype_runs_the_training_forward_under_autocast(dtype):
    block, inputs, targets = ls_problem(k=64, n=8, samples=8, seq=4)
    init = {"proj": rtn(block.proj.weight.detach(), 2, 32)}
    seen = []

    def forward(x):
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        seen.append((torch.is_grad_enabled(), bf16))
        return block(x)

    _, log = refine_block(block, forward, ["proj"], init, inputs, targets,
                          GSQOptions(epochs=1, batch_size=4, compute_dtype=dtype), seed=1)
    training = [bf16 for grad, bf16 in seen if grad]
    assert training == [dtype == "bfloat16"] * len(log["steps"])
    assert not any(bf16 for grad, bf16 in seen if not grad)  # hard errors are scored in float32
    assert GSQOptions(compute_dtype="auto").autocast_dtype(torch.device("cpu")) == (
        torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else None)


@pytest.mark.parametrize("bits", [2, 3])
def test_hardened_init_prices_the_init_noise(bits):
    # The argmax of the reference's initial logits moves a few % of the codes off GPTQ's (its
    # N(0,1) term against a prior gap of 0.5 * alpha); without that term it is GPTQ's exactly.
    block, _, _ = ls_problem(k=256, n=64)
    init = {"proj": rtn(block.proj.weight.detach(), bits, 32)}
    noisy = hardened_init(block, ["proj"], init, GSQOptions(), seed=3)["proj"].codes
    clean = hardened_init(block, ["proj"], init, GSQOptions(init_noise=0.0), seed=3)["proj"].codes
    assert torch.equal(clean, init["proj"].codes)
    flipped = (noisy != init["proj"].codes).float().mean().item()
    assert 0.005 < flipped < 0.06, flipped


def test_refine_block_logs_schedule_endpoints():
    block, inputs, targets = ls_problem(k=64, n=8, samples=8, seq=4)
    init = {"proj": rtn(block.proj.weight.detach(), 2, 32)}
    opts = GSQOptions(epochs=2, batch_size=4)
    _, log = refine_block(block, block, ["proj"], init, inputs, targets, opts, seed=1)
    steps = log["steps"]
    assert len(steps) == log["total_steps"] == 4
    assert steps[0]["tau"] == pytest.approx(opts.tau_start)
    assert steps[-1]["tau"] == pytest.approx(opts.tau_end)
    assert steps[0]["kappa"] == pytest.approx(opts.kappa_start)
    assert steps[-1]["kappa"] == pytest.approx(opts.kappa_end)
    assert steps[0]["lr_logits"] == pytest.approx(opts.lr_logits)
    assert steps[-1]["lr_logits"] == pytest.approx(opts.lr_logits * opts.min_lr_ratio)
    assert len(log["hard_mse"]) == 2 and log["scored_epochs"] == [0, opts.epochs]  # no held-out: init and last
    json.dumps(log)
    assert isinstance(block.proj, nn.Linear)   # originals restored


@pytest.mark.parametrize("bits", BITS)
def test_soft_weight_equals_argmax_weight_at_zero_temperature(bits):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=gen)
    init = rtn(w, bits, 32)
    layer = GumbelGridLinear(nn.Linear(64, 16), init, std=0.01, alpha=6.0, generator=gen)
    with torch.no_grad():   # random logits so argmax differs from the init
        layer.logits.normal_(0.0, 1.0, generator=gen)
    layer.tau, layer.kappa = 1e-3, 1e9   # kappa * logit gaps >> Gumbel noise (<~25)
    soft = layer.weight().detach()
    hard = layer.hardened()
    torch.testing.assert_close(soft, hard.dequantize(), rtol=0, atol=1e-5)
    assert not torch.equal(hard.codes, init.codes)


def test_three_bit_local_shift_stays_in_int3():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=gen)
    w[:, ::7] *= 10.0    # many codes at the grid ends -4 and 3
    init = rtn(w, 3, 64)
    assert int(init.codes.min()) == -4 and int(init.codes.max()) == 3
    layer = GumbelGridLinear(nn.Linear(128, 32), init, std=0.01, alpha=6.0, generator=gen)
    with torch.no_grad():   # push the off-grid shifts hardest: they must still lose
        layer.logits.copy_(torch.randn(layer.logits.shape, generator=gen))
        layer.logits[0] += 100.0
        layer.logits[4] += 100.0
    codes = layer.hard_codes()
    assert int(codes.min()) >= -4 and int(codes.max()) <= 3
    assert (codes.int() - init.codes.int()).abs().max() <= 2
    layer.tau, layer.kappa = 0.05, 500.0
    soft_codes = layer.weight().detach() / layer.scales.detach().repeat_interleave(64, 1)
    assert float(soft_codes.min()) >= -4 - 1e-4 and float(soft_codes.max()) <= 3 + 1e-4


@pytest.mark.parametrize("bits", BITS)
def test_gsq_beats_its_init_on_least_squares_layer(bits):
    block, inputs, targets = ls_problem()
    init = {"proj": rtn(block.proj.weight.detach(), bits, 32)}
    opts = GSQOptions(epochs=25, batch_size=8, keep_best=False)
    result, log = refine_block(block, block, ["proj"], init, inputs, targets, opts, seed=0)

    def out_mse(q):
        with torch.no_grad():
            out = nn.functional.linear(inputs, q.dequantize(), block.proj.bias)
        return nn.functional.mse_loss(out, targets).item()

    init_mse, gsq_mse = out_mse(init["proj"]), out_mse(result["proj"])
    assert gsq_mse < init_mse, (bits, init_mse, gsq_mse, log["hard_mse"])
    assert log["hard_mse"][0] == pytest.approx(init_mse, rel=1e-4)
    assert log["hard_mse"][-1] == pytest.approx(gsq_mse, rel=1e-4) and not log["kept_init"]
    lo, hi = grid_range(bits)
    assert int(result["proj"].codes.min()) >= lo and int(result["proj"].codes.max()) <= hi


def _out_mse(block, q, inputs, targets):
    with torch.no_grad():
        out = nn.functional.linear(inputs, q.dequantize(), block.proj.bias)
    return nn.functional.mse_loss(out, targets).item()


def test_held_out_set_picks_the_init_when_training_moves_away_from_it():
    # Held-out targets that the init's own weight produces exactly: the init has zero held-out
    # error, every trained epoch more, so the init must come back although training improved.
    block, inputs, targets = ls_problem()
    init = {"proj": rtn(block.proj.weight.detach(), 2, 32)}
    held_inputs = inputs[:8] + 0.1
    with torch.no_grad():
        held_targets = nn.functional.linear(held_inputs, init["proj"].dequantize(), block.proj.bias)
    opts = GSQOptions(epochs=6, batch_size=8, lr_logits=1e-3)
    result, log = refine_block(block, block, ["proj"], init, inputs, targets, opts, seed=0,
                               held_out=(held_inputs, held_targets))
    assert log["hard_mse"][-1] < log["hard_mse"][0]           # training did improve
    assert len(log["held_out_mse"]) == opts.epochs + 1 and log["held_out_mse"][0] == pytest.approx(0, abs=1e-12)
    assert log["chosen"] == 0 and log["kept_init"]
    assert torch.equal(result["proj"].codes, init["proj"].codes)


def test_held_out_set_picks_the_best_epoch():
    block, inputs, targets = ls_problem()
    init = {"proj": rtn(block.proj.weight.detach(), 2, 32)}
    held = (inputs[:16] * 1.1, targets[:16] * 1.1 - block.proj.bias * 0.1)  # same layer, other inputs
    opts = GSQOptions(epochs=4, batch_size=8, lr_logits=1e-3)
    result, log = refine_block(block, block, ["proj"], init, inputs, targets, opts, seed=0, held_out=held)
    scores = log["held_out_mse"]
    assert log["chosen"] == min(range(len(scores)), key=scores.__getitem__) and log["chosen"] > 0
    assert _out_mse(block, result["proj"], *held) == pytest.approx(min(scores), rel=1e-4)
    assert _out_mse(block, result["proj"], inputs, targets) == pytest.approx(log["hard_mse"][log["chosen"]], rel=1e-4)
    # without keep_best the last epoch's codes come back whatever the held-out set says
    last, log_last = refine_block(block, block, ["proj"], init, inputs, targets,
                                  GSQOptions(epochs=4, batch_size=8, lr_logits=1e-3, keep_best=False), seed=0, held_out=held)
    assert log_last["chosen"] == 4
    assert _out_mse(block, last["proj"], *held) == pytest.approx(scores[-1], rel=1e-4)


def test_token_weights_cap_only_the_outlier_tokens():
    from quantize.gsq import token_weights

    y = torch.ones(2, 5, 4)        # norm^2 4 each ...
    y[0, 0] *= 100.0               # ... but an attention-sink-like token: norm^2 40000
    y[1, 3] *= 2.0                 # 4x the median: under a cap of 10, untouched
    assert token_weights(y, None, 4.0) is None
    w = token_weights(y, 10.0, 4.0)
    assert w.shape == (2, 5, 1)
    assert w[0, 0, 0].item() == pytest.approx(10 * 4.0 / 40000.0)
    assert (w.flatten()[1:] == 1.0).all()
    assert (w[0, 0] * y[0, 0].pow(2).sum()).item() == pytest.approx(10 * 4.0)  # counts as 10 x the median


def test_token_norm_cap_enters_the_loss_and_the_scores():
    block, inputs, targets = ls_problem(samples=8)
    inputs[:, 0] *= 300.0          # position 0 of every sequence: outputs ~300x, error ~1e5x the rest
    with torch.no_grad():
        targets = block(inputs)
    init = {"proj": rtn(block.proj.weight.detach(), 2, 32)}
    opts = GSQOptions(epochs=1, batch_size=8, token_norm_cap=10.0)
    _, log = refine_block(block, block, ["proj"], init, inputs, targets, opts, seed=0)
    norm2 = targets.pow(2).sum(-1, keepdim=True)
    median = float(norm2.flatten().median())
    assert log["median_token_norm2"] == pytest.approx(median, rel=1e-5)
    w = (10.0 * median / norm2).clamp(max=1.0)
    with torch.no_grad():
        err = (nn.functional.linear(inputs, init["proj"].dequantize(), block.proj.bias) - targets).pow(2)
    assert log["hard_mse"][0] == pytest.approx(float((err * w).sum() / err.numel()), rel=1e-4)
    plain = float(err.mean())
    assert plain > 100 * log["hard_mse"][0]  # the sink tokens were most of the plain MSE


@pytest.mark.parametrize("bits", BITS)
def test_hardened_codes_pack_round_trip(bits):
    block, inputs, targets = ls_problem(k=64, n=8, samples=4, seq=4)
    init = {"proj": rtn(block.proj.weight.detach(), bits, 32)}
    result, _ = refine_block(block, block, ["proj"], init, inputs, targets,
                             GSQOptions(epochs=1, batch_size=2), seed=3)
    codes = result["proj"].codes
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits).to(torch.int8), codes)


def test_refine_block_is_deterministic_for_a_seed():
    block, inputs, targets = ls_problem(k=64, n=8, samples=8, seq=4)
    init = {"proj": rtn(block.proj.weight.detach(), 2, 32)}
    opts = GSQOptions(epochs=2, batch_size=4)
    a, la = refine_block(block, block, ["proj"], init, inputs, targets, opts, seed=5)
    b, lb = refine_block(block, block, ["proj"], init, inputs, targets, opts, seed=5)
    assert torch.equal(a["proj"].codes, b["proj"].codes)
    assert torch.equal(a["proj"].scales, b["proj"].scales)
    assert la["steps"] == lb["steps"]


@pytest.mark.parametrize("bits", BITS)
def test_regenerated_noise_gives_same_gradients_as_stored_noise(bits):
    gen = torch.Generator().manual_seed(0)
    init = rtn(torch.randn(16, 64, generator=gen), bits, 32)
    layer = GumbelGridLinear(nn.Linear(64, 16), init, std=0.5, alpha=1.0, generator=gen)
    layer.tau, layer.kappa = 0.7, 2.0
    upstream = torch.randn(16, 64, generator=gen)
    cfg = layer.soft_cfg()
    grads = []
    for store in (False, True):
        logits = layer.logits.detach().clone().requires_grad_(True)
        scales = layer.scales.detach().clone().requires_grad_(True)
        noise_gen = torch.Generator().manual_seed(42)
        w = SoftWeightFunction.apply(logits, scales, noise_gen, cfg, store)
        torch.randn(1000, generator=noise_gen)   # the generator moves on before backward
        (w * upstream).sum().backward()
        grads.append((w.detach(), logits.grad, scales.grad))
    # plain autograd on the same noise: the reference both variants must match
    from quantize.gsq import NoiseSource
    gen42 = torch.Generator().manual_seed(42)
    noise = NoiseSource(layer.kind, layer.logits.shape, gen42).draw(gen42)
    logits = layer.logits.detach().clone().requires_grad_(True)
    scales = layer.scales.detach().clone().requires_grad_(True)
    w = soft_weight(cfg[0], logits, scales, cfg[1], cfg[2], noise, *cfg[3:6])
    (w * upstream).sum().backward()
    for got in grads:
        torch.testing.assert_close(got[0], w.detach())
        torch.testing.assert_close(got[1], logits.grad)
        torch.testing.assert_close(got[2], scales.grad)
    assert logits.grad.abs().sum() > 0


def test_regeneration_saves_less_for_backward():
    gen = torch.Generator().manual_seed(0)
    init = rtn(torch.randn(64, 256, generator=gen), 2, 64)
    layer = GumbelGridLinear(nn.Linear(256, 64), init, std=0.01, alpha=6.0, generator=gen)
    saved = {}
    for store in (False, True):
        layer.store_noise = store
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer.weight()
        saved[store] = total[0]
    noise_bytes = layer.logits.numel() * 4
    assert saved[True] - saved[False] == noise_bytes


def test_cli_presets_and_overrides():
    parser = argparse.ArgumentParser()
    add_gsq_arguments(parser)
    paper = gsq_options_from_args(parser.parse_args([]))
    assert paper == GSQOptions(**PRESETS["paper"])
    fast = gsq_options_from_args(parser.parse_args(["--preset", "fast"]))
    assert fast.epochs < paper.epochs
    custom = gsq_options_from_args(parser.parse_args(
        ["--preset", "fast", "--gsq-epochs", "3", "--gsq-tau", "1.0", "0.1", "--gsq-store-noise"]))
    assert (custom.epochs, custom.tau_start, custom.tau_end, custom.store_noise) == (3, 1.0, 0.1, True)
    with pytest.raises(ValueError):
        gsq_options_from_args(parser.parse_args(["--gsq-epochs", "0"]))


def test_options_from_spec_overrides_a_preset_with_typed_fields():
    from gsq_format.format import FormatError
    from quantize.gsq import options_from_spec

    o = options_from_spec("fast,epochs=4,lr_logits=2e-4,init_noise=0,logits_dtype=bfloat16,keep_best=0")
    assert o == GSQOptions(**{**PRESETS["fast"], "epochs": 4, "lr_logits": 2e-4, "init_noise": 0.0,
                              "logits_dtype": "bfloat16", "keep_best": False})
    assert isinstance(o.epochs, int)
    for bad in ("nopreset", "fast,nofield=1", "fast,epochs=two", "fast,lion_betas=1"):
        with pytest.raises(FormatError):
            options_from_spec(bad)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from quantize.tiny import build_tiny_llama
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", hidden=64,
                            intermediate=128, layers=2)


@pytest.mark.parametrize("bits", [2, 1.58])
def test_pipeline_gsq_improves_on_gptq_per_block(tiny_model, tmp_path, bits):
    """Through the real block pipeline: each block's hard output MSE after GSQ is below the
    GPTQ init's on the same (propagated) inputs, and the checkpoint passes the format checks."""
    from gsq_format.format import check_quantized_tensors, load_tensors, read_quant_config
    from quantize.pipeline import BlockPipeline
    from quantize.settings import GSQSettings, QuantizeSettings

    options = GSQOptions(epochs=8, batch_size=4, lr_logits=3e-3, lr_scales=2e-4, keep_best=False)
    settings = QuantizeSettings(method="gsq", bits=bits, group_size=32, nsamples=8, seqlen=32,
                                batch_size=4, gsq=GSQSettings(options=options))
    ids = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
    pipe = BlockPipeline(tiny_model, tmp_path / "out", settings, log=lambda *a: None)
    pipe.check()
    out = pipe.run(ids)
    logs = json.loads((out / "gsq_logs.json").read_text())
    assert sorted(logs) == ["model.layers.0", "model.layers.1"]
    for prefix, log in logs.items():
        assert log["hard_mse"][-1] < log["hard_mse"][0], (prefix, log["hard_mse"])
    cfg = read_quant_config(out)
    tensors = load_tensors(out)
    prefixes = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    assert len(prefixes) == 2 * 7   # q,k,v,o,gate,up,down in both blocks
    for prefix in prefixes:
        check_quantized_tensors(prefix, tensors[prefix + ".qweight"], tensors[prefix + ".scales"], cfg)


def test_micro_batches_accumulate_to_the_same_step():
    # Peaked logits (alpha huge) make the soft weight the init whatever the Gumbel noise, so one
    # Lion step over 4 sequences must be the same taken whole or as 4 accumulated micro-batches.
    block, inputs, targets = ls_problem(k=64, n=8, samples=4, seq=4)
    init = {"proj": rtn(block.proj.weight.detach(), 2, 32)}
    runs = {}
    for micro in (4, 1):
        calls = []

        def forward(x):
            calls.append(x.shape[0])
            return block(x)

        opts = GSQOptions(epochs=1, batch_size=4, micro_batch_size=micro, alpha=1e4, keep_best=False)
        runs[micro] = refine_block(block, forward, ["proj"], init, inputs, targets, opts, seed=2)
        assert runs[micro][1]["total_steps"] == 1
        assert sorted(set(calls[1:-1])) == [micro]   # between the two hard-MSE passes
    (whole, log_whole), (parts, log_parts) = runs[4], runs[1]
    assert log_parts["steps"][0]["soft_mse"] == pytest.approx(log_whole["steps"][0]["soft_mse"], rel=1e-5)
    assert not torch.equal(whole["proj"].scales, init["proj"].scales)
    torch.testing.assert_close(parts["proj"].scales, whole["proj"].scales, rtol=0, atol=0)


def test_cli_micro_batch_size_overrides_preset_and_is_checked():
    p = argparse.ArgumentParser()
    add_gsq_arguments(p)
    fast = gsq_options_from_args(p.parse_args(["--preset", "fast", "--gsq-micro-batch-size", "1", "--gsq-batch-size", "2"]))
    assert (fast.batch_size, fast.micro_batch_size) == (2, 1)
    assert gsq_options_from_args(p.parse_args(["--logits-dtype", "bf16"])).logits_dtype == "bfloat16"
    with pytest.raises(ValueError, match="micro-batch"):
        gsq_options_from_args(p.parse_args(["--gsq-micro-batch-size", "0"]))


def test_bf16_logits_train_and_beat_the_init():
    block, inputs, targets = ls_problem()
    init = {"proj": rtn(block.proj.weight.detach(), 2, 32)}
    gen = torch.Generator().manual_seed(0)
    layer = GumbelGridLinear(block.proj, init["proj"], std=0.01, alpha=6.0, generator=gen,
                             logits_dtype=torch.bfloat16)
    layer(inputs[:2]).square().sum().backward()
    assert layer.logits.dtype == layer.logits.grad.dtype == torch.bfloat16
    assert layer.logits.grad.abs().sum() > 0
    # At lr 1e-4 bf16 logits lose to their init here: Lion's 1e-4 steps are below bf16's spacing
    # (2.4e-4 at |logit| 0.06) and round away. At 1e-3 they train about as well as float32.
    hard = {}
    for dtype in ("float32", "bfloat16"):
        opts = GSQOptions(epochs=25, batch_size=8, keep_best=False, logits_dtype=dtype, lr_logits=1e-3)
        _, log = refine_block(block, block, ["proj"], init, inputs, targets, opts, seed=0)
        hard[dtype] = log["hard_mse"]
    assert hard["bfloat16"][-1] < 0.6 * hard["bfloat16"][0]
    assert hard["bfloat16"][-1] < 1.1 * hard["float32"][-1]


@pytest.mark.parametrize("logistic", [False, True])
def test_cpu_noise_is_gumbel_or_logistic_and_a_function_of_its_key(logistic):
    from quantize.gsq import _CPU_EXT

    assert _CPU_EXT is not None, "quantize._C (csrc/quantize/gsq_soft.cpp) was not built"
    a = _CPU_EXT.noise([3, 1000, 700], 12345, logistic)
    assert torch.equal(a, _CPU_EXT.noise([3, 1000, 700], 12345, logistic))
    assert (a == _CPU_EXT.noise([3, 1000, 700], 12346, logistic)).float().mean() < 1e-3
    # Kolmogorov-Smirnov distance to the exact CDF over 2.1M draws (critical value ~1e-3).
    x, _ = a.double().flatten().sort()
    cdf = torch.sigmoid(x) if logistic else torch.exp(-torch.exp(-x))
    ecdf = torch.arange(1, x.numel() + 1, dtype=torch.float64) / x.numel()
    assert (cdf - ecdf).abs().max() < 2e-3
    # neighbouring elements are independent
    flat = a.flatten()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]) < 5e-3


def test_reference_ternary_style_is_the_references_logits_in_our_units():
    """--gsq-ternary-style reference: the reference's sign/mask logits l = std * (noise + 6 * [sign q,
    2|q| - 1]) entering its sigmoids as 2*kappa*l. Ours hold p = 2l and take kappa*p: the same soft
    weight, and one Lion step at (2 lr, wd / 2) on p is the reference's step at (lr, wd) on l."""
    from lion_pytorch import Lion

    from quantize.gsq import NoiseSource, soft_codes

    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    init = rtn(weight, 1.58, 32)
    lin = nn.Linear(64, 16, bias=False)
    opts = GSQOptions(ternary_style="reference")
    layer = GumbelGridLinear(lin, init, opts.init_std, opts.strength(1.58), torch.Generator().manual_seed(7),
                             ternary_style="reference")
    q = init.codes.float()
    noise0 = torch.randn((2, 16, 64), generator=torch.Generator().manual_seed(7))
    ref_logits = opts.init_std * (noise0 + 6.0 * torch.stack([torch.sign(q), 2 * q.abs() - 1]))
    torch.testing.assert_close(layer.logits.detach(), 2 * ref_logits)
    assert torch.equal(layer.hard_codes(), init.codes)  # the prior dominates the init noise

    kappa, tau = 250.0, 0.7
    noise = NoiseSource("ternary", (2, 16, 64), torch.Generator().manual_seed(0)).draw()
    ref_mask = torch.sigmoid((2 * kappa * ref_logits[1] + noise[1]) / tau)
    ref_sign = 2 * torch.sigmoid((2 * kappa * ref_logits[0] + noise[0]) / tau) - 1
    ours = soft_codes("ternary", layer.logits.detach(), None, None, noise, kappa, tau)
    torch.testing.assert_close(ours, ref_mask * ref_sign, rtol=1e-5, atol=1e-6)

    lr, wd = opts.logit_group(1.58)
    grad = torch.randn(2, 16, 64)
    p = nn.Parameter(layer.logits.detach().clone())
    ell = nn.Parameter(ref_logits.clone())
    p.grad, ell.grad = grad / 2, grad  # d/dp = (d/dl) / 2: the same signs for Lion
    Lion([p], lr=lr, weight_decay=wd).step()
    Lion([ell], lr=opts.lr_logits, weight_decay=opts.wd_logits).step()
    torch.testing.assert_close(p.detach(), 2 * ell.detach())
    ours_default = GSQOptions(ternary_style="ours")
    assert ours_default.logit_group(1.58) == (ours_default.lr_logits, ours_default.wd_logits)


def test_gsq_quantize_says_how_many_steps_a_block_takes(tmp_path):
    """A preset's regime depends on the training sequences: the run says its steps, and warns when
    steps256 is run with fewer sequences than it was measured with."""
    from quantize.cli import main as quantize_main
    from quantize.tiny import build_tiny_llama

    tiny = build_tiny_llama(tmp_path / "model", layers=1)
    out = tmp_path / "q"
    assert quantize_main(["--model", str(tiny), "--out", str(out), "--method", "gsq", "--group-size", "32",
                          "--nsamples", "8", "--seqlen", "32", "--preset", "steps256"]) == 0
    log = (tmp_path / "q.log").read_text()
    assert "GSQ: 8 training sequences, 16 Lion steps of 4 a block; --preset steps256 is measured" in log
    assert json.loads((out / "gsq_logs.json").read_text())["model.layers.0"]["total_steps"] == 16


def test_fused_lion_update_gives_lion_pytorchs_bits():
    """refine_block's Lion (csrc/quantize/lion.cpp on the CPU) must be lion_pytorch's update to the
    bit, so GSQ checkpoints do not depend on which one ran: several steps at changing learning rates,
    the first with part of the gradient zero (momentum and gradient 0 there: sign(0) = 0), on a size
    that is not a multiple of any vector width."""
    from lion_pytorch import Lion

    from quantize.gsq import _CPU_EXT, lion_optimizer

    assert _CPU_EXT is not None, "quantize._C was not built"
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(5, 37, 129, generator=gen) * 0.05
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    groups = lambda p: [{"params": [p], "lr": 2e-4, "weight_decay": 1.0}]  # noqa: E731
    opt_ours, opt_theirs = lion_optimizer(groups(ours), (0.9, 0.95)), Lion(groups(theirs), betas=(0.9, 0.95))
    for step in range(6):
        grad = torch.randn(start.shape, generator=gen) * 1e-3
        if step == 0:
            grad[0] = 0.0
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        for opt in (opt_ours, opt_theirs):
            opt.param_groups[0]["lr"] = 2e-4 * (1.0 - 0.15 * step)
            opt.step()
        assert torch.equal(ours.detach(), theirs.detach()), step
        assert torch.equal(opt_ours.state[ours]["exp_avg"], opt_theirs.state[theirs]["exp_avg"]), step
    assert not torch.equal(ours.detach(), start)

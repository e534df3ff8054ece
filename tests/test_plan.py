"""gsq-quantize --plan: the static memory/disk model checked against what the pipeline does."""

import json

import pytest
from safetensors import safe_open

from quantize.cli import main as quantize_main
from quantize.plan import PlanSettings, block_shapes, make_plan, read_config
from quantize.tiny import build_tiny_llama

ARGS = ["--nsamples", "4", "--seqlen", "64", "--group-size", "32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", layers=2)


def test_block_shapes_match_the_model_weights(tiny):
    cfg = read_config(tiny)
    shapes = {}
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            shapes[name] = tuple(f.get_slice(name).get_shape())
    for i, block in enumerate(block_shapes(cfg)):
        for li in block.linears:
            assert shapes[f"model.layers.{i}.{li.name}.weight"] == (li.n, li.k)
        linears = {n for n in shapes if n.startswith(f"model.layers.{i}.") and "norm" not in n}
        assert len(linears) == len(block.linears)


@pytest.mark.parametrize("bits,extra", [("2", []), ("3", ["--skip-attention"])])
def test_planned_checkpoint_size_is_the_written_one(tiny, tmp_path, bits, extra):
    args = ["--model", str(tiny), "--method", "rtn", "--bits", bits, *ARGS, *extra]
    assert quantize_main([*args, "--plan", "--plan-json", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert quantize_main([*args, "--out", str(tmp_path / "q")]) == 0
    written = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert abs(plan["disk"]["checkpoint"] - written) / written < 0.02
    quantized = 0   # packed codes and scales alone (the embedding dominates the total)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if name.endswith((".qweight", ".scales")):
                t = f.get_tensor(name)
                quantized += t.numel() * t.element_size()
    assert plan["disk"]["checkpoint: quantized linears"] == quantized


def test_spill_decision_matches_the_pipeline(tiny, tmp_path, capsys):
    cfg = read_config(tiny)
    act = 4 * 4 * 64 * cfg["hidden_size"]
    for budget, spills in ((3 * act, False), (3 * act - 1, True)):
        plan = make_plan(cfg, PlanSettings(method="rtn", nsamples=4, seqlen=64, group_size=32,
                                           activation_budget=budget))
        assert plan.spilled == spills
        out = tmp_path / f"q{budget}"
        assert quantize_main(["--model", str(tiny), "--method", "rtn", *ARGS, "--out", str(out),
                              "--activation-budget", str(budget / 2**30)]) == 0
        assert ("exceed the budget" in capsys.readouterr().err) == spills


def test_plan_reads_a_bare_config_and_refuses_a_bad_one(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert quantize_main(["--model", str(tmp_path), "--plan"]) == 2
    assert "config lacks" in capsys.readouterr().err

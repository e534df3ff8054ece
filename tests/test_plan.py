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


MOE_NAMES = {"mixtral": {"mlp.": "block_sparse_moe.", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def tiny_moe(request, tmp_path_factory):
    from quantize.tiny import build_tiny_moe

    arch = request.param
    folder = build_tiny_moe(tmp_path_factory.mktemp(arch) / "model", arch, layers=2, experts=4,
                            dense_layers=(0,) if arch != "mixtral" else ())
    return arch, folder


def test_moe_block_shapes_match_the_model_weights(tiny_moe):
    arch, folder = tiny_moe
    cfg = read_config(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    experts = 0
    for i, block in enumerate(block_shapes(cfg)):
        for li in block.linears:
            name = f"model.layers.{i}.{li.name}.weight"
            if li.name.startswith("mlp.experts") or li.name == "mlp.gate":
                for a, b in MOE_NAMES.get(arch, {}).items():
                    name = name.replace(a, b)
            experts += li.expert is not None
            assert shapes[name] == (li.n, li.k), name
        linears = {n for n in shapes if n.startswith(f"model.layers.{i}.") and "norm" not in n
                   and n.endswith(".weight")}  # Qwen2-MoE's q/k/v biases are not linears
        assert len(linears) == len(block.linears)
    assert experts == 3 * 4 * (1 if arch != "mixtral" else 2)


def test_planned_moe_checkpoint_size_and_spill_are_the_pipelines(tiny_moe, tmp_path, capsys):
    arch, folder = tiny_moe
    cfg = read_config(folder)
    args = ["--model", str(folder), "--method", "rtn", "--bits", "2", *ARGS]
    assert quantize_main([*args, "--plan", "--plan-json", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert quantize_main([*args, "--out", str(tmp_path / "q")]) == 0
    written = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert abs(plan["disk"]["checkpoint"] - written) / written < 0.02
    act = 4 * 4 * 64 * cfg["hidden_size"]
    for budget, spills in ((4 * act, False), (4 * act - 1, True)):  # a sparse block holds four
        assert make_plan(cfg, PlanSettings(method="rtn", nsamples=4, seqlen=64, group_size=32,
                                           activation_budget=budget)).spilled == spills
        capsys.readouterr()
        assert quantize_main([*args, "--out", str(tmp_path / f"q{budget}"),
                              "--activation-budget", str(budget / 2**30)]) == 0
        assert ("exceed the budget" in capsys.readouterr().err) == spills

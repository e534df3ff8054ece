import pytest
import torch

from quantize.data import load_split, tokenize_sequences
from quantize.pipeline import BlockPipeline
from quantize.settings import QuantizeSettings
from quantize.tiny import build_tiny_llama


class Killed(Exception):
    pass


def _ids(folder):
    from transformers import AutoTokenizer

    return tokenize_sequences(load_split("wikipedia", "calib"), AutoTokenizer.from_pretrained(str(folder)), 64, 4)


@pytest.mark.parametrize("method,budget", [("gptq", None), ("gptq", 0)])  # 0: activations in files
def test_killed_run_resumes_to_byte_identical_checkpoint(tmp_path, method, budget):
    model = build_tiny_llama(tmp_path / "model", layers=3)
    ids = _ids(model)
    settings = QuantizeSettings(method=method, bits=2, group_size=32, nsamples=4, seqlen=64, seed=3)

    ref = BlockPipeline(model, tmp_path / "ref", settings, log=lambda m: None)
    ref.check()
    ref.run(ids)

    seen = []

    def kill_in_block_3(msg):
        seen.append(msg)
        if "block 3/3" in msg:
            raise Killed  # dies after block 3 is computed, before it is saved

    work = tmp_path / "work"
    first = BlockPipeline(model, tmp_path / "out", settings, work_dir=work, log=kill_in_block_3,
                          activation_budget=budget)
    first.check()
    with pytest.raises(Killed):
        first.run(ids)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in work.glob("block-*")) == ["block-00000.safetensors", "block-00001.safetensors"]
    assert [p.name for p in work.glob("inputs-*")] == ["inputs-00002.f32"]

    msgs = []
    second = BlockPipeline(model, tmp_path / "out", settings, work_dir=work, log=msgs.append,
                           activation_budget=budget)
    second.check()
    second.run(ids)
    assert any("resuming at block 2" in m for m in msgs)
    assert sum("block " in m and "linears" in m for m in msgs) == 1
    a = (tmp_path / "ref" / "model.safetensors").read_bytes()
    b = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert a == b
    assert (tmp_path / "ref" / "config.json").read_text() == (tmp_path / "out" / "config.json").read_text()


def test_changed_settings_do_not_resume(tmp_path):
    model = build_tiny_llama(tmp_path / "model", layers=2)
    ids = _ids(model)
    work = tmp_path / "work"

    def kill(msg):
        if "block 2/2" in msg:
            raise Killed

    p = BlockPipeline(model, tmp_path / "out", QuantizeSettings(method="rtn", group_size=32, seed=0), work_dir=work, log=kill)
    p.check()
    with pytest.raises(Killed):
        p.run(ids)
    msgs = []
    p2 = BlockPipeline(model, tmp_path / "out", QuantizeSettings(method="rtn", group_size=32, seed=1), work_dir=work, log=msgs.append)
    p2.check()
    p2.run(ids)
    assert not any("resuming" in m for m in msgs)
    assert sum("linears" in m for m in msgs) == 2

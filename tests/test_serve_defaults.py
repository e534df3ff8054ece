"""gsq-serve's CPU defaults: set only when unset, and the engine gets every core on a small machine."""

import os
import sys

import pytest

from gsq_vllm import serve


def test_small_machines_give_the_engine_every_core():
    assert serve.cpu_defaults(2)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert serve.cpu_defaults(1)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in serve.cpu_defaults(8)  # vLLM's own choice there
    assert serve.cpu_defaults(8)["VLLM_CPU_KVCACHE_SPACE"] == "2"


@pytest.mark.parametrize("preset", [None, "1"])
def test_the_server_gets_the_defaults_unless_the_user_set_them(monkeypatch, tmp_path, preset):
    """main() hands the api_server the defaults, never overriding a value already set."""
    seen = {}

    def fake_execve(path, argv, env):  # stands in for the exec into vLLM, not for gsq-serve
        seen.update(env=env, argv=argv)
        raise SystemExit(0)

    monkeypatch.setattr(serve, "validate_checkpoint", lambda folder: f"{folder}: ok")
    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setattr(serve, "cpu_defaults", lambda: {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})
    if preset is None:
        monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", preset)
    with pytest.raises(SystemExit):
        serve.main([str(tmp_path), "--port", "1"])
    assert seen["env"]["VLLM_CPU_NUM_OF_RESERVED_CPU"] == (preset or "0")
    assert seen["argv"][:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert seen["argv"][3:] == ["--model", str(tmp_path), "--port", "1"]

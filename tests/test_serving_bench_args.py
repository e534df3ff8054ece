"""benchmarks/serving.py's command line: model folders and per-model environments are checked
before any server starts (one error line, exit 2), and a model's environment reaches only its
own server."""

import subprocess
import sys
from pathlib import Path

from benchmarks import serving

ROOT = Path(__file__).resolve().parents[1]


def test_model_env_is_parsed_per_model(capsys):
    envs = serving.model_envs(["int8:GSQ_CPU_ISA=avx2int8", "int8:GSQ_CPU_DENSE=0", "b:X=a=b"], ["a", "b", "int8"], "p")
    assert envs == {"int8": {"GSQ_CPU_ISA": "avx2int8", "GSQ_CPU_DENSE": "0"}, "b": {"X": "a=b"}}
    assert capsys.readouterr().err == ""


def test_bad_model_env_is_one_error(capsys):
    for bad in ("int8:GSQ_CPU_ISA", "other:K=V", "int8:=V", "int8"):
        assert serving.model_envs([bad], ["int8"], "p") is None
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "NAME:KEY=VALUE" in err and repr(bad) in err


def test_server_gets_its_own_environment_only(tmp_path, monkeypatch):
    """start_server's child sees extra_env on top of ours; our own environment is unchanged."""
    seen = {}

    def fake_popen(cmd, env, stdout, stderr):
        seen.update(env)
        return None

    monkeypatch.setattr(serving.subprocess, "Popen", fake_popen)
    monkeypatch.setenv("GSQ_CPU_ISA", "avx2")
    serving.start_server("DIR", 1, [], tmp_path / "log", {"GSQ_CPU_ISA": "avx2int8"})
    assert seen["GSQ_CPU_ISA"] == "avx2int8" and str(ROOT) in seen["PYTHONPATH"]
    import os
    assert os.environ["GSQ_CPU_ISA"] == "avx2"


def test_command_line_refuses_an_unknown_model_name(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--models", f"a={tmp_path}",
                        "--model-env", "b:K=V", "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "--model-env expects NAME:KEY=VALUE" in r.stderr
    assert not (tmp_path / "x.json").exists()

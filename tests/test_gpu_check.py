"""scripts/gpu_check.sh (issue 31) in its dry-run mode, in an environment shaped like the GPU machine's.

The GPU machine has Python, torch, transformers, safetensors, accelerate and triton, and nothing
else: no vLLM, no network, no pytest, no lion-pytorch. Its other needs come from the folder that
``--prepare`` fills (wheels, the default model's tokenizer, the calibration corpus). Here:

1. ``gpu_check.py --prepare`` fills a temporary carry folder (online: ``pip download``), with the
   wheels for this interpreter's Python (the device's are 3.12);
2. a fresh venv holds exactly the image's distributions and what they require, linked from this
   environment (torch is the local wheel's), so vLLM and every other package of the project's
   venv are absent, as on the device (a venv with --system-site-packages would see vLLM);
3. ``gpu_check.sh OUT --dry-run`` runs in that venv with the network cut (``unshare -n``): the
   deps stage installs the carried wheels with pip --no-index, every other stage imports what it
   uses, checks its arguments and writes its plan, and records "skipped: no CUDA".

An import, packaging or argument error in the script, or in the project code it calls, fails
here instead of on the GPU.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from scripts import gpu_check
from scripts import gpu_check_stages as stages

ROOT = Path(__file__).resolve().parents[1]

# What the GPU machine's image has (issue 31), and so what the mirror has.
IMAGE_DISTS = ("torch", "transformers", "safetensors", "accelerate", "triton", "numpy", "pip", "setuptools")
ABSENT_ON_DEVICE = ("vllm", "lion_pytorch", "pytest", "humming", "gsq_vllm")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_closure(names=IMAGE_DISTS) -> dict[str, md.Distribution]:
    """The named distributions installed here and everything they require (extras left out)."""
    from packaging.requirements import Requirement

    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = _canon(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # e.g. triton where this platform has none
        seen[name] = dist
        for req in dist.requires or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r.name)
    return seen


def make_mirror(folder: Path) -> Path:
    """A venv (no system site-packages) whose site-packages links the image closure's files."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=300)
    py = folder / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for dist in image_closure().values():
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            src, dst = Path(dist.locate_file(top)), site / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
    return py


def offline_prefix() -> list[str]:
    """`unshare -n` (a network namespace with no interface up) where it works, else nothing (the
    script's own pip calls are --no-index either way)."""
    for cmd in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which(cmd[0]) and subprocess.run(cmd + ["true"], capture_output=True).returncode == 0:
            return cmd
    return []


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """prepare + mirror + the offline dry run, once for the tests that read it (about 3 minutes)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    carry = tmp / "carry"
    v = sys.version_info
    prep = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--prepare", "--carry", str(carry),
                           "--python-version", f"{v.major}.{v.minor}"], capture_output=True, text=True, timeout=900)
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    py = make_mirror(tmp / "mirror")
    out = tmp / "out"
    env = {k: val for k, val in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(GSQ_PYTHON=str(py), GSQ_CARRY=str(carry), GSQ_SCRATCH=str(tmp / "scratch"),
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    net = offline_prefix()
    res = subprocess.run(net + ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    return {"py": py, "out": out, "res": res, "net": net, "env": env}


def _explain(run) -> str:
    out = run["out"]
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
                   for p in sorted((out / "logs").glob("*.log"))) if (out / "logs").is_dir() else ""
    return run["res"].stdout[-5000:] + run["res"].stderr[-3000:] + logs[-20000:]


@pytest.mark.slow
def test_mirror_is_the_device_image(dry_run):
    """torch and transformers import in the mirror; vLLM and the carried packages do not."""
    code = ("import importlib.util as u, json; import torch, transformers, safetensors, accelerate; "
            f"print(json.dumps([n for n in {ABSENT_ON_DEVICE!r} if u.find_spec(n)]))")
    res = subprocess.run([str(dry_run["py"]), "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=dry_run["py"].parent)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_dry_run_passes_every_stage(dry_run):
    res, out = dry_run["res"], dry_run["out"]
    print(f"network cut with: {dry_run['net'] or 'nothing (proxy variables only)'}")
    assert res.returncode == 0, _explain(dry_run)
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    assert summary["dry_run"] is True
    assert set(stages) == {s.name for s in gpu_check.STAGES}, stages.keys()
    for name, rec in stages.items():
        assert (out / f"{name}.json").is_file()
        if name in ("deps", "env"):
            assert rec["status"] == "ok", (name, rec)
        else:
            assert rec["status"] == "skipped" and rec["reason"].startswith("skipped: no CUDA"), (name, rec)
            assert rec.get("plan"), (name, "a dry stage writes its plan")
    deps = stages["deps"]["result"]
    # What the image lacks came from the carried wheels, with pip --no-index, offline.
    assert {"lion-pytorch", "pytest", "humming-kernels", "gguf", "matplotlib"} <= set(deps["installed"]), deps
    assert not deps["failed"], deps["failed"]
    assert all(not v.startswith("FAILED") for v in deps["imports"].values()), deps["imports"]
    assert stages["env"]["result"]["packages"]["vllm"] is None
    assert stages["build"]["plan"]["setup_py_name"] == "gsq-vllm"
    assert all(n > 0 for n in stages["kernel_tests"]["plan"]["collected_per_shard"].values())
    assert stages["gsq_steps"]["plan"]["cpu_smoke"]["steps"] == 2
    assert stages["gsq_tiny"]["plan"]["cpu_rehearsal"]["rc"] == 0 and stages["gsq_tiny"]["plan"]["cpu_rehearsal"]["report"]
    assert "vllm" in stages["selfcheck"]["plan"]["vllm_standins"]
    assert all(r["corrupt_caught"] for r in stages["selfcheck"]["plan"]["emulator_rehearsal"])
    launches = json.loads((out / "launches_memcheck.json").read_text())
    assert len(launches["plan"]["emulator_rehearsal"]) >= 4, launches
    md_text = (out / "summary.md").read_text()
    assert "no CUDA device" in md_text and "dry run" in md_text


def test_argument_errors_are_refused():
    """A misspelt stage name stops the run before anything starts."""
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["/tmp/x", "--only", "bench,benhc"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])


# ---------------------------------------------------------------- what only runs on the device, fed here


NCU_CSV = """==PROF== Connected to process 1234
[launches_ncu] ok:
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","1234","python3","127.0.0.1","void gsq::gsq_decode_kernel<__half, 2, 128, 128, 1>(...)","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","30,480,384"
"0","1234","python3","127.0.0.1","void gsq::gsq_decode_kernel<__half, 2, 128, 128, 1>(...)","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","57,344"
"0","1234","python3","127.0.0.1","void gsq::gsq_decode_kernel<__half, 2, 128, 128, 1>(...)","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","81.52"
"0","1234","python3","127.0.0.1","void gsq::gsq_decode_kernel<__half, 2, 128, 128, 1>(...)","1","7","(128, 1, 1)","(264, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","11,200"
==PROF== Disconnected from process 1234
"""


def test_ncu_csv_is_read():
    got = stages.parse_ncu(NCU_CSV)
    assert got["dram_read_bytes"] == 30_480_384 and got["duration_us"] == pytest.approx(11.2)
    assert got["achieved_read_gbs"] == pytest.approx(30_480_384 / 11.2e-6 / 1e9)
    assert got["pct_of_peak"] == pytest.approx(81.52)
    assert "parse_error" in stages.parse_ncu("==ERROR== ERR_NVGPUCTRPERM")


def test_sanitizer_summaries_are_read():
    assert stages.sanitizer_counts("========= ERROR SUMMARY: 0 errors\n") == [0]
    assert stages.sanitizer_counts("========= RACECHECK SUMMARY: 2 hazards displayed (0 errors, 2 warnings)") == [2]
    assert stages.sanitizer_counts("Traceback ...") == []


def _device_records() -> dict:
    """Stage records shaped like a device run's (numbers made up) for the summary renderer."""
    t = {"event_us": 30.0, "stream_us": 12.0, "graph_us": 10.0, "launches": 32, "buffers": 16}
    rows = [{"model": "llama3.1-8b", "layer": layer, "n": 4096, "k": 4096, "bits": bits, "m": m, "ours": t,
             "dense": dict(t, graph_us=40.0), "gbs": 2000.0, "speedup_vs_dense": 4.0}
            for layer in ("qkv", "o") for bits in (2, 3) for m in (1, 16)]
    hum = [{"model": r["model"], "layer": r["layer"], "bits": r["bits"], "m": r["m"], "humming": dict(t, graph_us=20.0)}
           for r in rows[:3]]
    return {
        "env": {"status": "ok", "device": "NVIDIA H100 80GB HBM3", "result": {
            "device_name": "NVIDIA H100 80GB HBM3", "python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0",
            "cpus": 16, "devices": [{"capability": "9.0", "sms": 132, "memory_gib": 79.2}], "tools": {}}},
        "deps": {"status": "ok", "result": {"installed": {"pytest": "pip"}, "present_in_image": {}, "failed": {}}},
        "build": {"status": "ok", "result": {"sass_arches": ["sm_90"], "import": {"cuda_kernel_available": True},
                                             "cuda": {"wall_s": 70}, "cpu": {"wall_s": 50}}},
        "kernel_tests": {"status": "failed", "result": {"counts": {"PASSED": 64, "FAILED": 1},
                                                        "failures": ["FAILED tests/x.py::t - AssertionError: rel err"]}},
        "selfcheck": {"status": "ok", "result": {"rows": [{"layer": "model.layers.0.mlp.gate_up_proj", "bits": 2,
                                                           "kernel": "cuda", "selfcheck_passed": True,
                                                           "apply_rel_err": 1e-3, "corrupt_caught": True}]}},
        "memcheck": {"status": "ok", "result": {"summary": ["ERROR SUMMARY: 0 errors"], "driver_status": "ok"}},
        "racecheck": {"status": "timeout", "reason": "time box of 75 s reached"},
        "ncu": {"status": "ok", "result": stages.parse_ncu(NCU_CSV)},
        "bench": {"status": "ok", "result": {"rows": rows, "copy_gbs": 3000.0}},
        "humming": {"status": "partial", "result": {"rows": hum, "errors": []}},
        "gsq_steps": {"status": "ok", "result": {"runs": [{"label": "fast", "steady_steps_per_s": 12.5, "steps": 10,
                                                           "tokens_per_step": 256, "refine_block_s": 2.0,
                                                           "peak_gib": 14.0}, {"label": "paper", "error": "OOM"}]}},
        "gsq_tiny": {"status": "ok", "result": {"rc": 0, "wall_s": 20.0, "bits_per_weight": 2.25}},
    }


def test_summary_of_a_device_run(tmp_path):
    runner = gpu_check.Runner(gpu_check.parse_args([str(tmp_path / "out"), "--scratch", str(tmp_path / "s")]))
    runner.records = _device_records()
    text = gpu_check.write_summary(runner)
    assert text.startswith("# GPU check: NVIDIA H100 80GB HBM3")
    assert "| kernel_tests | failed |" in text and "| racecheck | timeout |" in text
    assert "2721 GB/s read" in text  # 30.5 MB in 11.2 us
    # 8B qkv M=1: dense 40 us, ours 10 us, Humming 20 us -> 4.00 x dense, 2.00 x Humming
    assert "| llama3.1-8b | qkv | 1 | 40.0 | 10.0 | 10.0 | 20.0 | 20.0 | 4.00 | 4.00 | 2.00 | 2.00 |" in text
    assert "| fast | 12.50 |" in text
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["device"] == "NVIDIA H100 80GB HBM3"

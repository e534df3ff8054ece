"""The stages of scripts/gpu_check.py (issue 31), each run as its own process under a time box.

    python scripts/gpu_check_stages.py STAGE --out OUT --scratch DIR --carry DIR [--box-s S] [--dry-run]

Every stage writes ``OUT/STAGE.json`` (``status`` ok / failed / partial / skipped, ``reason``,
``result``, ``plan``), rewritten as it goes so a stage killed at its time box leaves what it had.
With ``--dry-run`` (or no CUDA device) a stage still runs its imports, checks its arguments and
builds its plan, then records ``skipped: no CUDA`` instead of doing the CUDA work.

``launches`` is not a stage: it is the small driver that compute-sanitizer and ncu run (a few
direct calls of the kernel, each checked against dequantize + matmul on the CPU).

Only the standard library is imported at module level: each stage imports what it uses, so a
missing module shows up as that stage's failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "skipped: no CUDA"

# The Llama-3.1 decode layers and batch sizes the issue names (shapes: benchmarks/bench_kernel.py).
BENCH_MS = (1, 4, 8, 16, 64, 256)
BENCH_BITS = (2, 3)
BENCH_GROUP = 128  # bench_kernel.py's default and Humming's GPTQ group (vLLM's int2/int3 path)
# The first cases each Humming/ours pass reaches when time runs short: M = 1 and 16 first.
PRIORITY_MS = (1, 16, 4, 8, 64, 256)

# Small launches for compute-sanitizer: (name, M, N, K, bits, G, dtype). The decode kernel takes
# M <= 16 and splits K across warps when the layer has fewer (row block, chunk) items than the GPU
# has warps to give (every case here); the prefill kernel splits K over blocks when the layer's
# blocks do not fill 2 per SM (all but the last case). See gsq_gemm_plan in csrc/gsq_gemm.cu.
SANITIZER_CASES = [
    ("decode_splitk_2b_g128_fp16", 1, 256, 4096, 2, 128, "float16"),
    ("decode_splitk_3b_g64_bf16_m13", 13, 128, 2048, 3, 64, "bfloat16"),
    ("decode_splitk_2b_g32_fp16_m4", 4, 192, 1024, 2, 32, "float16"),
    ("prefill_splitk_3b_g128_fp16_m33", 33, 256, 4096, 3, 128, "float16"),
    ("prefill_splitk_2b_g64_bf16_m20", 20, 320, 1536, 2, 64, "bfloat16"),
    ("prefill_nosplit_2b_g128_fp16_m300", 300, 8192, 512, 2, 128, "float16"),
]
EMU_REHEARSAL_MAX = 40_000_000  # M*N*K the dry run sends through the CPU emulator (~2 s at this size)
# One decode launch for ncu: Llama-3.1-8B gate_up, M = 1, 2-bit, G = 128, fp16.
NCU_CASE = ("ncu_decode_8b_gate_up_2b_m1", 1, 28672, 4096, 2, 128, "float16")
NCU_METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "gpu__time_duration.sum",
               "dram__throughput.avg.pct_of_peak_sustained_elapsed")

# Wheels the prepare step carries: the distributions the project needs on the device beside the
# image's torch / transformers / safetensors / accelerate / triton (installed only when missing).
REQUIRED_IMPORTS = {"lion_pytorch": "GSQ's optimizer", "pytest": "tests/test_cuda_kernel.py"}
OPTIONAL_IMPORTS = {"gguf": "gsq_format.format's GGUF paths", "humming": "the Humming comparison",
                    "matplotlib": "gsq-quantize's report plots"}


# ----------------------------------------------------------------------------- plumbing


class Ctx:
    def __init__(self, args):
        self.args = args
        self.stage = args.stage
        self.out: Path = args.out
        self.scratch: Path = args.scratch
        self.carry: Path = args.carry
        self.dry = bool(args.dry_run)
        self.t0 = time.time()
        self.deadline = self.t0 + float(args.box_s) - 8  # leave time to write the JSON
        self.record: dict = {"stage": self.stage, "status": "running", "dry_run": self.dry}
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.time()

    def log_path(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"

    def write(self, **fields) -> None:
        self.record.update(fields)
        self.record["wall_s"] = round(time.time() - self.t0, 2)
        write_json(self.out / f"{self.stage}.json", self.record)

    def skip_no_cuda(self, plan, **extra) -> dict:
        try:
            import torch

            why = "--dry-run" if torch.cuda.is_available() else "torch sees no CUDA device"
        except ImportError:
            why = "torch does not import"
        return dict(status="skipped", reason=f"{NO_CUDA} ({why})", plan=plan, **extra)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


_CHILDREN: list[subprocess.Popen] = []  # commands started in sessions of their own (see spawn)


def spawn(cmd, **kw) -> subprocess.Popen:
    """Popen in a session of its own, so a time box ends the command with all it started; the
    stage's SIGTERM handler (main) ends these too when the stage itself is ended by `timeout`."""
    p = subprocess.Popen([str(c) for c in cmd], start_new_session=True, **kw)
    _CHILDREN.append(p)
    return p


def _end_children(signum, frame) -> None:
    import signal

    for p in _CHILDREN:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    raise SystemExit(128 + signum)


def run_logged(cmd, log: Path, timeout: float, env=None, cwd=ROOT) -> dict:
    """Run cmd with stdout+stderr to ``log``; {rc, wall_s, timed_out, tail}. A command past
    ``timeout`` is ended with its whole process group (it runs in a session of its own)."""
    t = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        p = spawn(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        timed_out = False
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(p)
            rc = p.wait()
    return {"cmd": " ".join(map(str, cmd)), "rc": rc, "timed_out": timed_out, "wall_s": round(time.time() - t, 2),
            "log": str(log), "tail": tail(log)}


def _kill_group(p: subprocess.Popen) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)  # the group this stage started for the command, nothing else
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, chars: int = 3000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, under $CUDA_HOME, /usr/local/cuda or Nsight Compute's usual folders."""
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    cands = [Path(h) / "bin" / name for h in homes if h]
    cands += [Path(h) / "compute-sanitizer" / name for h in homes if h]
    cands += sorted(Path("/opt/nvidia").glob(f"nsight-compute/*/{name}")) if Path("/opt/nvidia").is_dir() else []
    cands += sorted(Path("/usr/local/cuda").glob(f"nsight-compute*/{name}"))
    return next((str(c) for c in cands if c.is_file() and os.access(c, os.X_OK)), None)


def tool_version(path: str | None, flag: str = "--version") -> str | None:
    if not path:
        return None
    try:
        res = subprocess.run([path, flag], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"error: {e}"
    lines = [ln.strip() for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def cuda_ready() -> bool:
    import torch

    return torch.cuda.is_available()


def import_bench_kernel():
    """benchmarks.bench_kernel, checked for what the stages use (the repository root is on PYTHONPATH)."""
    from benchmarks import bench_kernel  # noqa: PLC0415

    for name in ("SHAPES", "ROTATE_BYTES", "random_layer", "time_rotating", "copy_bandwidth_gbs"):
        if not hasattr(bench_kernel, name):
            raise RuntimeError(f"benchmarks/bench_kernel.py has no {name}: scripts/gpu_check_stages.py wraps it")
    return bench_kernel


def dtype_of(name: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------- deps


def _dist_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def _installed_version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _installed_where(name: str, site: Path) -> str | None:
    """'image' or 'scratch' (an earlier run's install into site), None when absent."""
    import importlib.metadata as md

    try:
        loc = Path(str(md.distribution(name).locate_file(""))).resolve()
    except md.PackageNotFoundError:
        return None
    return "scratch" if loc == site.resolve() or site.resolve() in loc.parents else "image"


def _unzip_wheel(wheel: Path, site: Path) -> None:
    """Install a wheel without pip (the last resort): its files into site, scripts into site/bin."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if len(parts) > 2 and parts[0].endswith(".data"):
                kind, rest = parts[1], parts[2:]
                dest = site / "bin" / "/".join(rest) if kind == "scripts" else site / "/".join(rest)
            else:
                dest = site / info.filename
            if info.is_dir():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))
            if (info.external_attr >> 16) & 0o111 or dest.parent.name == "bin":
                dest.chmod(0o755)


def stage_deps(ctx: Ctx) -> dict:
    """Install the carried wheels the image lacks into scratch/site (on PYTHONPATH for every stage):
    pip --no-index --no-deps --target, so nothing of the image's own packages is touched."""
    import importlib

    wheels_dir = ctx.carry / "wheels"
    site = ctx.scratch / "site"
    site.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
    names = sorted({_dist_name(w) for w in wheels})
    where = {n: _installed_where(n, site) for n in names}
    missing = [n for n in names if where[n] is None]
    result: dict = {"wheel_dir": str(wheels_dir), "wheels": [w.name for w in wheels], "site": str(site),
                    "present_in_image": {n: _installed_version(n) for n in names if where[n] == "image"},
                    "present_from_earlier_run": sorted(n for n in names if where[n] == "scratch"),
                    "installed": {}, "failed": {}}
    ctx.write(result=result)
    if not wheels:
        result["note"] = f"no wheels in {wheels_dir}: run `bash scripts/gpu_check.sh --prepare` before the device call"
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels_dir),
           "--target", str(site), "--no-compile", "--no-warn-script-location", "--upgrade", "-q"]
    have_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if missing and have_pip:
        res = run_logged(pip + missing, ctx.log_path("deps_pip"), ctx.remaining(), env=env)
        if res["rc"] == 0:
            result["installed"] = {n: "pip" for n in missing}
        else:  # one at a time, so one wheel that does not fit this Python costs only itself
            for n in missing:
                r = run_logged(pip + [n], ctx.log_path(f"deps_pip_{n}"), ctx.remaining(), env=env)
                if r["rc"] == 0:
                    result["installed"][n] = "pip"
                else:
                    result["failed"][n] = r["tail"][-600:]
    elif missing:  # no pip in the image: unpack the wheels that match this Python
        tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
        for n in missing:
            cands = [w for w in wheels if _dist_name(w) == n and ("-py3-" in w.name or "-py2.py3-" in w.name
                                                                   or f"-{tag}-" in w.name or "-abi3-" in w.name)]
            if not cands:
                result["failed"][n] = f"no wheel for {tag}"
                continue
            try:
                _unzip_wheel(cands[-1], site)
                result["installed"][n] = "unzip (no pip)"
            except Exception as e:  # noqa: BLE001
                result["failed"][n] = repr(e)
    importlib.invalidate_caches()
    # Each import checked in a fresh process, as the stages will see it.
    mods = list(REQUIRED_IMPORTS) + list(OPTIONAL_IMPORTS)
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}; print(getattr({m}, '__file__', ''))"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for m in mods}
    checks = {}
    for mod, p in procs.items():
        try:
            so, se = p.communicate(timeout=max(10.0, ctx.remaining()))
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        checks[mod] = so.strip() if p.returncode == 0 else "FAILED: " + (se.strip().splitlines() or ["?"])[-1]
    result["imports"] = checks
    result["ninja"] = shutil.which("ninja", path=f"{site / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    bad = [m for m in REQUIRED_IMPORTS if checks[m].startswith("FAILED")]
    if bad:
        return dict(status="failed", reason=f"cannot import {', '.join(bad)} (carried wheels missing?)", result=result)
    soft = [m for m in OPTIONAL_IMPORTS if checks[m].startswith("FAILED")]
    return dict(status="ok", reason=f"optional imports missing: {', '.join(soft)}" if soft else "", result=result)


# ----------------------------------------------------------------------------- env


def stage_env(ctx: Ctx) -> dict:
    """What machine this is: GPU, driver, torch / CUDA, tools (informative; never skipped)."""
    import platform

    import torch

    info: dict = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
                  "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                  "cpus": os.cpu_count(), "devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                                    "memory_gib": round(p.total_memory / 2**30, 1),
                                    "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)})
        major, minor = torch.cuda.get_device_capability(0)
        info["torch_cuda_arch_list"] = f"{major}.{minor}"
        info["device_name"] = torch.cuda.get_device_name(0)
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,"
                            "power.limit,pci.bus_id", "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=60)
        info["nvidia_smi"] = (q.stdout or q.stderr).strip()
    for tool in ("nvcc", "ncu", "compute-sanitizer", "cuobjdump", "ninja", "g++"):
        path = find_tool(tool) if tool not in ("ninja", "g++") else shutil.which(tool)
        info.setdefault("tools", {})[tool] = {"path": path, "version": tool_version(path)}
    for dist in ("transformers", "safetensors", "accelerate", "triton", "numpy", "setuptools", "pip",
                 "lion-pytorch", "gguf", "pytest", "humming-kernels", "matplotlib", "vllm"):
        info.setdefault("packages", {})[dist] = _installed_version(dist)
    name = info.get("device_name") or "no CUDA device"
    return dict(status="ok", reason="" if info["cuda_available"] else NO_CUDA, result=info, device=name)


# ----------------------------------------------------------------------------- build


def _setup_honours_arch_list() -> bool:
    return "TORCH_CUDA_ARCH_LIST" in (ROOT / "setup.py").read_text()


def stage_build(ctx: Ctx) -> dict:
    """gsq_vllm._C for this GPU's architecture only, and the CPU extensions, in place (no pip, no
    dependency touched): two `setup.py build_ext --inplace` runs side by side."""
    import torch
    from torch.utils import cpp_extension  # noqa: F401  (what setup.py builds with)

    py = sys.executable
    jobs = max(1, (os.cpu_count() or 2) // 2)
    arch = None
    if not ctx.dry and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        arch = f"{major}.{minor}"
    builds = {
        "cuda": {"cmd": [py, "setup.py", "build_ext", "--inplace", "--build-temp", str(ctx.scratch / "build-cuda")],
                 "env": {"GSQ_BUILD_CUDA": "1", "GSQ_BUILD_CPU": "0", "TORCH_CUDA_ARCH_LIST": arch or "<capability>",
                         "MAX_JOBS": str(jobs)}},
        "cpu": {"cmd": [py, "setup.py", "build_ext", "--inplace", "--build-temp", str(ctx.scratch / "build-cpu")],
                "env": {"GSQ_BUILD_CUDA": "0", "MAX_JOBS": str(jobs)}},
    }
    plan = {"builds": {k: {"cmd": " ".join(v["cmd"]), "env": v["env"]} for k, v in builds.items()},
            "setup_py_honours_TORCH_CUDA_ARCH_LIST": _setup_honours_arch_list(),
            "nvcc": find_tool("nvcc"), "ninja": shutil.which("ninja")}
    if not plan["setup_py_honours_TORCH_CUDA_ARCH_LIST"]:
        plan["warning"] = "setup.py passes -gencode for every arch in CUDA_ARCHS: the build makes all of them"
    # setup.py must evaluate in this environment (imports, package list) whatever happens next.
    check = run_logged([py, "setup.py", "--name"], ctx.log_path("build_setup_name"), min(120, ctx.remaining()),
                       env=dict(os.environ, GSQ_BUILD_CUDA="0", GSQ_BUILD_CPU="0"))
    plan["setup_py_name"] = check["tail"].strip().splitlines()[-1] if check["tail"].strip() else ""
    if check["rc"] != 0:
        return dict(status="failed", reason="`python setup.py --name` failed in this environment", plan=plan,
                    result={"setup_name": check})
    if ctx.dry or arch is None:
        return ctx.skip_no_cuda(plan)
    if plan["nvcc"] is None:
        return dict(status="failed", reason="nvcc not found", plan=plan)
    procs = {}
    for k, b in builds.items():
        env = dict(os.environ, **b["env"])
        if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").is_file():
            env["CUDA_HOME"] = "/usr/local/cuda"  # else torch derives it from the nvcc on PATH
        log = ctx.log_path(f"build_{k}")
        f = open(log, "w")  # noqa: SIM115 (closed below)
        f.write("$ " + " ".join(b["cmd"]) + f"\n# env {b['env']}\n")
        f.flush()
        procs[k] = (spawn(b["cmd"], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT), f, time.time(), log)
    result = {}
    for k, (p, f, t, log) in procs.items():
        try:
            rc = p.wait(timeout=max(1.0, ctx.remaining()))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc, timed_out = p.wait(), True
        f.close()
        result[k] = {"rc": rc, "timed_out": timed_out, "wall_s": round(time.time() - t, 1), "log": str(log),
                     "tail": tail(log, 2000)}
        ctx.write(plan=plan, result=result)
    # What was built, checked from a fresh process.
    probe = ("import json, torch; from gsq_vllm import cuda_gemm as cg; r = {'cuda_kernel_available': "
             "cg.cuda_kernel_available(), 'C': getattr(cg._C, '__file__', None), 'C_error': cg._C_ERROR}\n"
             "for m in ('gsq_vllm._C_cpu', 'quantize._C'):\n"
             "    try:\n        r[m] = __import__(m, fromlist=['x']).__file__\n"
             "    except Exception as e:\n        r[m] = 'FAILED: ' + repr(e)\nprint(json.dumps(r))")
    pr = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    try:
        result["import"] = json.loads(pr.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        result["import"] = {"error": pr.stderr[-2000:]}
    so = result["import"].get("C")
    cuobjdump = find_tool("cuobjdump")
    if so and cuobjdump:
        elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, timeout=60)
        result["sass_arches"] = sorted(set(re.findall(r"sm_\d+a?", elf.stdout)))
    ok = result["import"].get("cuda_kernel_available") is True
    return dict(status="ok" if ok else "failed", plan=plan, result=result,
                reason="" if ok else "gsq_vllm._C did not build or import (see logs/build_cuda.log)")


# ----------------------------------------------------------------------------- timing


def time_op(bench_kernel, fn, n_bufs: int, iters: int = 30, graphs: bool = True) -> dict:
    """Per-launch time of fn(i) (i cycles over n_bufs weight copies that together exceed L2):
    event_us: one launch between two events, synchronised each time (bench_kernel.time_rotating:
    launch latency included); stream_us: R launches back to back on the stream, per launch;
    graph_us: the same R launches captured in one CUDA graph, per launch (no launch overhead)."""
    import torch

    event_ms = bench_kernel.time_rotating(fn, n_bufs, iters=iters, warmup=3)
    r = max(2 * n_bufs, 32)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for i in range(r):
        fn(i % n_bufs)
    end.record()
    end.synchronize()
    stream_ms = start.elapsed_time(end) / r
    out = {"event_us": event_ms * 1e3, "stream_us": stream_ms * 1e3, "graph_us": None, "launches": r,
           "buffers": n_bufs}
    if not graphs:
        out["graph_error"] = "not tried (an earlier capture failed in this process)"
        return out
    try:
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):  # warm the side stream's allocator before capture
            for i in range(min(2, n_bufs)):
                fn(i)
        cur.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(r):
                fn(i % n_bufs)
        graph.replay()
        torch.cuda.synchronize()
        reps = []
        for _ in range(5):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            reps.append(start.elapsed_time(end) / r)
        out["graph_us"] = statistics.median(reps) * 1e3
        del graph
    except Exception as e:  # noqa: BLE001
        out["graph_error"] = f"{type(e).__name__}: {e}"[:400]
        try:
            torch.cuda.synchronize()
        except Exception as e2:  # noqa: BLE001
            out["graph_error"] += f"; then: {type(e2).__name__}: {e2}"[:300]
    return out


def bench_cases(bench_kernel, models=("llama3.1-8b", "llama3.1-70b")) -> list[tuple]:
    return [s for s in bench_kernel.SHAPES if s[0] in models]


# ----------------------------------------------------------------------------- bench (ours + dense)


def stage_bench(ctx: Ctx) -> dict:
    """torch.ops.gsq.gemm vs torch's dense fp16 matmul on the Llama-3.1-8B/70B decode layers."""
    import torch

    from gsq_vllm import cuda_gemm as cg

    bk = import_bench_kernel()
    shapes = bench_cases(bk)
    dtype = torch.float16
    plan = {"shapes": [list(s) for s in shapes], "ms": list(BENCH_MS), "bits": list(BENCH_BITS),
            "group_size": BENCH_GROUP, "dtype": "float16", "rotate_bytes": bk.ROTATE_BYTES,
            "timing": time_op.__doc__.split(":", 1)[1].strip()}
    for _, _, n, k in shapes:
        for bits in BENCH_BITS:
            if not cg.cuda_supports(n, k, bits, BENCH_GROUP):
                raise ValueError(f"kernel does not take N={n} K={k} bits={bits} G={BENCH_GROUP}")
    if ctx.dry or not cuda_ready():
        return ctx.skip_no_cuda(plan)
    if not cg.cuda_kernel_available():
        return dict(status="failed", reason=f"gsq_vllm._C not available: {cg._C_ERROR}", plan=plan)
    result = {"device": torch.cuda.get_device_name(), "copy_gbs": bk.copy_bandwidth_gbs(), "rows": []}
    rows = result["rows"]
    graphs = True  # after one failed capture, the rest is timed without graphs (stream_us only)
    for model, layer, n, k in shapes:
        if ctx.remaining() < 15:
            result["stopped"] = f"time box reached before {model} {layer}"
            break
        dense_bytes = n * k * 2
        n_d = max(2, min(8, bk.ROTATE_BYTES // dense_bytes))
        dense = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(n_d)]
        dense_t = {}
        for bits in BENCH_BITS:
            b0, s0 = bk.random_layer(n, k, bits, BENCH_GROUP, dtype)
            w_bytes = b0.numel() * 4 + s0.numel() * s0.element_size()
            n_q = max(2, min(16, bk.ROTATE_BYTES // w_bytes))
            bufs = [(b0, s0)] + [(b0.clone(), s0.clone()) for _ in range(n_q - 1)]
            for m in BENCH_MS:
                if ctx.remaining() < 8:
                    break
                a = torch.randn(m, k, device="cuda", dtype=dtype)
                ours = time_op(bk, lambda i: cg.gsq_gemm(a, bufs[i][0], bufs[i][1], bits, BENCH_GROUP, n, k), n_q,
                               graphs=graphs)
                if m not in dense_t:
                    dense_t[m] = time_op(bk, lambda i: a @ dense[i].t(), n_d, graphs=graphs)
                graphs = graphs and ours["graph_us"] is not None and dense_t[m]["graph_us"] is not None
                moved = w_bytes + m * k * 2 + m * n * 2
                best = ours["graph_us"] or ours["stream_us"]
                d_best = dense_t[m]["graph_us"] or dense_t[m]["stream_us"]
                rows.append({"model": model, "layer": layer, "n": n, "k": k, "bits": bits, "m": m,
                             "group_size": BENCH_GROUP, "dtype": "float16", "ours": ours, "dense": dense_t[m],
                             "bytes": moved, "gbs": moved / (best * 1e-6) / 1e9,
                             "pct_copy": 100 * moved / (best * 1e-6) / 1e9 / result["copy_gbs"],
                             "speedup_vs_dense": d_best / best})
                ctx.write(plan=plan, result=result)
            del bufs, b0, s0
            torch.cuda.empty_cache()
        del dense
        torch.cuda.empty_cache()
    done = len(rows) == len(shapes) * len(BENCH_BITS) * len(BENCH_MS)
    return dict(status="ok" if done else "partial", plan=plan, result=result,
                reason="" if done else f"{len(rows)} of {len(shapes) * len(BENCH_BITS) * len(BENCH_MS)} cases in the time box")


# ----------------------------------------------------------------------------- Humming


HUMMING_COMPUTE = {"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "dense"}


def _humming_layer(n: int, k: int, bits: int):
    """A HummingLayer as vLLM 0.32 makes one for a GPTQ symmetric int2/int3 G=128 layer (N padded to
    256, K to 128), random codes and scales, transformed for this GPU with Humming's own configs."""
    import torch
    from humming.layer import HummingLayer
    from humming.schema.gptq import GPTQWeightSchema

    schema = GPTQWeightSchema(bits=bits, group_size=BENCH_GROUP, sym=True)
    layer = HummingLayer(shape_n=n, shape_k=k, weight_config=schema, pad_n_to_multiple=256, pad_k_to_multiple=128,
                         torch_dtype=torch.float16)
    g = torch.Generator().manual_seed(n + k + bits)
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, generator=g, dtype=torch.int32))
        layer.scales.copy_((torch.rand(layer.scales.shape, generator=g) * 0.02 + 0.005).half())
        layer.qzeros.zero_()
        layer.g_idx.copy_(torch.arange(k, dtype=torch.int32) // BENCH_GROUP)
    layer = layer.cuda()
    layer.transform()
    return layer


def stage_humming(ctx: Ctx) -> dict:
    """Humming (PyPI humming-kernels, vLLM's incumbent 2/3-bit kernel) on the same shapes, timed the
    same way; runs while the extension builds (it needs none of it)."""
    import torch

    import humming
    from humming.forward import humming_forward
    from humming.layer import HummingLayer  # noqa: F401
    from humming.schema.gptq import GPTQWeightSchema  # noqa: F401

    bk = import_bench_kernel()
    shapes = bench_cases(bk)
    order = [(s, bits, m) for m in PRIORITY_MS for bits in BENCH_BITS for s in shapes if s[0] == "llama3.1-8b"]
    order += [(s, bits, m) for m in PRIORITY_MS for bits in BENCH_BITS for s in shapes if s[0] != "llama3.1-8b"]
    plan = {"humming": humming.__version__, "compute_config": HUMMING_COMPUTE, "group_size": BENCH_GROUP,
            "dtype": "float16", "cases_in_order": len(order), "first": [f"{s[0]} {s[1]} {b}-bit M={m}" for s, b, m in order[:4]],
            "cache": os.environ.get("HUMMING_CACHE_DIR"), "note": "JIT compiles (NVRTC) one kernel per shape and "
            "M interval on first use; cases run M=1 and 16 first so a short time box keeps the decode ones"}
    if ctx.dry or not cuda_ready():
        return ctx.skip_no_cuda(plan)
    result = {"device": torch.cuda.get_device_name(), "rows": [], "errors": []}
    layers: dict = {}
    graphs = True  # after one failed capture, Humming is timed without graphs (stream_us only)
    for (model, layer_name, n, k), bits, m in order:
        if ctx.remaining() < 10:
            result["stopped"] = "time box"
            break
        key = (n, k, bits)
        try:
            if key not in layers:  # all 16 layers stay (a few GiB): the order below revisits each
                t = time.time()
                lay = _humming_layer(n, k, bits)
                w0, s0 = lay.weight, getattr(lay, "weight_scale", None)
                w_bytes = w0.numel() * w0.element_size() + (0 if s0 is None else s0.numel() * s0.element_size())
                n_h = max(2, min(16, bk.ROTATE_BYTES // w_bytes))
                copies = [(w0, s0)] + [(w0.clone(), None if s0 is None else s0.clone()) for _ in range(n_h - 1)]
                layers[key] = (lay, copies, time.time() - t)
            lay, copies, prep_s = layers[key]
            a = torch.randn(m, k, device="cuda", dtype=torch.float16)

            def call(i, lay=lay, copies=copies, a=a):
                # HummingLayer.forward's call, with the weight copy i (the copies rotate through L2)
                w, s = copies[i]
                return humming_forward(lay.humming_config, inputs=a, weight=w, weight_scale=s,
                                       zero_point=getattr(lay, "zero_point", None), bias=getattr(lay, "bias", None),
                                       weight_scale_2=getattr(lay, "weight_scale_2", None),
                                       input_scale=getattr(lay, "input_scale", None),
                                       input_scale_2=getattr(lay, "input_scale_2", None), locks=lay.locks,
                                       compute_config=HUMMING_COMPUTE)

            t = time.time()
            y = call(0)
            torch.cuda.synchronize()
            first_s = time.time() - t  # includes the JIT compile of this shape's kernel
            row = {"model": model, "layer": layer_name, "n": n, "k": k, "bits": bits, "m": m,
                   "out_shape": list(y.shape), "finite": bool(torch.isfinite(y).all()), "first_call_s": first_s,
                   "layer_prep_s": prep_s, "humming": time_op(bk, call, len(copies), graphs=graphs)}
            graphs = graphs and row["humming"]["graph_us"] is not None
            result["rows"].append(row)
        except Exception as e:  # noqa: BLE001
            result["errors"].append({"case": f"{model} {layer_name} {bits}-bit M={m}",
                                     "error": f"{type(e).__name__}: {e}"[:600]})
            if len(result["errors"]) >= 3 and not result["rows"]:
                break
        ctx.write(plan=plan, result=result)
    n_rows = len(result["rows"])
    status = "ok" if n_rows == len(order) else ("partial" if n_rows else "failed")
    return dict(status=status, plan=plan, result=result,
                reason="" if status == "ok" else f"{n_rows} of {len(order)} cases ({len(result['errors'])} errors)")


# ----------------------------------------------------------------------------- GSQ on CUDA


LLAMA_8B_BLOCK = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY_BLOCK = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  rope_theta=10000.0, max_position_embeddings=512, rms_norm_eps=1e-5)
# (label, bits, GSQOptions overrides, sequences, seqlen): one Lion step = batch_size sequences.
GSQ_RUNS = [
    ("fast preset (1 x 256 tokens per step), 2-bit", 2, dict(batch_size=1, micro_batch_size=1, lr_logits=3e-4), 10, 256),
    ("paper preset (64 x 256 tokens per step, micro-batches of 16), 2-bit", 2,
     dict(batch_size=64, micro_batch_size=16), 192, 256),
    ("fast preset, 3-bit", 3, dict(batch_size=1, micro_batch_size=1, lr_logits=3e-4), 10, 256),
]


def gsq_block_speed(block_cfg: dict, bits, overrides: dict, n_seq: int, seqlen: int, device: str,
                    group_size: int = 64) -> dict:
    """Steps/s of quantize.gsq.refine_block on one random-weight Llama block (all 7 linears),
    from the start of its second step to the end of its last (init and scoring left out)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from quantize.block_forward import call_block
    from quantize.gsq import GSQOptions, refine_block
    from quantize.pipeline import block_linears
    from quantize.rtn import rtn_quantize

    cfg = LlamaConfig(**block_cfg, attn_implementation="sdpa")
    torch.manual_seed(0)
    t_build = time.time()
    with torch.device(device):
        block = LlamaDecoderLayer(cfg, layer_idx=0).float().train(False)
        rotary = LlamaRotaryEmbedding(config=cfg)
    names = block_linears(block, [], "model.layers.0")
    init = {nm: rtn_quantize(block.get_submodule(nm).weight.data, bits, group_size) for nm in names}
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n_seq, seqlen, cfg.hidden_size, generator=g, device=device)
    pos_emb = rotary(x[:1], torch.arange(seqlen, device=device).unsqueeze(0))
    with torch.no_grad():
        y = torch.cat([call_block(block, x[i:i + 16], pos_emb) for i in range(0, n_seq, 16)])
    build_s = time.time() - t_build
    opts = GSQOptions(epochs=1, keep_best=False, **overrides)
    calls: list[tuple[float, bool]] = []

    def forward(inp):
        calls.append((time.perf_counter(), torch.is_grad_enabled()))
        return call_block(block, inp, pos_emb)

    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    _, log = refine_block(block, forward, names, init, x, y, opts, seed=0)
    if device != "cpu":
        torch.cuda.synchronize()
    total_s = time.perf_counter() - t
    steps = log["total_steps"]
    micro = max(1, min(opts.micro_batch_size, opts.batch_size, n_seq))
    per_step = -(-min(opts.batch_size, n_seq) // micro)  # forward calls per Lion step
    train = [c for c in calls if c[1]]
    after = [c for c in calls if not c[1] and train and c[0] > train[-1][0]]
    steady = None
    if steps >= 2 and len(train) >= per_step * steps and after:
        t1, t_end = train[per_step][0], after[0][0]
        steady = (steps - 1) / (t_end - t1)
    return {"bits": bits, "group_size": group_size, "linears": names, "sequences": n_seq, "seqlen": seqlen,
            "options": {k: getattr(opts, k) for k in ("batch_size", "micro_batch_size", "lr_logits", "logits_dtype")},
            "steps": steps, "tokens_per_step": min(opts.batch_size, n_seq) * seqlen, "steady_steps_per_s": steady,
            "refine_block_s": total_s, "overall_steps_per_s": steps / total_s, "setup_s": build_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None,
            "weights": sum(block.get_submodule(nm).weight.numel() for nm in names)}


def stage_gsq_steps(ctx: Ctx) -> dict:
    plan = {"block": "Llama-3.1-8B decoder layer, random weights, float32, all 7 linears, G=64",
            "runs": [{"label": r[0], "bits": r[1], "options": r[2], "sequences": r[3], "seqlen": r[4]} for r in GSQ_RUNS]}
    # The same code on a tiny block on the CPU, 2 steps: refine_block's API as this script calls it.
    plan["cpu_smoke"] = gsq_block_speed(TINY_BLOCK, 2, dict(batch_size=1, micro_batch_size=1), 2, 16, "cpu",
                                        group_size=32)
    ctx.write(plan=plan)
    if ctx.dry or not cuda_ready():
        return ctx.skip_no_cuda(plan)
    import torch

    result = {"device": torch.cuda.get_device_name(), "runs": []}
    for label, bits, over, n_seq, seqlen in GSQ_RUNS:
        if ctx.remaining() < 20:
            result["stopped"] = f"time box reached before: {label}"
            break
        try:
            r = gsq_block_speed(LLAMA_8B_BLOCK, bits, over, n_seq, seqlen, "cuda")
            result["runs"].append({"label": label, **r})
        except Exception as e:  # noqa: BLE001
            result["runs"].append({"label": label, "error": f"{type(e).__name__}: {e}"[:600]})
        torch.cuda.empty_cache()
        ctx.write(plan=plan, result=result)
    ok = [r for r in result["runs"] if "error" not in r]
    status = "ok" if len(ok) == len(GSQ_RUNS) else ("partial" if ok else "failed")
    return dict(status=status, plan=plan, result=result,
                reason="" if status == "ok" else f"{len(ok)} of {len(GSQ_RUNS)} runs")


def tiny_quantize_args(model: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--out", str(out), "--method", "gsq", "--bits", "2", "--group-size", "64",
            "--nsamples", "8", "--seqlen", "128", "--calib", "wikipedia", "--device", "cuda", "--preset", "fast",
            "--no-resume"]


def stage_gsq_tiny(ctx: Ctx) -> dict:
    """A whole `gsq-quantize --device cuda` run (quantize.cli:main, the console script's function)
    on a tiny random Llama made by quantize/tiny.py."""
    from quantize.cli import build_parser
    from quantize.tiny import build_tiny_llama

    from gsq_format.format import checkpoint_bits_per_weight, read_quant_config

    from quantize.data import corpus_path

    tok = _standin_model_dir(ctx)
    corpus = corpus_path("wikipedia")  # the carried corpus file (tests/test_cuda_kernel.py needs it too)
    model = build_tiny_llama(ctx.scratch / "tiny-llama", hidden=128, intermediate=256, layers=2, heads=2,
                             kv_heads=1, tokenizer_dir=tok)
    out = ctx.scratch / "tiny-gsq-ckpt"
    shutil.rmtree(out, ignore_errors=True)
    argv = tiny_quantize_args(model, out)
    build_parser().parse_args(argv)  # the arguments as gsq-quantize takes them
    entry = "import sys; from quantize.cli import main; sys.exit(main(sys.argv[1:]))"
    plan = {"model": str(model), "corpus": str(corpus), "command": "gsq-quantize " + " ".join(argv)}
    if ctx.dry or not cuda_ready():
        # The same run on the CPU (a few seconds at this size): arguments, corpus, tokenizer stand-in,
        # GSQ and the report (matplotlib from the wheels) as the device run will meet them.
        cpu_argv = [("cpu" if a == "cuda" else a) for a in argv]
        r = run_logged([sys.executable, "-c", entry, *cpu_argv], ctx.log_path("gsq_tiny_cpu"), min(300, ctx.remaining()))
        plan["cpu_rehearsal"] = {"rc": r["rc"], "wall_s": r["wall_s"], "tail": r["tail"][-800:],
                                 "report": (out / "report.json").is_file()}
        if r["rc"] != 0:
            return dict(status="failed", reason="gsq-quantize failed on the CPU with these arguments", plan=plan)
        return ctx.skip_no_cuda(plan)
    r = run_logged([sys.executable, "-c", entry, *argv], ctx.log_path("gsq_tiny"), ctx.remaining())
    result = {"rc": r["rc"], "wall_s": r["wall_s"], "timed_out": r["timed_out"], "tail": r["tail"][-1500:]}
    if r["rc"] == 0:
        q = read_quant_config(out)
        bpw, nw = checkpoint_bits_per_weight(out)
        result.update(bits=q.bits, group_size=q.group_size, bits_per_weight=bpw, quantized_weights=nw,
                      files=sorted(p.name for p in out.iterdir()))
        report = out / "report.json"
        if report.is_file():
            rep = json.loads(report.read_text())
            result["report"] = {k: rep.get(k) for k in ("device", "wall_s", "bits_per_weight")}
    return dict(status="ok" if r["rc"] == 0 else "failed", plan=plan, result=result,
                reason="" if r["rc"] == 0 else "gsq-quantize --device cuda failed (logs/gsq_tiny.log)")


def _standin_model_dir(ctx: Ctx) -> Path:
    """The carried tokenizer of the embedded default model (weights left out; see --prepare)."""
    from quantize.models import DEFAULT_MODEL_NAME

    d = ctx.carry / "cache" / "models" / f"{DEFAULT_MODEL_NAME}-bf16"
    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{d} has no tokenizer: run `bash scripts/gpu_check.sh --prepare` first")
    return d


# ----------------------------------------------------------------------------- load-time self-check


def _vllm_standins() -> list[str]:
    """gsq_vllm/linear.py imports two vLLM modules at its top; the device has no vLLM. Stand-ins for
    exactly those names (a base class, a class decorator, two parameter classes), so the plugin's
    own self-check code runs as is. Returns the module names it put in sys.modules."""
    import types

    import torch

    if "vllm" in sys.modules and not getattr(sys.modules["vllm"], "_gsq_standin", False):
        return []  # a real vLLM is here: use it
    try:
        import vllm  # noqa: F401
        return []
    except ImportError:
        pass
    names = ["vllm", "vllm.model_executor", "vllm.model_executor.layers", "vllm.model_executor.layers.linear",
             "vllm.model_executor.parameter"]
    mods = {n: types.ModuleType(n) for n in names}
    for n, m in mods.items():
        m._gsq_standin = True
        sys.modules[n] = m

    class LinearMethodBase:  # the interface GSQLinearMethod implements
        pass

    mods["vllm.model_executor.layers.linear"].LinearMethodBase = LinearMethodBase
    mods["vllm.model_executor.layers.linear"].register_weight_loader_v2_supported_method = lambda cls: cls
    mods["vllm.model_executor.parameter"].PackedvLLMParameter = torch.nn.Parameter
    mods["vllm.model_executor.parameter"].GroupQuantScaleParameter = torch.nn.Parameter
    return names


SELFCHECK_LAYERS = [  # (prefix, N, K, bits, G, act dtype, scale dtype)
    ("model.layers.0.mlp.gate_up_proj", 28672, 4096, 2, 128, "float16", "float16"),
    ("model.layers.0.self_attn.qkv_proj", 6144, 4096, 3, 64, "bfloat16", "bfloat16"),
    ("model.layers.0.mlp.down_proj", 576, 1536, 1.58, 32, "bfloat16", "bfloat16"),
]


# The dry run's rehearsal: the same check through the CUDA emulator (GSQ_KERNEL=cuda-emu: the kernel's
# real source run on the CPU), on layers small enough for it.
SELFCHECK_REHEARSAL = [
    ("model.layers.0.mlp.gate_up_proj", 256, 128, 2, 64, "bfloat16", "bfloat16"),
    ("model.layers.0.self_attn.qkv_proj", 192, 128, 3, 32, "float16", "float16"),
]


def _selfcheck_row(linear, spec, kernel: str, device: str) -> dict:
    """process_weights_after_loading on one random layer with GSQ_KERNEL=kernel, then apply() against
    dequantize + matmul, then the self-check on a corrupted layout (must raise, naming the layer)."""
    import types

    import torch

    from gsq_format.format import GSQQuantConfig, dequantize, grid_range, pack_codes
    from gsq_vllm import kernels

    prefix, n, k, bits, g, act, sdt = spec
    row = {"layer": prefix, "n": n, "k": k, "bits": bits, "group_size": g, "dtype": act, "kernel_asked": kernel}
    try:
        method = linear.GSQLinearMethod(types.SimpleNamespace(fmt=GSQQuantConfig(bits=bits, group_size=g,
                                                                                  scale_dtype=sdt)), prefix=prefix)
        os.environ["GSQ_KERNEL"], os.environ["GSQ_KERNEL_SELFCHECK"] = kernel, "on"
        gen = torch.Generator().manual_seed(n + k)
        lo, hi = grid_range(bits)
        q = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
        s = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.005).to(dtype_of(sdt))
        w = dequantize(q, s, g).to(device)
        layer = torch.nn.Module()
        layer.prefix = prefix
        layer.qweight = torch.nn.Parameter(pack_codes(q, bits).to(device), requires_grad=False)
        layer.scales = torch.nn.Parameter(s.to(device), requires_grad=False)
        layer.params_dtype = dtype_of(act)
        qweight, scales = layer.qweight.data, layer.scales.data
        kernels._selfcheck_results.clear()
        t = time.time()
        method.process_weights_after_loading(layer)
        if device == "cuda":
            torch.cuda.synchronize()
        row["load_s"] = time.time() - t
        row["kernel"] = layer.gsq_kernel.name
        row["selfcheck_passed"] = kernels._selfcheck_results.get((kernel, n, k, method.fmt.bits, g, dtype_of(act)))
        x = torch.randn(5, 3, k, device=device, dtype=dtype_of(act))
        y = method.apply(layer, x)
        ref = x.float().reshape(-1, k) @ w.t()
        row["apply_rel_err"] = ((y.float().reshape(-1, n) - ref).norm() / ref.norm()).item()
        good = layer.gsq_kernel
        bad = good.b.data.clone()
        bad.view(-1)[:: 7] ^= 0x5A5A5A5A
        bad = type(good)(n, k, good.bits, g, good.act_dtype).hold((bad, good.s.data))
        kernels._selfcheck_results.clear()
        try:
            kernels.passes_selfcheck(bad, qweight, scales, prefix)
            row["corrupt_caught"] = False
        except RuntimeError as e:
            row["corrupt_caught"] = "self-check failed" in str(e) and prefix in str(e)
            row["corrupt_error"] = str(e)[:300]
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:600]
        row["traceback"] = traceback.format_exc()[-1500:]
    return row


def _selfcheck_ok(rows, kernel: str) -> bool:
    return bool(rows) and all(r.get("kernel") == kernel and r.get("selfcheck_passed")
                              and r.get("apply_rel_err", 1) <= 1e-2 and r.get("corrupt_caught") for r in rows)


def stage_selfcheck(ctx: Ctx) -> dict:
    """The plugin's load-time self-check (gsq_vllm/linear.py: GSQLinearMethod.process_weights_after_loading,
    gsq_vllm/kernels: load_kernel, with GSQ_KERNEL=cuda) on real GPU layers: it must pass on correct
    weights, the served layer must match dequantize + matmul, and it must stop a corrupted kernel layout
    with its error."""
    standins = _vllm_standins()
    from gsq_vllm import kernels, linear

    plan = {"layers": [list(x) for x in SELFCHECK_LAYERS], "vllm_standins": standins,
            "selfcheck_ms": list(kernels.SELFCHECK_MS), "limit": kernels.SELFCHECK_MAX_REL_ERR}
    if ctx.dry or not cuda_ready():
        from tests import emu_util  # the cuda-emu kernel is the tests' (the root is on PYTHONPATH)

        emu_util.register_emulated_kernel()
        rows = [_selfcheck_row(linear, spec, "cuda-emu", "cpu") for spec in SELFCHECK_REHEARSAL]
        plan["emulator_rehearsal"] = rows
        if not _selfcheck_ok(rows, "cuda-emu"):
            return dict(status="failed", reason="the self-check flow failed its rehearsal on the CUDA emulator",
                        plan=plan)
        return ctx.skip_no_cuda(plan)
    rows = []
    for spec in SELFCHECK_LAYERS:
        rows.append(_selfcheck_row(linear, spec, "cuda", "cuda"))
        ctx.write(plan=plan, result={"rows": rows})
    ok = _selfcheck_ok(rows, "cuda")
    return dict(status="ok" if ok else "failed", plan=plan, result={"rows": rows},
                reason="" if ok else "a layer failed the self-check, served wrong, or a corrupt layout passed")


# ----------------------------------------------------------------------------- kernel tests


KERNEL_TEST_SHARDS = 3


def stage_kernel_tests(ctx: Ctx) -> dict:
    """tests/test_cuda_kernel.py in 3 shards side by side (round-robin over the collected tests:
    scripts/gpu_check_shard.py), pytest from the carried wheels."""
    import pytest

    base = [sys.executable, "-m", "pytest", "tests/test_cuda_kernel.py", "-p", "gpu_check_shard",
            "-p", "no:cacheprovider", "-q" if ctx.dry else "-v", "-rfE"]
    plan = {"pytest": pytest.__version__, "shards": KERNEL_TEST_SHARDS, "command": " ".join(base[2:]),
            "env": "GSQ_CHECK_SHARD=i/3"}
    env_base = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 3) // KERNEL_TEST_SHARDS)))
    if ctx.dry or not cuda_ready():
        from concurrent.futures import ThreadPoolExecutor

        def collect(i):
            return run_logged(base + ["--collect-only"], ctx.log_path(f"kernel_tests_collect_{i}"),
                              min(180, ctx.remaining()), env=dict(env_base, GSQ_CHECK_SHARD=f"{i}/{KERNEL_TEST_SHARDS}"))

        with ThreadPoolExecutor(KERNEL_TEST_SHARDS) as pool:
            runs = list(pool.map(collect, range(KERNEL_TEST_SHARDS)))
        counts = {}
        for i, r in enumerate(runs):
            if r["rc"] != 0:
                return dict(status="failed", reason=f"collection of shard {i} failed", plan=plan, result={"collect": r})
            counts[i] = len([ln for ln in tail(r["log"], 10**6).splitlines() if "::" in ln])
        plan["collected_per_shard"] = counts
        if min(counts.values()) == 0:
            return dict(status="failed", reason="a shard collected no test", plan=plan)
        return ctx.skip_no_cuda(plan)
    procs = []
    for i in range(KERNEL_TEST_SHARDS):
        log = ctx.log_path(f"kernel_tests_{i}")
        f = open(log, "w")  # noqa: SIM115
        p = spawn(base, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                  env=dict(env_base, GSQ_CHECK_SHARD=f"{i}/{KERNEL_TEST_SHARDS}"))
        procs.append((p, f, log))
    timed_out = False
    for p, f, _ in procs:
        try:
            p.wait(timeout=max(1.0, ctx.remaining()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(p)
            p.wait()
        f.close()
    outcomes: dict[str, str] = {}
    failures = []
    for p, _, log in procs:
        text = tail(log, 10**7)
        for m in re.finditer(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text, re.M):
            outcomes[m.group(1)] = m.group(2)
        failures += [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in set(outcomes.values())}
    rcs = [p.returncode for p, _, _ in procs]
    result = {"counts": counts, "shard_rc": rcs, "timed_out": timed_out, "failures": failures[:40],
              "outcomes": outcomes, "logs": [str(lg) for _, _, lg in procs]}
    ok = not timed_out and all(rc == 0 for rc in rcs) and counts.get("PASSED", 0) > 0 and not counts.get("SKIPPED")
    status = "ok" if ok else ("partial" if timed_out and not failures else "failed")
    return dict(status=status, plan=plan, result=result,
                reason="" if ok else f"{counts}; shard exit codes {rcs}{' (time box)' if timed_out else ''}")


# ----------------------------------------------------------------------------- sanitizer and ncu


def _layer_on_cpu(m, n, k, bits, g, dtype_name, seed):
    import torch

    from gsq_vllm import cuda_gemm as cg
    from gsq_format.format import dequantize, grid_range, pack_codes

    gen = torch.Generator().manual_seed(seed)
    lo, hi = grid_range(bits)
    q = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.005).to(dtype_of(dtype_name))
    b_r, s_r = cg.repack(pack_codes(q, bits), s, bits, g)  # on the CPU: no extra kernels under the tools
    a = (torch.randn(m, k, generator=gen) + 0.1).to(dtype_of(dtype_name))
    return a, b_r, s_r, dequantize(q, s, g)


def stage_launches(ctx: Ctx) -> dict:
    """The driver the tools run: --cases sanitizer (SANITIZER_CASES, each launched twice: the second
    launch finds the split-K counters the first left) or --cases ncu (NCU_CASE, one launch)."""
    import torch

    from gsq_vllm import cuda_gemm as cg

    cases = SANITIZER_CASES if ctx.args.cases == "sanitizer" else [NCU_CASE]
    plan = {"cases": [list(c) for c in cases]}
    for name, m, n, k, bits, g, dt in cases:
        if not cg.cuda_supports(n, k, bits, g):
            raise ValueError(f"{name}: the kernel does not take N={n} K={k} bits={bits} G={g}")
    if ctx.dry or not cuda_ready():
        # Rehearsal: the same cases through the CUDA emulator (the kernel's source on the CPU), those
        # small enough for it, with the same reference; the tools and the GPU are what is left out.
        from gsq_vllm import cuda_emu  # noqa: F401  (registers torch.ops.gsq.gemm_emulated)
        from gsq_format.format import storage_bits

        rehearsal = []
        for i, (name, m, n, k, bits, g, dt) in enumerate(cases if ctx.args.rehearse else []):
            if m * n * k > EMU_REHEARSAL_MAX:
                continue
            a, b_r, s_r, w = _layer_on_cpu(m, n, k, bits, g, dt, seed=i)
            out = torch.ops.gsq.gemm_emulated(a, b_r, s_r, storage_bits(bits), g, n, k)
            ref = a.float() @ w.t()
            rehearsal.append({"case": name, "rel_err": ((out.float() - ref).norm() / ref.norm()).item()})
        plan["emulator_rehearsal"] = rehearsal
        if not all(r["rel_err"] <= 1e-2 for r in rehearsal):
            return dict(status="failed", reason="a case differs from its reference on the CUDA emulator", plan=plan)
        return ctx.skip_no_cuda(plan)
    if not cg.cuda_kernel_available():
        return dict(status="failed", reason=f"gsq_vllm._C not available: {cg._C_ERROR}", plan=plan)
    rows = []
    for i, (name, m, n, k, bits, g, dt) in enumerate(cases):
        if ctx.args.cases == "ncu":
            bk = import_bench_kernel()
            b_r, s_r = bk.random_layer(n, k, bits, g, dtype_of(dt))
            a = torch.randn(m, k, device="cuda", dtype=dtype_of(dt))
            torch.cuda.synchronize()
            out = cg.gsq_gemm(a, b_r, s_r, bits, g, n, k)
            torch.cuda.synchronize()
            rows.append({"case": name, "finite": bool(torch.isfinite(out).all())})
            continue
        a, b_r, s_r, w = _layer_on_cpu(m, n, k, bits, g, dt, seed=i)
        ref = a.float() @ w.t()
        da, db, ds = a.cuda(), b_r.cuda(), s_r.cuda()
        errs = []
        for _ in range(2):
            out = cg.gsq_gemm(da, db, ds, bits, g, n, k)
            torch.cuda.synchronize()
            got = out.float().cpu()
            errs.append(((got - ref).norm() / ref.norm()).item() if torch.isfinite(got).all() else float("inf"))
        rows.append({"case": name, "m": m, "n": n, "k": k, "bits": bits, "group_size": g, "dtype": dt,
                     "rel_err": errs, "ok": max(errs) <= 1e-2})
    ok = all(r.get("ok", r.get("finite")) for r in rows)
    return dict(status="ok" if ok else "failed", plan=plan, result={"rows": rows},
                reason="" if ok else "a launch differs from dequantize + matmul")


def _driver(ctx: Ctx, cases: str, tag: str, dry: bool = False) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "launches", "--cases", cases, "--tag", tag,
           "--out", str(ctx.out), "--scratch", str(ctx.scratch), "--carry", str(ctx.carry),
           "--box-s", str(max(30, int(ctx.remaining())))]
    return cmd + (["--dry-run"] if dry else [])


def sanitizer_counts(text: str) -> list[int]:
    """The counts of memcheck's "ERROR SUMMARY: N errors" and racecheck's "RACECHECK SUMMARY: N hazards
    displayed (E errors, W warnings)" lines: a clean run has at least one, and all zero (warnings count)."""
    return [int(a or b) for a, b in re.findall(r"ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: (\d+) hazard", text)]


def _driver_plan_or_stop(ctx: Ctx, driver: str, tag: str, log: str, seconds: int, plan: dict, exe, tool: str,
                         extra: list | None = None) -> dict | None:
    """Run the launch driver's dry run (its own imports and plan, without the tool: what a dry run can check);
    the stage's record when the stage stops here (the dry run failed, no CUDA, no tool), else None."""
    r = run_logged(_driver(ctx, driver, tag, dry=True) + (extra or []), ctx.log_path(log),
                   min(seconds, ctx.remaining()))
    if r["rc"] != 0:
        return dict(status="failed", reason="the launch driver failed its dry run", plan=plan, result={"driver": r})
    if ctx.dry or not cuda_ready():
        return ctx.skip_no_cuda(plan)
    if exe is None:
        return dict(status="failed", reason=f"{tool} not found", plan=plan)
    return None


def _sanitizer(ctx: Ctx, tool: str) -> dict:
    exe = find_tool("compute-sanitizer")
    cmd = [exe or "compute-sanitizer", "--tool", tool, "--error-exitcode", "86", "--print-limit", "40"]
    if tool == "memcheck":
        cmd += ["--leak-check", "no"]
    tag = f"launches_{tool}"
    plan = {"tool": exe, "version": tool_version(exe), "command": " ".join(cmd + _driver(ctx, "sanitizer", tag)),
            "env": {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if tool == "memcheck" else {},
            "cases": [c[0] for c in SANITIZER_CASES]}
    # The driver's own imports and plan, without the tool (what the dry run can check).
    # (memcheck's also sends the cases through the CPU emulator: --rehearse)
    stop = _driver_plan_or_stop(ctx, "sanitizer", tag, f"{tool}_driver_plan", 180, plan, exe, "compute-sanitizer",
                                ["--rehearse"] if tool == "memcheck" else [])
    if stop:
        return stop
    # memcheck sees out-of-bounds accesses only at allocation edges: no caching allocator.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1") if tool == "memcheck" else None
    r = run_logged(cmd + _driver(ctx, "sanitizer", tag), ctx.log_path(tool), ctx.remaining(), env=env)
    text = tail(r["log"], 10**6)
    summary = re.findall(r"(ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)", text)
    driver = _read_json(ctx.out / f"{tag}.json")
    result = {"rc": r["rc"], "timed_out": r["timed_out"], "wall_s": r["wall_s"], "summary": summary,
              "driver": driver.get("result"), "driver_status": driver.get("status"), "tail": r["tail"][-2500:]}
    counts = sanitizer_counts(text)
    result["reported"] = counts
    clean = r["rc"] == 0 and driver.get("status") == "ok" and bool(counts) and not any(counts)
    return dict(status="ok" if clean else ("partial" if r["timed_out"] else "failed"), plan=plan, result=result,
                reason="" if clean else f"{tool}: rc {r['rc']}, {summary or 'no summary line'}")


def stage_memcheck(ctx: Ctx) -> dict:
    return _sanitizer(ctx, "memcheck")


def stage_racecheck(ctx: Ctx) -> dict:
    return _sanitizer(ctx, "racecheck")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


BYTES = {"byte": 1, "b": 1, "kbyte": 1e3, "kb": 1e3, "mbyte": 1e6, "mb": 1e6, "gbyte": 1e9, "gb": 1e9}
SECONDS = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3, "second": 1, "s": 1}


def parse_ncu(text: str) -> dict:
    """ncu --csv output (its lines that start with a quote) -> {"metrics": {name: {value, unit}}, and
    dram_read_bytes, duration_us, achieved_read_gbs, pct_of_peak when those metrics are there}."""
    import csv

    metrics = {}
    rows = list(csv.reader([ln for ln in text.splitlines() if ln.startswith('"')]))
    head = rows[0] if rows else []
    for row in rows[1:]:
        rec = dict(zip(head, row))
        if rec.get("Metric Name"):
            metrics[rec["Metric Name"]] = {"value": rec.get("Metric Value"), "unit": rec.get("Metric Unit"),
                                           "kernel": (rec.get("Kernel Name") or "")[:120]}
    out: dict = {"metrics": metrics}

    def val(name, scale):
        v = float(metrics[name]["value"].replace(",", ""))
        return v * scale.get((metrics[name]["unit"] or "").strip().lower(), 1.0)

    try:
        read_b = val("dram__bytes_read.sum", BYTES)
        dur_s = val("gpu__time_duration.sum", SECONDS)
        out.update(dram_read_bytes=read_b, duration_us=dur_s * 1e6, achieved_read_gbs=read_b / dur_s / 1e9,
                   pct_of_peak=val("dram__throughput.avg.pct_of_peak_sustained_elapsed", {}))
    except (KeyError, ValueError, ZeroDivisionError, AttributeError) as e:
        out["parse_error"] = repr(e)
    return out


def stage_ncu(ctx: Ctx) -> dict:
    """One decode launch under Nsight Compute: achieved DRAM throughput (ncu flushes the caches
    before the profiled launch; clocks left as they run, not locked to base)."""
    exe = find_tool("ncu")
    tag = "launches_ncu"
    cmd = [exe or "ncu", "--target-processes", "all", "--kernel-name", "regex:gsq_decode_kernel", "--launch-count", "1",
           "--cache-control", "all", "--clock-control", "none", "--csv", "--print-units", "base",
           "--metrics", ",".join(NCU_METRICS)]
    _, _, n, k, bits, g, _ = NCU_CASE
    plan = {"tool": exe, "version": tool_version(exe), "case": list(NCU_CASE),
            "weight_and_scale_bytes": n * k * bits // 8 + n * (k // g) * 2,
            "command": " ".join(cmd + _driver(ctx, "ncu", tag))}
    stop = _driver_plan_or_stop(ctx, "ncu", tag, "ncu_driver_plan", 120, plan, exe, "ncu")
    if stop:
        return stop
    r = run_logged(cmd + _driver(ctx, "ncu", tag), ctx.log_path("ncu"), ctx.remaining())
    result = {"rc": r["rc"], "tail": r["tail"][-2000:], **parse_ncu(tail(r["log"], 10**6))}
    ok = r["rc"] == 0 and "achieved_read_gbs" in result
    return dict(status="ok" if ok else "failed", plan=plan, result=result,
                reason="" if ok else "no DRAM metrics read (see logs/ncu.log; ERR_NVGPUCTRPERM = no counter access)")


# ----------------------------------------------------------------------------- main


STAGES = {
    "deps": stage_deps, "env": stage_env, "build": stage_build, "humming": stage_humming,
    "gsq_steps": stage_gsq_steps, "gsq_tiny": stage_gsq_tiny, "selfcheck": stage_selfcheck,
    "kernel_tests": stage_kernel_tests, "bench": stage_bench, "ncu": stage_ncu, "memcheck": stage_memcheck,
    "racecheck": stage_racecheck, "launches": stage_launches,
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=sorted(STAGES))
    ap.add_argument("--out", type=Path, required=True, help="output folder (JSON per stage, logs/)")
    ap.add_argument("--scratch", type=Path, required=True, help="work folder (wheels installed, builds, models)")
    ap.add_argument("--carry", type=Path, required=True, help="the prepared folder (wheels/, cache/, pkgs/)")
    ap.add_argument("--box-s", type=float, default=600.0, help="this stage's time box (it stops its work before)")
    ap.add_argument("--dry-run", action="store_true", help="imports, arguments and plan only: no CUDA work")
    ap.add_argument("--cases", choices=("sanitizer", "ncu"), default="sanitizer", help="launches: which cases")
    ap.add_argument("--tag", default=None, help="launches: JSON name (default: launches)")
    ap.add_argument("--rehearse", action="store_true", help="launches --dry-run: run the cases on the CPU emulator")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    import signal

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _end_children)
    fn = STAGES[args.stage]
    if args.stage == "launches":
        args.stage = args.tag or "launches"  # the JSON's name: one per tool
    try:
        ctx = Ctx(args)
    except OSError as e:
        print(f"gpu_check_stages: {e}", file=sys.stderr)
        return 2
    try:
        rec = fn(ctx)
    except Exception as e:  # noqa: BLE001
        ctx.write(status="failed", reason=f"{type(e).__name__}: {e}"[:800], traceback=traceback.format_exc()[-4000:])
        print(traceback.format_exc(), file=sys.stderr)
        return 1
    ctx.write(**rec)
    print(f"[{ctx.stage}] {rec.get('status')}: {rec.get('reason', '')}", flush=True)
    return 0 if rec.get("status") in ("ok", "skipped", "partial") else 1


if __name__ == "__main__":
    sys.exit(main())

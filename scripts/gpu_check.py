"""One offline run of every GPU check (issue 31): build, correctness, sanitizers, benchmarks, GSQ on CUDA.

    python scripts/gpu_check.py OUT [--dry-run] [--budget-s 470] [--only a,b] [--skip a,b]
    python scripts/gpu_check.py --prepare [--carry .gpu_carry] [--python-version 3.12]

Made for a GPU machine lent for minutes: one H100/H200, Python 3.12, torch (CUDA), nvcc, ncu and
compute-sanitizer, no vLLM, no network. Everything it needs beyond the image comes in the
carried folder (default ``.gpu_carry/``, git-ignored) that ``--prepare`` fills here, online:
wheels (``pip download``), the default model's tokenizer (weights left out) and the calibration
corpus file.

Each stage runs as its own process under ``timeout`` (its time box, cut to what is left of the
run's budget), writes ``OUT/STAGE.json`` and ``OUT/logs/STAGE*.log``; a stage that fails or runs
out of time costs only itself. At the end ``OUT/summary.md`` (one table per question) and
``OUT/summary.json``. Order: deps, env; then the CUDA build side by side with the stages that need
no extension (Humming, GSQ steps/s, a tiny gsq-quantize run, one after another); then the
correctness stages side by side (self-check, kernel tests, memcheck, racecheck); then the timings
alone on the GPU (kernel benchmark, ncu). Without a CUDA device (or with --dry-run) every stage still
imports what it uses, checks its arguments and writes its plan, and records ``skipped: no CUDA``.
Exit status 0 when no stage failed.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
STAGES_PY = SCRIPTS / "gpu_check_stages.py"
DEFAULT_CARRY = ROOT / ".gpu_carry"
DEFAULT_BUDGET_S = 470  # of the 8 minutes the issue allows; the rest is margin for the summary
DRY_BOX_FLOOR_S = 240   # a dry stage only imports and plans: never cut it short on a slow CI machine
CARRY_LIMIT_MIB = 60    # the device call carries at most 64 MiB with the working tree


@dataclass(frozen=True)
class Stage:
    name: str
    box_s: int   # its own time box
    phase: str   # pre | build | during-build | check | timed
    needs_build: bool
    what: str


# Phases: pre (in order) -> build beside during-build (in order, GPU stages that need no extension)
# -> check (side by side: correctness only, timings not taken) -> timed (in order, the GPU alone).
STAGES = [
    Stage("deps", 60, "pre", False, "carried wheels the image lacks, into a scratch folder (pip --no-index --no-deps --target)"),
    Stage("env", 60, "pre", False, "GPU, driver, torch/CUDA, tools"),
    Stage("build", 240, "build", False, "gsq_vllm._C for this GPU's arch only + CPU extensions (setup.py build_ext --inplace)"),
    Stage("humming", 90, "during-build", False, "Humming on the same layers (its own configs), while the build runs"),
    Stage("gsq_steps", 60, "during-build", False, "GSQ steps/s, one Llama-3.1-8B block (random weights)"),
    Stage("gsq_tiny", 60, "during-build", False, "gsq-quantize --device cuda on a tiny Llama"),
    Stage("selfcheck", 60, "check", True, "the plugin's load-time self-check (GSQ_KERNEL=cuda)"),
    Stage("kernel_tests", 150, "check", True, "tests/test_cuda_kernel.py (3 shards side by side)"),
    Stage("memcheck", 120, "check", True, "compute-sanitizer memcheck, small decode/prefill launches"),
    Stage("racecheck", 150, "check", True, "compute-sanitizer racecheck, same launches"),
    Stage("bench", 110, "timed", True, "kernel vs dense fp16 matmul, Llama-3.1-8B/70B layers, M 1..256"),
    Stage("ncu", 60, "timed", True, "ncu: achieved DRAM throughput of one decode launch"),
]
BY_NAME = {s.name: s for s in STAGES}


# ----------------------------------------------------------------------------- prepare (online, here)


def _humming_version() -> str:
    """benchmarks/kernel_static.py's HUMMING_VERSION (the version the static model compiled)."""
    try:
        tree = ast.parse((ROOT / "benchmarks" / "kernel_static.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "HUMMING_VERSION" for t in node.targets):
                return ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        pass
    return "0.1.19"


def carried_requirements() -> list[tuple[str, str]]:
    """(requirement, why) of every wheel carried; a distribution this environment has is pinned to
    its version here (what CI tests with)."""
    import importlib.metadata as md

    wanted = [
        ("lion-pytorch", "GSQ's optimizer (quantize/gsq.py)"),
        ("gguf", "a dependency of the package (GGUF paths)"),
        ("pytest", "tests/test_cuda_kernel.py"), ("pluggy", "pytest"), ("iniconfig", "pytest"),
        ("pygments", "pytest"), ("packaging", "pytest"),
        ("ninja", "torch's extension build (parallel compile)"),
        ("matplotlib", "gsq-quantize's report plots"), ("contourpy", "matplotlib"), ("cycler", "matplotlib"),
        ("fonttools", "matplotlib"), ("kiwisolver", "matplotlib"), ("pillow", "matplotlib"),
        ("pyparsing", "matplotlib"), ("python-dateutil", "matplotlib"), ("six", "python-dateutil"),
        (f"humming-kernels=={_humming_version()}", "the Humming comparison (kernel_static.py's version)"),
        ("cuda-bindings", "humming-kernels"), ("cuda-pathfinder", "humming-kernels"), ("tabulate", "humming-kernels"),
    ]
    out = []
    for req, why in wanted:
        if "==" not in req:
            try:
                req = f"{req}=={md.version(req)}"
            except md.PackageNotFoundError:
                req = "cuda-bindings>=13,<14" if req == "cuda-bindings" else req
        out.append((req, why))
    return out


def prepare(carry: Path, python_version: str) -> int:
    """Fill the carried folder (needs the registry and the project's environment)."""
    from gsq_format.format import TOKENIZER_FILES
    from quantize.data import corpus_path
    from quantize.models import DEFAULT_MODEL_NAME, prepare_default_model

    carry.mkdir(parents=True, exist_ok=True)
    for old in ("wheels", "cache", "pkgs"):  # what an earlier --prepare left (stale versions)
        shutil.rmtree(carry / old, ignore_errors=True)
    wheels = carry / "wheels"
    wheels.mkdir()
    reqs = carried_requirements()
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
           "--platform", "any", "-d", str(wheels), "-q", "--disable-pip-version-check"]
    print(f"[prepare] pip download {len(reqs)} wheels for Python {python_version} into {wheels}", flush=True)
    res = subprocess.run(pip + [r for r, _ in reqs])
    if res.returncode != 0:
        failed = [r for r, _ in reqs if subprocess.run(pip + [r]).returncode != 0]
        print(f"[prepare] could not download: {failed}", file=sys.stderr)
        return 1
    # The tokenizer of the embedded default model, where quantize.models looks for the prepared
    # model under GSQ_CACHE: quantize/tiny.py reads only its tokenizer, so the weights (270 MB)
    # stay behind. Anything that needs the default model's weights fails loudly on the device.
    src = prepare_default_model()
    dest = carry / "cache" / "models" / f"{DEFAULT_MODEL_NAME}-bf16"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("config.json", *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    (dest / "STAND-IN.txt").write_text("Tokenizer and config of the prepared default model; weights left out "
                                       "(scripts/gpu_check.py --prepare).\n")
    # The calibration corpus, where quantize.data looks for it (inside the package `evals`, which
    # the device lacks): its wikipedia file alone, under a namespace folder on the stages' PYTHONPATH.
    corpus = corpus_path("wikipedia")
    pkg = carry / "pkgs" / "evals"
    shutil.rmtree(pkg, ignore_errors=True)
    dest = pkg / corpus.relative_to(corpus.parents[3])
    dest.parent.mkdir(parents=True)
    shutil.copy2(corpus, dest)
    (carry / "pkgs" / "STAND-IN.txt").write_text("evals/: one corpus file of the package evals (quantize/data.py), "
                                                  "none of its code (scripts/gpu_check.py --prepare).\n")
    files = [p for p in carry.rglob("*") if p.is_file() and p.name != "manifest.json"]
    total = sum(p.stat().st_size for p in files)
    manifest = {"prepared": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "python_version": python_version, "requirements": dict(reqs), "bytes": total,
                "files": {str(p.relative_to(carry)): p.stat().st_size for p in sorted(files)}}
    (carry / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"[prepare] {carry}: {len(files)} files, {total / 2**20:.1f} MiB "
          f"(carry it: the device call's carry=[\"{carry.name}\"])")
    if total > CARRY_LIMIT_MIB * 2**20:
        print(f"[prepare] more than {CARRY_LIMIT_MIB} MiB: the device call will refuse it", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- run


class Runner:
    def __init__(self, args):
        self.args = args
        self.out: Path = args.out.resolve()
        self.carry: Path = args.carry.resolve()
        self.scratch: Path = args.scratch.resolve()
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget_s
        self.dry = args.dry_run
        self.records: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.active: set[subprocess.Popen] = set()
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)
        site = self.scratch / "site"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site), str(SCRIPTS), str(self.carry / "pkgs")]
                                            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PATH"] = os.pathsep.join([str(site / "bin"), env.get("PATH", "")])
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_NO_INDEX="1",
                   GSQ_CACHE=str(self.carry / "cache"), HUMMING_CACHE_DIR=str(self.scratch / "humming-cache"),
                   HUMMING_TMP_DIR=str(self.scratch / "humming-tmp"), TOKENIZERS_PARALLELISM="false")
        self.env = env

    def selected(self, st: Stage) -> bool:
        only = {s for s in (self.args.only or "").split(",") if s}
        skip = {s for s in (self.args.skip or "").split(",") if s}
        return (not only or st.name in only) and st.name not in skip

    def say(self, msg: str) -> None:
        with self.lock:
            print(f"[gpu_check {time.time() - self.t0:6.1f}s] {msg}", flush=True)

    def record(self, name: str, rec: dict) -> dict:
        rec.setdefault("stage", name)
        rec.setdefault("what", BY_NAME[name].what)
        with self.lock:
            self.records[name] = rec
        path = self.out / f"{name}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(rec, indent=1, default=str))
        os.replace(tmp, path)
        return rec

    def skip(self, st: Stage, reason: str) -> dict:
        self.say(f"{st.name:12} skipped   {reason}")
        return self.record(st.name, {"status": "skipped", "reason": reason, "box_s": 0, "wall_s": 0})

    def run(self, st: Stage, extra_env: dict | None = None) -> dict:
        left = self.deadline - time.time() - 5
        box = max(st.box_s, DRY_BOX_FLOOR_S) if self.dry else min(st.box_s, left)
        if box < 20:
            return self.skip(st, f"not reached: {max(0, int(left))} s left of the run's {self.args.budget_s} s budget")
        box = int(box)
        cmd = [sys.executable, str(STAGES_PY), st.name, "--out", str(self.out), "--scratch", str(self.scratch),
               "--carry", str(self.carry), "--box-s", str(box)] + (["--dry-run"] if self.dry else [])
        timeout = shutil.which("timeout")
        full = ([timeout, "-k", "10", str(box)] if timeout else []) + cmd
        env = dict(self.env, **(extra_env or {}))
        (self.out / f"{st.name}.json").unlink(missing_ok=True)
        t = time.time()
        log = self.out / "logs" / f"{st.name}.log"
        with open(log, "w") as f:
            f.write("$ " + " ".join(full) + "\n")
            f.flush()
            # A session of its own: on SIGTERM (gpu_check.sh's outer timeout) _stop ends it, stage and all.
            p = subprocess.Popen(full, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
            p.stage = st.name
            with self.lock:
                self.active.add(p)
            try:
                rc = p.wait(timeout=box + 30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc = p.wait()
            finally:
                with self.lock:
                    self.active.discard(p)
        wall = time.time() - t
        try:
            rec = json.loads((self.out / f"{st.name}.json").read_text())
        except (OSError, json.JSONDecodeError):
            rec = {}
        if rc in (124, 137):
            rec["status"] = "timeout"
            rec["reason"] = f"time box of {box} s reached" + (f" (last: {rec['reason']})" if rec.get("reason") else "")
        elif rc != 0 and rec.get("status") in (None, "running", "ok", "skipped", "partial"):
            rec["status"] = "failed"
            rec["reason"] = rec.get("reason") or f"exit status {rc}, no result written (see logs/{st.name}.log)"
        elif not rec:
            rec = {"status": "failed", "reason": "no result written"}
        if rec.get("status") == "failed" and not rec.get("log_tail"):
            rec["log_tail"] = log.read_text(errors="replace")[-3000:]
        rec.update(box_s=box, wall_s=round(wall, 1), rc=rc, log=f"logs/{st.name}.log")
        self.say(f"{st.name:12} {rec['status']:9} {wall:6.1f} s of {box:3d}  {rec.get('reason', '')}")
        return self.record(st.name, rec)

    def _stop(self, signum, frame) -> None:
        """SIGTERM/SIGINT: end the running stages (their whole sessions), keep the summary."""
        with self.lock:
            running = list(self.active)
        for p in running:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.record(p.stage, {"status": "timeout", "reason": f"stopped by signal {signum} (the run's outer "
                                  "time limit?) while running", "log": f"logs/{p.stage}.log"})
        raise SystemExit(128 + signum)

    def go(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            return self._go()
        finally:
            if not (self.out / "summary.md").is_file():  # stopped early: what there is, summarised
                write_summary(self)
                self.say("stopped before the end; the summary has the stages that finished")

    def _go(self) -> int:
        (self.out / "summary.md").unlink(missing_ok=True)
        self.say(f"out {self.out}; carry {self.carry}; scratch {self.scratch}; budget {self.args.budget_s} s"
                 + ("; dry run" if self.dry else ""))
        for st in STAGES:
            if st.phase == "pre" and self.selected(st):
                self.run(st)
        env_rec = self.records.get("env", {})
        if not self.dry and not env_rec.get("result", {}).get("cuda_available", "env" not in self.records):
            self.dry = True
            self.say("no CUDA device: every stage runs dry (imports, arguments, plan)")
        build = BY_NAME["build"]
        thread = None
        if self.selected(build):
            thread = threading.Thread(target=self.run, args=(build,), daemon=True)
            thread.start()
        # The extension-free GPU stages fill the build's time; GSQ_SOFT_KERNEL=torch keeps them off
        # quantize._C while it is being built (on CUDA GSQ uses the torch formulas anyway).
        for st in STAGES:
            if st.phase == "during-build" and self.selected(st):
                self.run(st, {"GSQ_SOFT_KERNEL": "torch"})
        if thread is not None:
            thread.join()
        b = self.records.get("build", {})
        built = b.get("status") == "ok" or self.dry or not self.selected(build)

        def go_or_skip(st):
            if st.needs_build and not built:
                self.skip(st, f"needs gsq_vllm._C: build {b.get('status')} ({b.get('reason', '')})")
            else:
                self.run(st)

        # Correctness stages side by side (their wall time overlaps; none of them is a timing) ...
        threads = [threading.Thread(target=go_or_skip, args=(st,), daemon=True) for st in STAGES
                   if st.phase == "check" and self.selected(st)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # ... then the timings, one at a time with the GPU to themselves.
        for st in STAGES:
            if st.phase == "timed" and self.selected(st):
                go_or_skip(st)
        summary = write_summary(self)
        self.say(f"wrote {self.out / 'summary.md'} and summary.json")
        print(summary)
        bad = [n for n, r in self.records.items() if r.get("status") in ("failed", "timeout")]
        if bad:
            self.say(f"failed or timed out: {', '.join(bad)}")
        return 1 if bad else 0


# ----------------------------------------------------------------------------- summary


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _stage_line(name: str, r: dict) -> str:
    res = r.get("result") or {}
    st = r.get("status")
    if st == "skipped" or not res:
        return r.get("reason", "")
    try:
        if name == "deps":
            return (f"installed {', '.join(res.get('installed', {})) or 'none'}"
                    + (f" (from an earlier run: {', '.join(res['present_from_earlier_run'])})"
                       if res.get("present_from_earlier_run") else "")
                    + f"; image had {', '.join(res.get('present_in_image', {})) or 'none'}; "
                    f"failed {list(res.get('failed', {})) or 'none'}")
        if name == "env":
            return f"{r.get('device')}; torch {res.get('torch')} (CUDA {res.get('torch_cuda')}); python {res.get('python')}"
        if name == "build":
            return (f"SASS {res.get('sass_arches')}; kernel available {res.get('import', {}).get('cuda_kernel_available')}; "
                    f"cuda {res.get('cuda', {}).get('wall_s')} s, cpu {res.get('cpu', {}).get('wall_s')} s")
        if name == "kernel_tests":
            return f"{res.get('counts')}" + (f"; first failure: {res['failures'][0][:150]}" if res.get("failures") else "")
        if name == "selfcheck":
            return "; ".join(f"{x['layer'].split('.')[-1]} {x['bits']}-bit: kernel {x.get('kernel')}, passed "
                             f"{x.get('selfcheck_passed')}, err {_f(x.get('apply_rel_err'), '{:.1e}')}, corrupt caught "
                             f"{x.get('corrupt_caught')}" for x in res.get("rows", []))
        if name in ("memcheck", "racecheck"):
            return f"{'; '.join(res.get('summary') or ['no summary'])}; launches {res.get('driver_status')}"
        if name == "ncu":
            return (f"8B gate_up M=1 2-bit: {_f(res.get('achieved_read_gbs'), '{:.0f}')} GB/s read, "
                    f"{_f(res.get('pct_of_peak'))} % of peak DRAM, {_f(res.get('duration_us'))} us")
        if name == "bench":
            return f"{len(res.get('rows', []))} cases; D2D copy {_f(res.get('copy_gbs'), '{:.0f}')} GB/s"
        if name == "humming":
            return f"{len(res.get('rows', []))} cases, {len(res.get('errors', []))} errors"
        if name == "gsq_steps":
            return "; ".join(f"{x['label']}: {_f(x.get('steady_steps_per_s'), '{:.2f}')} steps/s"
                             if "error" not in x else f"{x['label']}: {x['error'][:80]}" for x in res.get("runs", []))
        if name == "gsq_tiny":
            return f"rc {res.get('rc')}, {_f(res.get('wall_s'))} s, {_f(res.get('bits_per_weight'), '{:.3f}')} bits/weight"
    except (KeyError, TypeError, IndexError) as e:
        return f"(summary: {e!r})"
    return r.get("reason", "")


def kernel_table(records: dict) -> list[str]:
    bench = (records.get("bench") or {}).get("result") or {}
    hum = (records.get("humming") or {}).get("result") or {}
    rows = bench.get("rows") or []
    if not rows and not hum.get("rows"):
        return []
    ours = {(r["model"], r["layer"], r["bits"], r["m"]): r for r in rows}
    humm = {(r["model"], r["layer"], r["bits"], r["m"]): r for r in hum.get("rows", [])}
    keys = sorted({(k[0], k[1], k[3]) for k in list(ours) + list(humm)},
                  key=lambda x: (x[0], ["qkv", "o", "gate_up", "down"].index(x[1]) if x[1] in
                                 ("qkv", "o", "gate_up", "down") else 9, x[2]))

    def g(rec, part):
        if rec is None:
            return None
        t = rec.get(part) or {}
        return t.get("graph_us") or t.get("stream_us")

    lines = ["", "## Kernel time per launch (us; CUDA graph of back-to-back launches, weights rotated past L2; "
             "fp16, G=128)", "",
             "| model | layer | M | dense | ours 2b | ours 3b | Humming 2b | Humming 3b | 2b x dense | 3b x dense "
             "| 2b x Humming | 3b x Humming | 2b GB/s | 3b GB/s |", "|" + "---|" * 14]
    for model, layer, m in keys:
        o2, o3 = ours.get((model, layer, 2, m)), ours.get((model, layer, 3, m))
        h2, h3 = humm.get((model, layer, 2, m)), humm.get((model, layer, 3, m))
        d = g(o2 or o3, "dense")
        t2, t3, th2, th3 = g(o2, "ours"), g(o3, "ours"), g(h2, "humming"), g(h3, "humming")
        ratio = (lambda a, b: None if a is None or b is None else a / b)
        lines.append(f"| {model} | {layer} | {m} | {_f(d)} | {_f(t2)} | {_f(t3)} | {_f(th2)} | {_f(th3)} | "
                     f"{_f(ratio(d, t2), '{:.2f}')} | {_f(ratio(d, t3), '{:.2f}')} | {_f(ratio(th2, t2), '{:.2f}')} | "
                     f"{_f(ratio(th3, t3), '{:.2f}')} | {_f(o2 and o2.get('gbs'), '{:.0f}')} | "
                     f"{_f(o3 and o3.get('gbs'), '{:.0f}')} |")
    lines += ["", "Ratios above 1: ours faster. Launch overhead (M=1, 2-bit; us per launch: one launch between "
              "events, synchronised / back to back on the stream / in a CUDA graph):", "",
              "| model | layer | ours event | ours stream | ours graph | dense event | dense stream | dense graph |",
              "|" + "---|" * 8]
    for (model, layer, bits, m), r in sorted(ours.items()):
        if bits == 2 and m == 1:
            o, d = r["ours"], r["dense"]
            lines.append(f"| {model} | {layer} | {_f(o.get('event_us'))} | {_f(o.get('stream_us'))} | "
                         f"{_f(o.get('graph_us'))} | {_f(d.get('event_us'))} | {_f(d.get('stream_us'))} | "
                         f"{_f(d.get('graph_us'))} |")
    return lines


def write_summary(runner: Runner) -> str:
    recs = runner.records
    env = (recs.get("env") or {}).get("result") or {}
    dev = (env.get("devices") or [{}])[0]
    device = env.get("device_name") or "no CUDA device"
    lines = [f"# GPU check: {device}", "",
             f"`bash scripts/gpu_check.sh OUT`{' --dry-run' if runner.args.dry_run else ''}, "
             f"{_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; wall {time.time() - runner.t0:.0f} s "
             f"(budget {runner.args.budget_s} s){'; **dry run: no CUDA work was done**' if runner.dry else ''}.", ""]
    if dev:
        lines.append(f"Device: {device}, compute capability {dev.get('capability')}, {dev.get('sms')} SMs, "
                     f"{dev.get('memory_gib')} GiB; nvidia-smi: {env.get('nvidia_smi', '-')}.")
    lines.append(f"Host: Python {env.get('python', platform.python_version())}, torch {env.get('torch')} "
                 f"(CUDA {env.get('torch_cuda')}), {env.get('cpus')} CPUs; nvcc "
                 f"{((env.get('tools') or {}).get('nvcc') or {}).get('version')}.")
    lines += ["", "| stage | status | wall s / box s | result |", "|---|---|---|---|"]
    for st in STAGES:
        r = recs.get(st.name)
        if r is None:
            continue
        lines.append(f"| {st.name} | {r.get('status')} | {_f(r.get('wall_s'), '{:.0f}')} / {r.get('box_s', '-')} | "
                     f"{_stage_line(st.name, r).replace('|', '/')} |")
    lines += kernel_table(recs)
    gsq = (recs.get("gsq_steps") or {}).get("result") or {}
    if gsq.get("runs"):
        lines += ["", "## GSQ on CUDA: one Llama-3.1-8B block (random weights, all 7 linears, fp32)", "",
                  "| run | steps/s (steady) | steps | tokens/step | refine_block s | peak GiB |", "|---|---|---|---|---|---|"]
        for x in gsq["runs"]:
            lines.append(f"| {x['label']} | {_f(x.get('steady_steps_per_s'), '{:.2f}')} | {x.get('steps', '-')} | "
                         f"{x.get('tokens_per_step', '-')} | {_f(x.get('refine_block_s'))} | {_f(x.get('peak_gib'))} |")
    text = "\n".join(lines) + "\n"
    (runner.out / "summary.md").write_text(text)
    meta = {"device": device, "dry_run": runner.dry, "budget_s": runner.args.budget_s,
            "wall_s": round(time.time() - runner.t0, 1), "stages": recs}
    (runner.out / "summary.json").write_text(json.dumps(meta, indent=1, default=str))
    return text


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, help="output folder (on the device: $OUT)")
    ap.add_argument("--dry-run", action="store_true", help="imports, arguments and plans only; no CUDA work")
    ap.add_argument("--budget-s", type=int, default=DEFAULT_BUDGET_S, help="wall-time budget of the whole run")
    ap.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out")
    ap.add_argument("--carry", type=Path, default=Path(os.environ.get("GSQ_CARRY", DEFAULT_CARRY)),
                    help="the prepared folder (default .gpu_carry, or $GSQ_CARRY)")
    ap.add_argument("--scratch", type=Path, default=Path(os.environ.get("GSQ_SCRATCH", "/tmp/gsq-gpu-check")),
                    help="work folder for installs, builds and models (default /tmp/gsq-gpu-check, or $GSQ_SCRATCH)")
    ap.add_argument("--prepare", action="store_true", help="fill --carry (online, in the project's environment)")
    ap.add_argument("--python-version", default="3.12", help="--prepare: the device's Python (default 3.12)")
    args = ap.parse_args(argv)
    names = {s.name for s in STAGES}
    for opt in ("only", "skip"):
        unknown = {s for s in getattr(args, opt).split(",") if s} - names
        if unknown:
            ap.error(f"--{opt}: unknown stage(s) {sorted(unknown)}; stages: {', '.join(s.name for s in STAGES)}")
    if not args.prepare and args.out is None:
        ap.error("give the output folder (or --prepare)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(args.carry.resolve(), args.python_version)
    return Runner(args).go()


if __name__ == "__main__":
    sys.exit(main())

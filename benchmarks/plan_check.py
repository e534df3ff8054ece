"""Check ``gsq-quantize --plan`` against measured runs: planned vs peak resident memory (host).

Each configuration runs ``gsq-quantize`` twice in fresh processes: once with ``--plan`` (the
static model of the pipeline's tensors), once for real on the CPU, under a small Python parent
that reports the child's peak RSS (``ru_maxrss``). Prints a table and writes JSON.
The GPU columns of a plan cannot be checked here (no GPU).

    python -m benchmarks.plan_check --out benchmarks/results/plan_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results_io import RESULTS, add_common_args, machine_line, read_json, write_json

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30

# name -> gsq-quantize arguments (model "default" is SmolLM2-135M-Instruct; "tiny" a 2-layer Llama)
CONFIGS = {
    "tiny-rtn": ["--model", "tiny", "--method", "rtn", "--nsamples", "4", "--seqlen", "64"],
    "smollm2-gptq-2-mlp-32x256": ["--model", "default", "--method", "gptq", "--bits", "2", "--skip-attention",
                                  "--nsamples", "32", "--seqlen", "256"],
    "smollm2-gptq-2-all-96x1024": ["--model", "default", "--method", "gptq", "--bits", "2",
                                    "--nsamples", "96", "--seqlen", "1024"],
    "smollm2-gsq-3-mlp-paper-32x512": ["--model", "default", "--method", "gsq", "--bits", "3", "--skip-attention",
                                       "--preset", "paper", "--gsq-epochs", "1", "--nsamples", "32",
                                       "--seqlen", "512"],
}

_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr); sys.exit(rc)")


def _quantize_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "quantize.cli", *args]


def run_one(name: str, args: list[str], tmp: Path) -> dict:
    plan_json = tmp / f"{name}.plan.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(_quantize_cmd([*args, "--device", "cpu", "--plan", "--plan-json", str(plan_json)]),
                   check=True, env=env, capture_output=True, cwd=ROOT)
    plan = json.loads(plan_json.read_text())
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", _PEAK, *_quantize_cmd([*args, "--device", "cpu",
                                                                      "--out", str(tmp / name)])],
                       env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{name}: gsq-quantize failed:\n{p.stderr[-3000:]}")
    peak = int(p.stderr.strip().splitlines()[-1])
    return {"planned_host_bytes": plan["host_peak_bytes"], "measured_peak_rss_bytes": peak,
            "ratio": plan["host_peak_bytes"] / peak, "stage": plan["stage"], "seconds": round(time.time() - t0),
            "args": args}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    add_common_args(ap, str(RESULTS / "plan_check.json"), flag="--out")
    args = ap.parse_args(argv)
    results = read_json(args.out)
    with tempfile.TemporaryDirectory(prefix="plan-check-") as d:
        tmp = Path(d)
        tiny = None
        for name in args.configs:
            cfg = list(CONFIGS[name])
            if "tiny" in cfg:
                if tiny is None:
                    from quantize.tiny import build_tiny_llama

                    tiny = build_tiny_llama(tmp / "tiny-model", layers=2)
                cfg[cfg.index("tiny")] = str(tiny)
            res = run_one(name, cfg, tmp)
            res["machine"] = machine_line()
            results[name] = res
            print(f"{name:34} planned {res['planned_host_bytes'] / GiB:6.2f} GiB  measured "
                  f"{res['measured_peak_rss_bytes'] / GiB:6.2f} GiB  plan/measured {res['ratio']:.2f}  "
                  f"({res['stage']}, {res['seconds']} s)", flush=True)
            write_json(results, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

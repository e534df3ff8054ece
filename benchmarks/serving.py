"""Serving benchmark: bf16 vs gsq-2 vs gsq-3 through vLLM's OpenAI API (CPU or GPU).

For each model folder it starts one server on 127.0.0.1 (``gsq_vllm.serve``,
random free port), sends streamed greedy completions with ``ignore_eos`` at
each concurrency, stops the server, and reports per (model, concurrency):

* ``output_tok_s``: all generated tokens / wall time of the run;
* ``decode_tok_s``: median per-request (tokens-1) / (last - first token time);
* ``ttft_ms`` and ``itl_ms``: p50 / p90 / p99 of time-to-first-token and
  inter-token latency (gaps between streamed chunks of one token each).

    python -m benchmarks.serving --models bf16=DIR gsq2=DIR gsq3=DIR \
        --concurrency 1 8 --requests 8 --max-tokens 128 --out bench.json

``--model-env NAME:KEY=VALUE`` sets an environment variable for one model's server only, so
one run can compare kernels on the same checkpoint, e.g. ``--models gsq2=DIR gsq2-int8=DIR
--model-env gsq2-int8:GSQ_CPU_ISA=avx2int8``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.results_io import add_common_args, cpu_name, write_json

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def start_server(model: str, port: int, extra: list[str], log_path: Path,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, "-m", "gsq_vllm.serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", *extra]
    return subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started by :func:`start_server` as Ctrl-C does (SIGINT, vLLM's own shutdown
    path); kill it if it is still up after 60 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_ready(proc: subprocess.Popen, base: str, timeout_s: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError("server did not start in time")


@contextlib.contextmanager
def running_server(model: str, extra: list[str], log_path: Path, timeout_s: float = 900,
                   extra_env: dict[str, str] | None = None):
    """``with running_server(folder, args, log) as (base_url, startup_s):`` a ``gsq-serve`` of
    ``folder`` on a free port of 127.0.0.1 (served model name "bench"), up and answering;
    stopped on exit, whatever happens inside. ``extra_env`` is added to this server's environment."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(model, port, extra, log_path, extra_env)
    try:
        yield base, wait_ready(proc, base, timeout_s)
    finally:
        stop_server(proc)


def model_specs(specs: list[str], prog: str) -> list[tuple[str, str]] | None:
    """``NAME=FOLDER`` arguments as (name, folder) pairs; None (after one error line) if one is bad."""
    pairs = []
    for spec in specs:
        name, _, folder = spec.partition("=")
        if not folder or not Path(folder).is_dir():
            print(f"{prog}: error: --models expects NAME=FOLDER, got {spec!r}", file=sys.stderr)
            return None
        pairs.append((name, folder))
    return pairs


def model_envs(specs: list[str], names: list[str], prog: str) -> dict[str, dict[str, str]] | None:
    """``NAME:KEY=VALUE`` arguments as {name: {key: value}}; None (after one error line) if one is
    malformed or names a model that is not in --models."""
    envs: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, _, assignment = spec.partition(":")
        key, eq, value = assignment.partition("=")
        if name not in names or not key or not eq:
            print(f"{prog}: error: --model-env expects NAME:KEY=VALUE with NAME one of --models, got {spec!r}",
                  file=sys.stderr)
            return None
        envs.setdefault(name, {})[key] = value
    return envs


async def one_request(client: httpx.AsyncClient, base: str, max_tokens: int) -> dict:
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    return {"start": t0, "stamps": stamps}


async def run_level(base: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)

    async def guarded(client):
        async with sem:
            return await one_request(client, base, max_tokens)

    async with httpx.AsyncClient(timeout=600) as client:
        await one_request(client, base, 4)  # warm-up
        t0 = time.perf_counter()
        res = await asyncio.gather(*(guarded(client) for _ in range(requests)))
        wall = time.perf_counter() - t0
    ttft = [(r["stamps"][0] - r["start"]) * 1e3 for r in res if r["stamps"]]
    itl = [(b - a) * 1e3 for r in res for a, b in zip(r["stamps"], r["stamps"][1:])]
    decode = [(len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in res if len(r["stamps"]) > 1]
    tokens = sum(len(r["stamps"]) for r in res)
    return {
        "concurrency": concurrency, "requests": requests, "output_tokens": tokens, "wall_s": wall,
        "output_tok_s": tokens / wall, "decode_tok_s": statistics.median(decode) if decode else float("nan"),
        **{f"ttft_ms_p{p}": _pct(ttft, p) for p in (50, 90, 99)},
        **{f"itl_ms_p{p}": _pct(itl, p) for p in (50, 90, 99)},
    }


def _cpu_kernel() -> str | None:
    """The gsq CPU kernel the servers use here (run-time ISA dispatch), None if not built."""
    try:
        from gsq_vllm.cpu_gemm import cpu_isa
    except ImportError:
        return None
    return cpu_isa()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=FOLDER pairs")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--server-args", default="--max-model-len 512 --dtype bfloat16",
                    help="extra api_server options (one string)")
    ap.add_argument("--model-env", nargs="*", default=[], metavar="NAME:KEY=VALUE",
                    help="an environment variable for one model's server only (e.g. gsq2-int8:GSQ_CPU_ISA=avx2int8)")
    ap.add_argument("--startup-timeout", type=float, default=600)
    add_common_args(ap, "serving_bench.json", flag="--out")
    args = ap.parse_args()

    models = model_specs(args.models, "serving.py")
    if models is None:
        return 2
    envs = model_envs(args.model_env, [name for name, _ in models], "serving.py")
    if envs is None:
        return 2
    results = []
    for name, folder in models:
        log = Path(args.out).with_suffix(f".{name}.log")
        env = envs.get(name, {})
        with running_server(folder, args.server_args.split(), log, args.startup_timeout, env) as (base, startup):
            for c in args.concurrency:
                row = asyncio.run(run_level(base, c, max(args.requests, c), args.max_tokens))
                row.update(model=name, folder=folder, startup_s=startup, env=env)
                results.append(row)
                print(f"{name} c={c}: {row['output_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)

    hdr = f"{'model':<10} {'conc':>4} {'out tok/s':>9} {'decode tok/s':>12} {'TTFT p50/p90/p99 ms':>22} {'ITL p50/p90/p99 ms':>20}"
    print(hdr)
    for r in results:
        print(f"{r['model']:<10} {r['concurrency']:>4} {r['output_tok_s']:>9.1f} {r['decode_tok_s']:>12.1f} "
              f"{r['ttft_ms_p50']:>7.0f}/{r['ttft_ms_p90']:.0f}/{r['ttft_ms_p99']:.0f} "
              f"{r['itl_ms_p50']:>8.1f}/{r['itl_ms_p90']:.1f}/{r['itl_ms_p99']:.1f}")
    meta = {"machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "cpu_kernel": _cpu_kernel(), "max_tokens": args.max_tokens,
            "server_args": args.server_args,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "GSQ_", "ONEDNN_", "ATEN_CPU", "DNNL_"))}}
    write_json({"meta": meta, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where one decode step's time goes: vLLM (in process) under torch.profiler, per model and mode.

For each model folder, eager (``--enforce-eager``) and compiled (vLLM's default torch.compile),
and each concurrency, this starts ``vllm.LLM`` in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
so the engine core and its model run here and the profiler sees them), adds ``concurrency``
requests, runs their prefill step unprofiled, then profiles ``--steps`` decode steps
(``LLMEngine.step()``; every request generates one token per step, ``ignore_eos``). Every
profiler event's *self* time is charged to the nearest enclosing event that a category rule
names (our GEMM, dense GEMM = lm_head and bf16 linears, attention, norms, activation, rotary,
sampling, compiled region, other ops); the wall time no op covers is "Python / scheduler".

The profiler adds overhead per op, so the profiled step is slower than an unprofiled one; the
table gives both (``step_ms`` is timed without the profiler, right after).

    python -m benchmarks.decode_profile --models bf16=DIR gsq2=DIR \
        [--concurrency 1 8] [--modes eager compiled] [--json benchmarks/results/decode_profile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.results_io import add_common_args, machine_info, write_json

ROOT = Path(__file__).resolve().parents[1]

# (category, substrings of a profiler event name); first match wins, checked from the event
# outwards, except that everything inside one of our ops (gsq::...) is charged to that op, so a
# dense mm in our op's blocked path is still "gsq GEMM". Our dense ops (gsq::cpu_dense, and
# gsq::cpu_dense_int8 under GSQ_CPU_DENSE=int8) serve lm_head and the kept bf16 linears.
CATEGORIES = [
    ("dense GEMM (lm_head, bf16 linears)", ("gsq::cpu_dense", "aten::linear", "aten::mm", "aten::addmm",
                                            "aten::matmul", "mkldnn", "onednn", "_C::onednn", "brgemm")),
    ("gsq GEMM", ("gsq::",)),
    ("attention", ("attention", "attn", "paged", "reshape_and_cache", "flash", "sdpa")),
    ("norms", ("rms_norm", "layer_norm")),
    ("activation", ("silu", "act_and_mul", "gelu")),
    ("rotary", ("rotary",)),
    ("sampling / logits", ("sample", "sampler", "argmax", "topk", "top_k", "softmax", "logits", "gather_logprobs")),
    ("embedding", ("embedding",)),
    # torch.compile: the inductor graph's own time (its fused pointwise kernels: norms, residual
    # adds, activation, casts) and the guard / bytecode glue around it.
    ("compiled graph (inductor kernels)", ("CompiledFxGraph", "CompiledFunction", "inductor", "cpp_fused")),
    ("torch.compile glue", ("Torch-Compiled Region", "Pregraph bytecode", "Postgraph bytecode", "Guard")),
]
PY = "Python / scheduler (no op)"


def _category(name: str) -> str | None:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k.lower() in low for k in keys):
            return cat
    return None


def breakdown(events, wall_us: float) -> dict[str, float]:
    """Self time (us) of every main-thread event charged to its nearest categorised ancestor."""
    out: dict[str, float] = {}
    covered = 0.0
    main_thread = None
    # The thread that ran the most top-level time is the engine's (worker threads record nothing
    # at top level).
    tops: dict[int, float] = {}
    for e in events:
        if e.cpu_parent is None:
            tops[e.thread] = tops.get(e.thread, 0.0) + e.cpu_time_total
    if tops:
        main_thread = max(tops, key=tops.get)
    for e in events:
        if e.thread != main_thread:
            continue
        cat, node, ours = None, e, None
        while node is not None:  # the outermost of our ops around this event, if any
            if node.name.startswith("gsq::"):
                ours = node
            node = node.cpu_parent
        node = ours or e
        while node is not None and cat is None:
            cat = _category(node.name)
            node = node.cpu_parent
        cat = cat or "other ops"
        out[cat] = out.get(cat, 0.0) + e.self_cpu_time_total
        covered += e.self_cpu_time_total
    out[PY] = max(0.0, wall_us - covered)
    return out


def _top_ops(events, k: int = 12) -> list[tuple[str, float]]:
    tot: dict[str, float] = {}
    for e in events:
        tot[e.name] = tot.get(e.name, 0.0) + e.self_cpu_time_total
    return sorted(tot.items(), key=lambda kv: -kv[1])[:k]


def profile_model(path: str, eager: bool, concurrencies: list[int], steps: int, prompt_len: int,
                  inductor_config: dict | None = None) -> list[dict]:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"compilation_config": {"inductor_compile_config": inductor_config}} if inductor_config else {}
    llm = LLM(model=path, dtype="bfloat16", max_model_len=1024, enforce_eager=eager, seed=0,
              max_num_seqs=max(concurrencies), **extra)
    engine = llm.llm_engine
    threads = torch.get_num_threads()
    rows = []
    for conc in concurrencies:
        params = SamplingParams(max_tokens=steps * 2 + 8, temperature=0.0, ignore_eos=True)

        def start(tag: str):
            for i in range(conc):
                ids = [(17 * i + 31 * j) % 10000 + 100 for j in range(prompt_len)]
                engine.add_request(f"{tag}-{i}", TokensPrompt(prompt_token_ids=ids), params)
            for _ in range(3):  # prefill (one step for short prompts) + two warm decode steps
                engine.step()

        def finish():
            while engine.has_unfinished_requests():
                engine.step()

        start(f"warm{conc}")  # the first shapes compile here under torch.compile
        for _ in range(steps):
            engine.step()
        finish()
        start(f"time{conc}")
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step_ms = 1e3 * (time.perf_counter() - t0) / steps
        finish()
        start(f"prof{conc}")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall_us = 1e6 * (time.perf_counter() - t0)
        finish()
        events = prof.events()
        cats = breakdown(events, wall_us)
        rows.append({"model": path, "mode": "eager" if eager else "compiled", "concurrency": conc,
                     "inductor_config": inductor_config or {},
                     "steps": steps, "threads": threads, "step_ms": step_ms,
                     "profiled_step_ms": wall_us / 1e3 / steps,
                     "ms_per_step": {c: v / 1e3 / steps for c, v in cats.items()},
                     # compiled graph pieces run per step: more for gsq than for bf16 would mean our op
                     # breaks vLLM's graph (vLLM itself splits it at every attention layer)
                     "graph_calls_per_step": sum("CompiledFxGraph" in e.name for e in events) / steps,
                     "top_ops_ms_per_step": [(n, v / 1e3 / steps) for n, v in _top_ops(events)]})
    del llm
    return rows


def _print(rows: list[dict]) -> None:
    cats = [c for c, _ in CATEGORIES] + ["other ops", PY]
    short = {c: c.split(" (")[0][:11] for c in cats}
    print(f"{'model':<8}{'mode':<10}{'conc':>5}{'step ms':>9}{'prof ms':>9}" + "".join(f"{short[c]:>12}" for c in cats))
    for r in rows:
        print(f"{r['name']:<8}{r['mode']:<10}{r['concurrency']:>5}{r['step_ms']:>9.2f}{r['profiled_step_ms']:>9.2f}"
              + "".join(f"{r['ms_per_step'].get(c, 0.0):>12.2f}" for c in cats))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", help="NAME=DIR (required)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=32)
    add_common_args(p, "benchmarks/results/decode_profile.json")
    p.add_argument("--inductor-config", type=json.loads, default=None,
                   help='compiled mode: extra inductor options as JSON, e.g. \'{"cpp_wrapper": true}\' (a C++ '
                        'wrapper instead of the Python one that calls each fused kernel)')
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: NAME=DIR:mode, run in a child
    args = p.parse_args(argv)

    if args.one:  # one engine per process: vLLM's in-process engine does not shut down cleanly
        name, rest = args.one.split("=", 1)
        path, mode = rest.rsplit(":", 1)
        rows = profile_model(path, mode == "eager", args.concurrency, args.steps, args.prompt_len,
                             args.inductor_config)
        for r in rows:
            r["name"] = name
        print("ROWS " + json.dumps(rows), flush=True)
        return

    if not args.models:
        p.error("--models NAME=DIR [NAME=DIR ...] is required")
    import subprocess

    from benchmarks.serving import model_specs  # NAME=FOLDER, checked

    models = model_specs(args.models, "decode_profile")
    if models is None:
        raise SystemExit(2)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    rows = []
    for name, path in models:
        for mode in args.modes:
            cmd = [sys.executable, "-m", "benchmarks.decode_profile", "--one", f"{name}={path}:{mode}",
                   "--steps", str(args.steps), "--prompt-len", str(args.prompt_len),
                   "--concurrency", *map(str, args.concurrency)]
            if args.inductor_config:
                cmd += ["--inductor-config", json.dumps(args.inductor_config)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            got = [ln for ln in res.stdout.splitlines() if ln.startswith("ROWS ")]
            if res.returncode != 0 or not got:
                sys.stderr.write(res.stderr[-4000:])
                raise SystemExit(f"decode_profile: {name} ({mode}) failed with exit {res.returncode}")
            rows += json.loads(got[-1][5:])
            _print(rows[-len(args.concurrency):])
    print()
    _print(rows)
    write_json({"machine": machine_info(), "rows": rows}, args.json)


if __name__ == "__main__":
    main()

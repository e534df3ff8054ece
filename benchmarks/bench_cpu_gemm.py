"""Benchmark the CPU path of the GSQ linear (torch.ops.gsq.cpu_gemm) against dense bf16 torch.matmul.

Per layer shape and M (rows of x, bf16), median time of:

* ``bf16``: ``x @ W.t()`` with a dense bf16 weight (oneDNN, what vLLM-cpu's unquantized path does;
  on CPUs without a bf16 dot product, torch's bf16 loop, vLLM's fallback there);
* ``f32``: the same in float32 (x and W float32), the fast dense GEMM of such CPUs;
* ``dense``: ``torch.ops.gsq.cpu_dense`` on the bf16 weight (what the plugin runs for the layers a
  checkpoint keeps in bf16, on CPUs without a bf16 dot product);
* ``dense8``: ``torch.ops.gsq.cpu_dense_int8`` on an int8 copy of that weight (GSQ_CPU_DENSE=int8);
* ``op``: ``torch.ops.gsq.cpu_gemm`` as vLLM calls it (fused kernel up to ``max_fused_rows``,
  else the K-blocked dequantize + oneDNN path), 2-bit and 3-bit, G=64 (``--group-size``);
* each fused kernel this CPU can run (``generic``, ``avx2``, ``avx512``, ``avx512bf16``: the
  run-time ISA dispatch, switched with ``set_isa``) and the ``blocked`` path, at 2 bits.

Shapes: SmolLM2-135M's linears as vLLM fuses them, its lm_head (49152 x 576, which the plugin
serves dense: compare ``bf16``, ``dense`` and ``dense8`` there), and one layer larger than the last-level
cache (Llama-3.1-70B's gate/up half, 28672 x 8192), for which the table also gives the GB/s the
M = 1 kernel streams its packed weight + scales at, against the machine's memory bandwidth
(measured here as the best of a few large ``torch.Tensor.copy_`` calls: bytes read + written).

    python -m benchmarks.bench_cpu_gemm [--threads 2] [--json benchmarks/results/bench_cpu_gemm.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.results_io import add_common_args, machine_info, write_json
from gsq_format.format import grid_range, pack_codes
from gsq_vllm import cpu_gemm as cg

# (layer, N, K): SmolLM2-135M (hidden 576, intermediate 1536, 9 + 3 + 3 heads of 64), then a layer
# larger than a 32 MiB L3 at 2 bits.
SMOL = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)]
BIG = [("70b_up", 28672, 8192)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def median_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth_gbs(mib: int = 1024) -> float:
    """Best of 5 copies of a ``mib`` MiB buffer: (read + write bytes) / time, in GB/s."""
    a = torch.empty(mib * 2**20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    best = min(median_seconds(lambda: b.copy_(a), 1) for _ in range(5))
    return 2 * a.numel() / best / 1e9


def _quantized(n: int, k: int, bits: int, g: int):
    lo_q, hi_q = grid_range(bits)
    codes = torch.randint(lo_q, hi_q + 1, (n, k), dtype=torch.int8)
    scales = (torch.rand(n, k // g) * 0.01 + 0.001).to(torch.bfloat16)
    lo, hi = cg.repack_for_cpu(pack_codes(codes, bits), bits, g)
    return lo, hi, scales, lo.numel() + hi.numel() + 2 * scales.numel()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--ms", type=int, nargs="+", default=MS)
    p.add_argument("--no-big", action="store_true", help="skip the larger-than-cache layer")
    p.add_argument("--layers", nargs="+", metavar="NAME", help="only these layers (default: all), e.g. lm_head")
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    add_common_args(p, "benchmarks/results/bench_cpu_gemm.json", threads=os.cpu_count())
    args = p.parse_args(argv)
    G = args.group_size
    if not cg.cpp_kernel_available():
        raise SystemExit("bench_cpu_gemm: gsq_vllm._C_cpu is not built: pip install --no-build-isolation -e . first")
    torch.set_num_threads(args.threads)
    torch.randn(64, 64, dtype=torch.bfloat16) @ torch.randn(64, 64, dtype=torch.bfloat16)  # oneDNN init
    isas = cg._cpp.supported_isas()
    default_isa = cg.cpu_isa()
    bw = memory_bandwidth_gbs()
    print(f"threads {args.threads}; kernels here: {', '.join(isas)} (in use: {default_isa}, fused up to "
          f"M = {cg.cpp_max_rows()}); memory bandwidth (copy) {bw:.1f} GB/s")
    head = f"{'layer':<8}{'N':>6}{'K':>6}{'M':>5}{'bf16 us':>10}{'f32 us':>9}{'dense':>9}{'dense8':>9}{'op w2':>9}{'op w3':>9}" + "".join(
        f"{i:>11}" for i in isas) + f"{'blocked':>10}{'w2 vs bf16':>11}"
    print(head)
    rows = []
    shapes = SMOL + ([] if args.no_big else BIG)
    if args.layers:
        unknown = set(args.layers) - {name for name, _, _ in SMOL + BIG}
        if unknown:
            raise SystemExit(f"bench_cpu_gemm: unknown layer(s) {sorted(unknown)}: choose from {[s[0] for s in SMOL + BIG]}")
        shapes = [sh for sh in SMOL + BIG if sh[0] in args.layers]
    for layer, n, k in shapes:
        w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
        wf = w.float()
        wq, ws = cg.quantize_dense_int8(w)
        planes = {bits: _quantized(n, k, bits, G) for bits in (2, 3)}
        big = (layer, n, k) in BIG
        reps = max(5, args.reps // 6) if big else args.reps
        for m in args.ms if not big else [m for m in args.ms if m <= 16]:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            row = {"layer": layer, "N": n, "K": k, "M": m, "threads": args.threads, "group_size": G,
                   "bf16_us": 1e6 * median_seconds(lambda: x @ w.t(), reps), "bf16_weight_bytes": 2 * n * k}
            xf = x.float()
            row["f32_us"] = 1e6 * median_seconds(lambda: xf @ wf.t(), reps)
            row["dense_us"] = 1e6 * median_seconds(lambda: cg.cpu_dense(x, w), reps)
            row["dense8_us"] = 1e6 * median_seconds(lambda: cg.cpu_dense_int8(x, wq, ws), reps)
            for bits, (lo, hi, s, nbytes) in planes.items():
                row[f"op_w{bits}_us"] = 1e6 * median_seconds(lambda: torch.ops.gsq.cpu_gemm(x, lo, hi, s, bits, G), reps)
                row[f"w{bits}_weight_bytes"] = nbytes
            lo, hi, s, _ = planes[2]
            for isa in isas:
                cg._cpp.set_isa(isa)
                row[f"fused_{isa}_w2_us"] = 1e6 * median_seconds(lambda: cg._cpp.gemm(x, lo, hi, s, 2, G), reps)
            cg._cpp.set_isa(default_isa)
            row["blocked_w2_us"] = 1e6 * median_seconds(lambda: cg._blocked_gemm(x, lo, hi, s, 2, G), reps)
            if m == 1:
                row["op_w2_gbs"] = row["w2_weight_bytes"] / row["op_w2_us"] / 1e3
                row["bf16_gbs"] = row["bf16_weight_bytes"] / row["bf16_us"] / 1e3
            rows.append(row)
            print(f"{layer:<8}{n:>6}{k:>6}{m:>5}{row['bf16_us']:>10.1f}{row['f32_us']:>9.1f}{row['dense_us']:>9.1f}{row['dense8_us']:>9.1f}{row['op_w2_us']:>9.1f}{row['op_w3_us']:>9.1f}"
                  + "".join(f"{row[f'fused_{i}_w2_us']:>11.1f}" for i in isas)
                  + f"{row['blocked_w2_us']:>10.1f}{row['bf16_us'] / row['op_w2_us']:>10.2f}x")
    for r in rows:
        if r["M"] == 1 and (r["layer"], r["N"], r["K"]) in BIG:
            print(f"{r['layer']} M=1: gsq 2-bit streams {r['op_w2_gbs']:.1f} GB/s = {r['op_w2_gbs'] / bw:.0%} of "
                  f"the copy bandwidth ({bw:.1f} GB/s); bf16 matmul {r['bf16_gbs']:.1f} GB/s")
    machine = machine_info(isas=isas, isa_in_use=default_isa, memory_bandwidth_gbs=bw, torch=torch.__version__)
    write_json({"machine": machine, "max_fused_rows": cg.cpp_max_rows(), "rows": rows}, args.json)


if __name__ == "__main__":
    main()

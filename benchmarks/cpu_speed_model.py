"""Where a CPU decode GEMM's time goes (M = 1): memory bandwidth, compute, instructions per weight.

Per layer (Llama-3.1-8B's and -70B's linears as vLLM fuses them, ``--layers``), bits 2 and 3, one
thread, for the kernel the op runs with the tables off (``old``) and the table-lookup variant ``auto``
picks (``tl``), plus the AVX2 pair (what an AVX2-only machine runs):

* ``bytes/weight``: packed codes + bf16 scales, exactly what one call must read;
* ``memory us``: those bytes at the machine's measured read bandwidth (a STREAM-like sum of 512 MiB
  on the same thread) — the floor if the kernel did nothing but stream;
* ``compute us``: the time if memory were free: the call timed (repeated) on two slices of the layer's
  rows that stay in the L2 cache (``--warm-bytes`` of weight and twice that), fitted as a per-call
  part (table build, dispatch) plus a per-row part, and evaluated at the layer's N rows;
* ``cold us``: the real call, weight streamed from memory (calls cycle through copies >= 128 MiB);
* ``% read``: bytes / cold time against the read bandwidth; ``bound``: which of the two floors is
  the larger one (so where the rest of the time would have to come from);
* ``instr/weight`` (``--count``): instructions retired inside the kernel per weight, counted by
  valgrind's callgrind (exact dynamic counts, not a model) on a 64 x 4096 slice: the kernel's
  instructions per weight there, plus the table build's (per element of x) spread over the layer's
  N rows; ~90 s per kernel and bits under valgrind. Valgrind implements
  no AVX-512, so only the AVX2 kernels are counted; the AVX-512 rows show ``-``. This VM exposes no hardware counters (``perf stat`` reports cycles as not supported).

    python -m benchmarks.cpu_speed_model --count --json benchmarks/results/cpu_speed_model_avx512_epyc.json

The two floors are measurements on this machine; their max is the best a call could do with loads and
compute fully overlapped, their sum the worst with none; the table prints both next to the real time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_cpu_gemm import (TL_SHAPES, _quantized, median_seconds, memory_bandwidth_gbs, read_bandwidth_gbs,
                                      streamed_copies)
from benchmarks.results_io import add_common_args, machine_info, read_json, write_json
from gsq_vllm import cpu_gemm as cg

ROOT = Path(__file__).resolve().parents[1]
# The kernel entry each (isa, tl) runs, as callgrind names it (demangled).
ENTRY = {("avx2", "off"): "gsq_isa_avx2::gemm_rows_entry", ("avx2", "avx2"): "gsq_tlk_avx2::tl_rows_entry"}
TABLES = "gsq_tlk_avx2::tl_build_entry"  # the table-lookup kernels' per-call table build
COUNT_K = 4096  # the counted slice is 64 x COUNT_K

_DRIVER = """
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks.bench_cpu_gemm import _quantized
from gsq_vllm import cpu_gemm as cg
torch.set_num_threads(1)
torch.manual_seed(0)
lo, hi, s, _ = _quantized({n}, {k}, {bits}, {g})
x = torch.randn(1, {k}, dtype=torch.bfloat16)
cg._cpp.set_isa({isa!r}); cg._cpp.set_tl({tl!r})
cg._cpp.gemm(x, lo, hi, s, {bits}, {g})
"""


def count_instructions(isa: str, tl: str, n: int, k: int, bits: int, g: int) -> dict[str, int]:
    """Instructions retired in the kernel entry (and, for table lookups, the table build) of one
    M = 1 call on an n x k weight, by callgrind; inclusive of what they call."""
    entries = [ENTRY[(isa, tl)]] + ([TABLES] if tl != "off" else [])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
               *(f"--toggle-collect={e}*" for e in entries), sys.executable, "-c",
               _DRIVER.format(root=str(ROOT), n=n, k=k, bits=bits, g=g, isa=isa, tl=tl)]
        env = dict(os.environ, OMP_NUM_THREADS="1", GSQ_CPU_TL=tl)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        text = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(out)], check=True,
                              capture_output=True, text=True).stdout
    counts = {}
    for e in entries:
        # "123,456 (12.3%)  file:gsq_isa_avx2::gemm_rows_entry(GemmArgs const&, long, long) [lib]"
        m = re.search(r"^\s*([\d,]+)\s.*?" + re.escape(e) + r"\(", text, re.M)
        if m is None:
            raise RuntimeError(f"cpu_speed_model: callgrind saw no call of {e}")
        counts[e] = int(m.group(1).replace(",", ""))
    return counts


def layer_data(n: int, k: int, bits: int, g: int, warm_bytes: int) -> dict:
    """Random codes for one layer: its streamed copies (bench_cpu_gemm.streamed_copies) and two slices
    of its rows that fit the L2."""
    lo, hi, s, nbytes = _quantized(n, k, bits, g)
    sets = streamed_copies(lo, hi, s, nbytes)
    rows = max(16, min(n // 2, int(warm_bytes / (nbytes / n)) // 16 * 16))
    warm = [_quantized(r, k, bits, g)[:3] for r in (rows, 2 * rows)]
    return {"sets": sets, "bytes": nbytes, "warm": warm, "warm_rows": rows}


def time_layer(data: dict, n: int, k: int, bits: int, g: int, isa: str, tl: str, reps: int) -> dict:
    """Cold (weight from memory) and compute (in-cache slices, fitted) time of one M = 1 call."""
    cpp = cg._cpp
    cpp.set_isa(isa)
    cpp.set_tl(tl)
    x = torch.randn(1, k, dtype=torch.bfloat16)
    turn = itertools.cycle(data["sets"])
    cold = median_seconds(lambda: cpp.gemm(x, *next(turn), bits, g), reps)
    # t(rows) = per_call + rows * per_row on two in-cache slices (rows, 2 rows): per_call is what does
    # not grow with N (the table build, dispatch), which a slice of few rows would otherwise inflate.
    t1, t2 = (median_seconds(lambda: cpp.gemm(x, *w, bits, g), max(reps, 50)) for w in data["warm"])
    r = data["warm_rows"]
    per_row = max(t2 - t1, 0.0) / r
    per_call = max(t1 - per_row * r, 0.0)
    return {"cold_us": 1e6 * cold, "warm_rows": [r, 2 * r], "warm_us": [1e6 * t1, 1e6 * t2],
            "per_call_us": 1e6 * per_call, "compute_us": 1e6 * (per_call + per_row * n), "bytes": data["bytes"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", nargs="+", default=["llama-8b", "llama-70b"], help="models or layer names of TL_SHAPES")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    p.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warm-bytes", type=int, default=256 << 10, help="weight bytes of the smaller in-cache slice")
    p.add_argument("--count", action="store_true", help="count instructions with valgrind (the AVX2 kernels)")
    p.add_argument("--counts-from", metavar="JSON", help="reuse the instruction counts of an earlier --count run")
    p.add_argument("--note", default="")
    add_common_args(p, "benchmarks/results/cpu_speed_model.json")
    args = p.parse_args(argv)
    if not cg.cpp_kernel_available():
        raise SystemExit("cpu_speed_model: gsq_vllm._C_cpu is not built: pip install --no-build-isolation -e . first")
    if args.count and shutil.which("valgrind") is None:
        raise SystemExit("cpu_speed_model: --count needs valgrind (apt install valgrind)")
    torch.set_num_threads(1)
    cpp, g = cg._cpp, args.group_size
    isa = cg.cpu_isa()
    before = cpp.set_tl("auto")
    tl_auto = cpp.tl_in_use(1)
    cpp.set_tl(before)
    kernels = [(isa, "off"), (isa, tl_auto)] + ([("avx2", "off"), ("avx2", "avx2")] if isa != "avx2" else [])
    kernels = [kk for kk in kernels if kk[1] is not None]
    read_bw, copy_bw = read_bandwidth_gbs(512), memory_bandwidth_gbs(512)
    print(f"one thread; read bandwidth {read_bw:.1f} GB/s, copy {copy_bw:.1f} GB/s (read + write); kernel {isa}, "
          f"tables {tl_auto}; G = {g}; M = 1")
    print(f"{'model':<10}{'layer':<8}{'b':>2} {'kernel':<28}{'B/w':>6}{'memory us':>10}{'compute us':>11}"
          f"{'cold us':>9}{'% read':>7}{'bound':>8}{'instr/w':>8}")
    rows = []
    counted: dict[tuple, dict] = {}
    if args.counts_from:  # counted on the same 64 x 4096 slice; the kernels' code must be unchanged since
        for r in read_json(args.counts_from).get("rows", []):
            if "instructions_64x4096" in r:
                counted[(r["isa"], r["tl"], r["bits"])] = r["instructions_64x4096"]
    for model, layer, n, k in TL_SHAPES:
        if model not in args.layers and layer not in args.layers:
            continue
        for bits in args.bits:
            data = layer_data(n, k, bits, g, args.warm_bytes)
            for kisa, tl in kernels:
                t = time_layer(data, n, k, bits, g, kisa, tl, args.reps)
                mem_us = t["bytes"] / read_bw / 1e3
                row = {"model": model, "layer": layer, "N": n, "K": k, "bits": bits, "group_size": g, "isa": kisa,
                       "tl": tl, **t, "bytes_per_weight": t["bytes"] / (n * k), "memory_us": mem_us,
                       "read_fraction": t["bytes"] / t["cold_us"] / 1e3 / read_bw,
                       "bound": "memory" if mem_us >= t["compute_us"] else "compute"}
                if (args.count or (kisa, tl, bits) in counted) and (kisa, tl) in ENTRY:
                    # Counted once per kernel and bits on a 64 x 4096 slice: the lookups per weight do not
                    # depend on the shape; the table build is per element of x, shared by the layer's N rows.
                    key = (kisa, tl, bits)
                    if key not in counted:
                        counted[key] = count_instructions(kisa, tl, 64, COUNT_K, bits, g)
                    c = counted[key]
                    row["instructions_64x4096"] = c
                    row["instr_per_weight"] = c[ENTRY[(kisa, tl)]] / (64 * COUNT_K) + c.get(TABLES, 0) / (COUNT_K * n)
                rows.append(row)
                name = f"{kisa}{'' if tl == 'off' else ' + tl ' + tl}"
                ipw = f"{row['instr_per_weight']:>8.3f}" if "instr_per_weight" in row else f"{'-':>8}"
                print(f"{model:<10}{layer:<8}{bits:>2} {name:<28}{row['bytes_per_weight']:>6.3f}{mem_us:>10.0f}"
                      f"{t['compute_us']:>11.0f}{t['cold_us']:>9.0f}{row['read_fraction']:>7.0%}{row['bound']:>8}{ipw}",
                      flush=True)
    cpp.set_isa(isa)
    cpp.set_tl(before)
    machine = machine_info(isa_in_use=isa, tl_auto=tl_auto, read_bandwidth_gbs=read_bw, copy_bandwidth_gbs=copy_bw,
                           torch=torch.__version__)
    write_json({"machine": machine, "note": args.note, "threads": 1, "M": 1, "rows": rows}, args.json)


if __name__ == "__main__":
    main()

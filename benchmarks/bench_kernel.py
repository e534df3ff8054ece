"""Benchmark torch.ops.gsq.gemm against cuBLAS fp16/bf16 (torch.matmul).

For each M in {1,2,4,8,16,32,64,128,256}, Llama-3.1-8B/70B linear shapes,
W2/W3 and fp16/bf16: median time over CUDA events with rotating weight
buffers (more copies than fit in L2, so every call streams its weights from
HBM), achieved bandwidth (weights + scales + A + C bytes / time), that as a
percentage of a measured device-to-device copy, and the speedup over
torch.matmul with dense weights of the same dtype (also rotated).
Prints a table and writes JSON.

    python -m benchmarks.bench_kernel [--out bench_kernel.json] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks.results_io import add_common_args, write_json
from gsq_vllm import cuda_gemm as cg
from gsq_format.format import grid_range, pack_codes

MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# (model, layer, N, K) -- fused qkv and gate_up as vLLM runs them
SHAPES = [
    ("llama3.1-8b", "qkv", 6144, 4096),
    ("llama3.1-8b", "o", 4096, 4096),
    ("llama3.1-8b", "gate_up", 28672, 4096),
    ("llama3.1-8b", "down", 4096, 14336),
    ("llama3.1-70b", "qkv", 10240, 8192),
    ("llama3.1-70b", "o", 8192, 8192),
    ("llama3.1-70b", "gate_up", 57344, 8192),
    ("llama3.1-70b", "down", 8192, 28672),
]
ROTATE_BYTES = 512 * 1024**2  # >> L2 (50 MiB on H100): weights never served from cache


def time_rotating(fn, n_bufs: int, iters: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of fn(i) over iters calls, i cycling through n_bufs buffers."""
    for i in range(warmup):
        fn(i % n_bufs)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % n_bufs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time)."""
    src = torch.empty(ROTATE_BYTES // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_rotating(lambda i: dst.copy_(src), 1, iters=20)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def random_layer(n, k, bits, g, dtype):
    lo, hi = grid_range(bits)
    q = torch.randint(lo, hi + 1, (n, k), dtype=torch.int8, device="cuda")
    s = (torch.rand(n, k // g, device="cuda") * 0.02 + 0.005).to(dtype)
    return cg.repack(pack_codes(q, bits), s, bits, g)


def bench_one(n, k, bits, g, dtype, ms_list):
    b0, s0 = random_layer(n, k, bits, g, dtype)
    w_bytes = b0.numel() * 4 + s0.numel() * 2
    n_q = max(2, min(16, ROTATE_BYTES // w_bytes))
    bufs = [(b0, s0)] + [(b0.clone(), s0.clone()) for _ in range(n_q - 1)]
    dense_bytes = n * k * 2
    n_d = max(2, min(8, ROTATE_BYTES // dense_bytes))
    dense = [torch.randn(n, k, device="cuda", dtype=dtype) * 0.02 for _ in range(n_d)]
    rows = []
    for m in ms_list:
        a = torch.randn(m, k, device="cuda", dtype=dtype)
        t_q = time_rotating(lambda i: cg.gsq_gemm(a, bufs[i][0], bufs[i][1], bits, g, n, k), n_q)
        t_d = time_rotating(lambda i: a @ dense[i].t(), n_d)
        moved = w_bytes + m * k * 2 + m * n * 2
        rows.append(dict(m=m, n=n, k=k, bits=bits, group_size=g, dtype=str(dtype).split(".")[-1],
                         ms=t_q, dense_ms=t_d, gbs=moved / (t_q * 1e-3) / 1e9, speedup=t_d / t_q))
    del bufs, dense
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "bench_kernel.json", flag="--out")
    ap.add_argument("--quick", action="store_true", help="8B shapes, fp16 only, M in {1, 16, 128}")
    ap.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    args = ap.parse_args(argv)
    if not cg.cuda_kernel_available():
        print("bench_kernel: needs a CUDA GPU and the compiled gsq_vllm._C extension "
              "(pip install --no-build-isolation -e . on a CUDA machine)", file=sys.stderr)
        return 2
    shapes = [s for s in SHAPES if s[0] == "llama3.1-8b"] if args.quick else SHAPES
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16]
    ms_list = [1, 16, 128] if args.quick else MS
    copy_gbs = copy_bandwidth_gbs()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: measured D2D copy {copy_gbs:.0f} GB/s")
    print(f"{'model':13} {'layer':8} {'N':>6} {'K':>6} {'W':>2} {'dtype':8} {'M':>4} "
          f"{'us':>9} {'GB/s':>7} {'%copy':>6} {'x cuBLAS':>8}")
    results = []
    for model, layer, n, k in shapes:
        for bits in (2, 3):
            for dtype in dtypes:
                for r in bench_one(n, k, bits, args.group_size, dtype, ms_list):
                    r.update(model=model, layer=layer, pct_copy=100 * r["gbs"] / copy_gbs)
                    results.append(r)
                    print(f"{model:13} {layer:8} {n:6} {k:6} {bits:2} {r['dtype']:8} {r['m']:4} "
                          f"{r['ms'] * 1e3:9.1f} {r['gbs']:7.0f} {r['pct_copy']:6.1f} {r['speedup']:8.2f}")
    write_json(dict(gpu=gpu, copy_gbs=copy_gbs, torch=torch.__version__, results=results), args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

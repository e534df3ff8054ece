"""Compile vLLM's incumbent 2/3-bit kernel (Humming, PyPI ``humming-kernels``) on a machine without a GPU.

Run by ``kernel_static.py --humming`` in a separate process, with the
``humming-kernels`` package and its NVRTC on ``PYTHONPATH``:

    python -m benchmarks.humming_cubins [--lineinfo] CACHE_DIR BITS N K DTYPE M [M ...]
    -> one JSON line per M: the tuning config Humming picked and its cubin path

Humming picks its tile config from the device it runs on and JIT-compiles
with NVRTC. Here it is told it runs on one H100 SXM (132 SMs, sm_90), the
way vLLM 0.32 calls it for a GPTQ-style symmetric int2/int3, group-128
layer (``prepare_layer_config`` with N padded to 256, K to 128; compute
config: no batch invariance, fp32 accumulation, dense); its kernel
registration (which needs a CUDA context) is skipped after the cubin is
written. Nothing of Humming's source is copied: its installed package does
the work.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types

H100 = dict(
    index=0, name="NVIDIA H100 80GB HBM3", is_ppu=False, sm_count=132, max_threads_per_block=1024,
    max_threads_per_sm=2048, max_registers_per_sm=65536, sm_major=9, sm_minor=0, sm_version=90,
    l2_cache_size=50 * 2**20, l1_cache_size=256 * 1024, default_smem_size=48 * 1024, max_smem_size=227 * 1024,
    memory_clock_khz=2619000, memory_bus_width=5120, sm_clock_khz=1980000,
)


def pretend_h100():
    """Make humming see one H100 (its device-info extension and torch.cuda queries)."""
    import torch

    torch.version.cuda = "13.0"  # humming picks the toolkit whose major matches torch's CUDA

    class _NoDevice(contextlib.ContextDecorator):
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    torch.cuda.device = _NoDevice
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda *a, **k: None
    info = dict(H100)
    info["l2_cache_size_mb"] = info["l2_cache_size"] / 2**20
    info["l1_cache_size_kb"] = info["l1_cache_size"] / 1024
    info["max_smem_size_kb"] = info["max_smem_size"] / 1024
    info["memory_bandwidth_gbps"] = info["memory_clock_khz"] * 2 * info["memory_bus_width"] / 8 / 1e6
    tops = info["sm_count"] * 4096 * info["sm_clock_khz"] / 1e9
    info["tensorcore_tops"] = {"float16": tops, "bfloat16": tops, "float8e4m3": 2 * tops, "float8e5m2": 2 * tops,
                               "int8": 2 * tops, "int4": 4 * tops}

    class _DeviceInfo:
        def __init__(self, index=None):
            self.__dict__.update(info)

        def print(self):
            print(info)

    dev = types.ModuleType("humming._device_info")
    dev._DeviceInfo = _DeviceInfo
    sys.modules["humming._device_info"] = dev
    bench = types.ModuleType("humming.ops.bench")  # imports triton; only for benchmarking
    bench.tops_bench = None
    sys.modules["humming.ops.bench"] = bench
    import humming.utils.device as hud

    hud._extension = dev
    from humming.kernel.humming import HummingKernel

    HummingKernel.register_kernel = lambda self: setattr(self, "kernel_id", -1)


def with_lineinfo():
    """Add -lineinfo to Humming's NVRTC flags (source lines for kernel_static.py's whole-kernel regions; it
    changes no instruction: kernel_static.py compares the loop reading of both builds' cubins in its test)."""
    from humming.jit import compiler

    flags = compiler.Compiler.debug_kernel_flags
    compiler.Compiler.debug_kernel_flags = staticmethod(lambda: [*flags(), "-lineinfo"])


def main(argv):
    lineinfo = argv[:1] == ["--lineinfo"]
    argv = argv[lineinfo:]
    cache, bits, n, k, dt = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    ms = [int(x) for x in argv[5:]]
    os.environ["HUMMING_CACHE_DIR"] = cache
    pretend_h100()
    if lineinfo:
        with_lineinfo()
    import torch
    from humming.kernel.humming import HummingKernel
    from humming.schema.gptq import GPTQWeightSchema
    from humming.transform import prepare_layer_config

    dtype = torch.float16 if dt == "fp16" else torch.bfloat16
    schema = GPTQWeightSchema(bits=bits, group_size=128, sym=True).to_humming_schema(dtype)
    layer = prepare_layer_config(shape_n=n, shape_k=k, weight_schema=schema, input_schema=None,
                                 pad_n_to_multiple=256, pad_k_to_multiple=128, has_bias=False,
                                 torch_dtype=dtype, device=0)
    compute = {"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "dense"}
    layer_cfg, compute_cfg, intervals = HummingKernel._resolve_configs(layer.to_str(), json.dumps(compute), None, 0)
    for m in ms:
        _, _, tuning = next(iv for iv in intervals if iv[0] < m <= iv[1])
        cfg = layer_cfg | compute_cfg | dict(tuning)
        cfg.pop("num_sms", None)
        kern = HummingKernel(**cfg)  # renders its template, compiles with NVRTC, caches the cubin
        cubin = os.path.join(os.path.dirname(kern.kernel_filename), "kernel.cubin")
        print(json.dumps({"bits": bits, "n": n, "k": k, "dtype": dt, "m": m, "tuning": dict(tuning),
                          "threads": kern.num_threads, "cubin": cubin}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Static cost model of the GSQ CUDA GEMM, side by side with vLLM's incumbent (Humming).

THIS IS A MODEL, NOT A MEASUREMENT. No GPU runs anything here: the numbers
come from the compiled SASS, the launch plan and a handful of published
machine constants. They say how the kernels compare on paper; a GPU run of
benchmarks/bench_kernel.py is the only measurement.

What it does:

* compiles csrc/gsq_gemm.cu with nvcc for sm_80 and sm_90 (cubins) and
  reads each kernel instantiation's registers, spills and SASS
  (cuobjdump, from the ``nvidia-cuda-cuobjdump`` wheel of the dev extra);
* finds the hot loop and what one iteration executes, by instruction class
  (benchmarks/sass.py), and the weights one iteration covers per warp ->
  warp-instructions per weight;
* asks the kernel's own host code (run by the emulator in dry-run mode) how
  it launches each layer: grid, threads, dynamic shared memory;
* models, per layer shape and M, for H100 SXM and A100 SXM:
  - issue bound: 4 warp-instructions per clock per SM / instructions per weight;
  - tensor bound: 0.5 HMMA.16816 per clock per SM (1024 fp16 FMA/clk/SM,
    A100's dense rate; assumed for mma.sync on H100) x weights per HMMA;
  - HBM need: weights per clock per active SM that streaming the layer at
    full bandwidth takes (bits + 16/G bits per weight);
  - bytes in flight per active SM (resident blocks x (stages - 1) x HBM bytes
    per stage) against Little's law (bandwidth per SM x 800 ns);
  - modelled fraction of the HBM roofline: the smallest of the ratios above;
* with ``--humming``, the same for Humming's own sm_90 configs (symmetric
  uint2/uint3, group 128, fp16) at M = 1, 4, 8, 16, compiled by its NVRTC
  path (benchmarks/humming_cubins.py; needs pip access once);
* the WHOLE KERNEL (JSON section ``whole_kernel``): every instruction each
  warp executes under the kernel's own launch plan -- prologue, items x hot
  loop, per-segment paths, split-K epilogue, the reduction (fixed + per
  contributor), tail -- each a path through the SASS control-flow graph
  (benchmarks/sass.py Cfg; regions by loop structure and -lineinfo source
  lines), summed over warps and divided by the layer's weights; the critical
  path (busiest scheduler's issue cycles or HBM time, plus the serial
  reduction chain of L2 round trips) against the layer's bytes / HBM + one L2
  round trip; distinct bytes in flight per SM; the targets of issue 30, met
  or missed. Llama-3.1-8B / 70B decode layers, M = 1, 4, 8, 16, fp16 / bf16,
  G = 128 / 64, 2 / 3 bits, H100 SXM and A100 SXM (printed: H100); Humming's
  kernels the same way (H100, fp16, G = 128) with ``--humming``.

    python -m benchmarks.kernel_static --humming [--out benchmarks/results/kernel_static.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from benchmarks import sass
from benchmarks.results_io import RESULTS, add_common_args, write_json

ROOT = Path(__file__).resolve().parents[1]

MACHINES = {
    # sms, SM clock (GHz), HBM TB/s, shared memory per SM / per block, registers, warps, blocks per SM
    "H100 SXM": dict(arch="90", sms=132, clock_ghz=1.75, hbm_tbs=3.35, smem_sm=228 * 1024,
                     smem_block=227 * 1024, regs=65536, warps=64, blocks=32),
    "A100 SXM": dict(arch="80", sms=108, clock_ghz=1.41, hbm_tbs=2.04, smem_sm=164 * 1024,
                     smem_block=163 * 1024, regs=65536, warps=64, blocks=32),
}
ISSUE_PER_CLK = 4  # warp-instructions per clock per SM (4 schedulers)
HMMA_PER_CLK = 0.5  # m16n8k16 per clock per SM
LATENCY_NS = 800  # HBM latency for Little's law
LAYERS = [  # (model, layer, N, K): fused qkv and gate_up as vLLM runs them
    ("llama3.1-8b", "qkv", 6144, 4096), ("llama3.1-8b", "o", 4096, 4096),
    ("llama3.1-8b", "gate_up", 28672, 4096), ("llama3.1-8b", "down", 4096, 14336),
    ("llama3.1-70b", "qkv", 10240, 8192), ("llama3.1-70b", "o", 8192, 8192),
    ("llama3.1-70b", "gate_up", 57344, 8192), ("llama3.1-70b", "down", 8192, 28672),
]
MS = [1, 8, 16, 64, 256]
GROUP = 128
HUMMING_VERSION = "0.1.19"
HUMMING_SITE_PACKAGES = [f"humming-kernels=={HUMMING_VERSION}", "cuda-bindings", "cuda-pathfinder",
                         "nvidia-cuda-nvrtc==13.0.88", "tabulate"]


# ------------------------------------------------------------------ our kernel


def compile_ours(arch: str, out_dir: Path, lineinfo: bool = True) -> tuple[Path, dict[str, dict]]:
    """nvcc csrc/gsq_gemm.cu -> cubin; returns it and ptxas's per-function spill report."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as torch_flags
    except ImportError:
        torch_flags = []
    cubin = out_dir / f"gsq_gemm_sm{arch}{'_lineinfo' * lineinfo}.cubin"
    # -lineinfo: source lines for the whole-kernel regions (nvdisasm -gi); it changes no instruction
    # (tests/test_kernel_static.py compares the SASS of the two builds)
    cmd = [sass.tool("nvcc"), "-cubin", "-O3", "-std=c++20", *torch_flags, "-Xptxas", "-v",
           *(["-lineinfo"] * lineinfo), f"-arch=sm_{arch}", str(ROOT / "csrc" / "gsq_gemm.cu"), "-o", str(cubin)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{res.stderr[-4000:]}")
    spills, name = {}, None
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            spills[name] = {"spill_stores": int(m.group(1)), "spill_loads": int(m.group(2))}
    return cubin, spills


def decode_ring_constants(path: Path | None = None) -> dict[str, int]:
    """kDecodeRingBytes / kDecodeMaxStages / kDecodeWarps as csrc/gemm/decode.cuh states them (the ring-depth
    rule is the kernel's; our_decode_kernel checks every modelled launch's shared memory against it)."""
    text = Path(path or DECODE_SOURCE).read_text()
    out = {}
    for name in ("kDecodeRingBytes", "kDecodeMaxStages", "kDecodeWarps"):
        m = re.search(rf"constexpr int {name} = ([^;]+);", text)
        if not m or not re.fullmatch(r"[\d\s*]+", m.group(1)):
            raise ValueError(f"{name} not found as a constant product in {path or DECODE_SOURCE}")
        out[name] = eval(m.group(1))  # digits and '*' only (checked above)
    return out


def decode_stage_bytes(bits: int, ck: int, g: int, mt: int) -> int:
    """DecodeSmem::kStageBytes: an item's codes, its scales, the chunk's activations (rows padded by 8 halves)."""
    return 64 * ck * bits // 8 + (ck // g) * 64 * 2 + 8 * mt * (ck + 8) * 2


def decode_stages(bits: int, ck: int, g: int, mt: int) -> int:
    """DecodeSmem::kStages: as many stages as kDecodeRingBytes holds, at least 3, at most kDecodeMaxStages."""
    c = decode_ring_constants()
    return max(3, min(c["kDecodeMaxStages"], c["kDecodeRingBytes"] // decode_stage_bytes(bits, ck, g, mt)))


def our_kernel_facts(name: str) -> dict:
    """What one hot-loop trip of our kernels covers (csrc/gemm/): the weights are the 16-row A
    operand of m16n8k16 (256 weights per mma, shared by the MT n8 token tiles).

    * gsq_decode_kernel<T, BITS, CK, G, MT>: every warp streams its own items (64 rows x CK k)
      through a cp.async ring of decode_stages() stages: one item per trip, the next stages - 1 in
      flight; per k step 4
      tiles' mma plus one correction mma (so 4/5 of the tensor work is weights).
    * gsq_prefill_kernel<T, BITS, CK, G, MT>: a block of 4 warps (one 16-row tile each) does one
      CK chunk per trip for 8 MT tokens; the next chunk's codes are in flight.
    Per block and trip: weights, HBM bytes (codes + scales)."""
    m = re.search(r"gsq_(decode|prefill)_kernel<(\w+), (\d+), (\d+), (\d+), (\d+)>", name)
    if not m:
        return {}
    kind, dtype = m.group(1), m.group(2)
    bits, ck, g, mt = (int(m.group(i)) for i in range(3, 7))
    items = 4 if kind == "decode" else 1  # 64-row items per block and trip
    weights = items * 64 * ck
    per_hmma = 256 * 4 / 5 / mt if kind == "decode" else 256 / mt
    return dict(kind=kind, dtype=dtype, bits=bits, chunk_k=ck, group=g, token_tiles=mt, m_tiles=mt, warps=4,
                stages=decode_stages(bits, ck, g, mt) if kind == "decode" else 2, weights_per_stage=weights, weights_per_hmma=per_hmma,
                hbm_bytes_per_stage=weights * bits // 8 + items * (ck // g) * 64 * 2,
                act_bytes_per_stage=8 * mt * ck * 2)


def analyze_cubin(cubin: Path, spills: dict, facts_of) -> dict[str, dict]:
    """Per kernel function in the cubin: resources and the hot loop, keyed by demangled name."""
    funcs = sass.sass_functions(cubin)
    usage = sass.resource_usage(cubin)
    names = sass.demangle(list(funcs))
    out = {}
    for mangled, instrs in funcs.items():
        facts = facts_of(names[mangled])
        if not facts:
            continue
        loop = sass.hot_loop(instrs)
        # the loop's tensor work is its weight work: stages (items, chunks) per trip from its mma count
        hmma_per_stage = facts["weights_per_stage"] / facts["warps"] / facts["weights_per_hmma"]
        steps = loop.tensor_ops / hmma_per_stage
        if abs(steps - round(steps)) > 1e-9 or steps < 1:
            raise ValueError(f"{names[mangled]}: {loop.tensor_ops} mma in the hot loop is not a whole number "
                             f"of stages ({hmma_per_stage} each)")
        steps = round(steps)
        weights_per_warp = steps * facts["weights_per_stage"] / facts["warps"]
        out[names[mangled]] = dict(
            facts, registers=usage.get(mangled, {}).get("REG"), stack=usage.get(mangled, {}).get("STACK", 0),
            **spills.get(mangled, {"spill_stores": None, "spill_loads": None}),
            loop_instructions=loop.executed, loop_instructions_min=loop.executed_min,
            loop_static_size=loop.body_instructions, loop_by_class=loop.by_class,
            loop_by_opcode=loop.by_opcode, stages_per_trip=steps, weights_per_warp_per_trip=weights_per_warp,
            instructions_per_weight=loop.executed / weights_per_warp,
            hmma_per_trip=loop.tensor_ops)
    return out


def our_launches(m: int, n: int, k: int, bits: int, mach: dict) -> list[dict]:
    """The launches csrc/gsq_gemm.cu's host code makes on `mach` (emulator, dry run: nothing executes)."""
    from gsq_vllm import cuda_emu

    emu = cuda_emu.default_emulator()
    a = torch.zeros(m, k, dtype=torch.float16)
    b = torch.zeros(n // 64, k * 2 * bits, dtype=torch.int32)
    s = torch.zeros(n // 64, k // GROUP * 64, dtype=torch.float16)
    opts = cuda_emu.EmuOptions(sms=mach["sms"], smem_per_sm=mach["smem_sm"], dry_run=True)
    _, counters = emu.gemm(a, b, s, bits, GROUP, n, k, opts)
    return counters["launches"]


# ------------------------------------------------------------------ Humming


def humming_site() -> Path:
    """humming-kernels and its NVRTC, installed apart from the project's environment (once)."""
    site = Path(os.environ.get("GSQ_HUMMING_SITE", Path.home() / ".cache" / "gsq-vllm" / f"humming-{HUMMING_VERSION}"))
    if not (site / "humming").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        *HUMMING_SITE_PACKAGES], check=True)
    return site


def humming_cubins(bits: int, n: int, k: int, ms: list[int], cache: Path, lineinfo: bool = True) -> list[dict]:
    site = humming_site()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env["LD_LIBRARY_PATH"] = f"{site / 'nvidia' / 'cu13' / 'lib'}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    res = subprocess.run([sys.executable, "-m", "benchmarks.humming_cubins", *(["--lineinfo"] * lineinfo), str(cache),
                          str(bits), str(n), str(k), "fp16", *map(str, ms)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmarks.humming_cubins failed:\n{res.stderr[-4000:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def humming_facts(tuning: dict, bits: int, threads: int):
    bm, bn, bk = tuning["block_shape"]
    weights = bn * bk
    warps = threads // 32
    # at BM = 8 the weights fill the 16-row A operand of m16n8k16 (256 per HMMA); at BM = 16 the B operand
    return dict(block_shape=tuning["block_shape"], warp_shape=tuning["warp_shape"], warps=warps,
                stages=tuning["num_stages"], weights_per_stage=weights, weights_per_hmma=256 if bm <= 8 else 128,
                hbm_bytes_per_stage=weights * bits // 8 + bn * 2 * bk // GROUP, act_bytes_per_stage=bm * bk * 2,
                ctas_per_sm=tuning.get("num_ctas_per_sm", 1), stream_k=tuning.get("use_stream_k", False))


# ------------------------------------------------------------------ the model


def occupancy(kernel: dict, threads: int, smem: int, mach: dict) -> int:
    """Blocks per SM the registers, shared memory, warps and block limit allow."""
    warps = -(-threads // 32)
    regs = kernel["registers"] or 255
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (mach["regs"] // regs_per_warp) // warps
    by_smem = mach["smem_sm"] // (smem + 1024) if smem else mach["blocks"]
    return max(0, min(mach["blocks"], mach["warps"] // warps, by_regs, by_smem))


def model_row(kernel: dict, bits: int, m: int, n: int, k: int, blocks: int, threads: int, smem: int,
              mach: dict, ctas_per_sm: int | None = None) -> dict:
    clk = mach["clock_ghz"] * 1e9
    bytes_per_weight = bits / 8 + 2 / GROUP
    occ = occupancy(kernel, threads, smem, mach)
    active = min(mach["sms"], blocks)
    resident = min(occ, blocks / active) if ctas_per_sm is None else min(occ, ctas_per_sm)
    need = mach["hbm_tbs"] * 1e12 / bytes_per_weight / (active * clk)
    issue = ISSUE_PER_CLK / kernel["instructions_per_weight"]
    tensor = HMMA_PER_CLK * kernel["weights_per_hmma"]
    inflight = resident * (kernel["stages"] - 1) * kernel["hbm_bytes_per_stage"]
    inflight_needed = mach["hbm_tbs"] * 1e12 / active * LATENCY_NS * 1e-9
    frac = min(1.0, issue / need, tensor / need, inflight / inflight_needed)
    limit = min(("issue", issue / need), ("tensor", tensor / need), ("in flight", inflight / inflight_needed),
                ("HBM", 1.0), key=lambda x: x[1])[0]
    return dict(bits=bits, m=m, n=n, k=k, blocks=blocks, threads=threads, smem=smem, registers=kernel["registers"],
                occupancy=occ,
                active_sms=active, resident_per_sm=round(resident, 2),
                instructions_per_weight=round(kernel["instructions_per_weight"], 4),
                instructions_per_weight_min=round(
                    kernel["loop_instructions_min"] / kernel["weights_per_warp_per_trip"], 4),
                issue_bound=round(issue, 1), tensor_bound=round(tensor, 1), hbm_need=round(need, 1),
                inflight_kb=round(inflight / 1024, 1), inflight_needed_kb=round(inflight_needed / 1024, 1),
                model_fraction_of_hbm=round(frac, 3), limited_by=limit)


def _short(kernel: str) -> str:
    """'void gsq::f<__half, 1, 2>(args)' -> 'gsq::f<__half, 1, 2>'"""
    return kernel.split("(")[0].removeprefix("void ")


def run_ours(out_dir: Path, cubins: dict | None = None) -> dict:
    """Loop-only rows (MS, G = 128, fp16); `cubins` (if given) receives each machine's cubin."""
    kernels, rows = {}, []
    for mach_name, mach in MACHINES.items():
        cubin, spills = compile_ours(mach["arch"], out_dir)
        if cubins is not None:
            cubins[mach_name] = cubin
        kernels[mach_name] = analyze_cubin(cubin, spills, our_kernel_facts)
        for model, layer, n, k in LAYERS:
            for bits in (2, 3):
                for m in MS:
                    launches = our_launches(m, n, k, bits, mach)
                    main = next(x for x in launches if "_kernel<" in x["kernel"])
                    name = _short(main["kernel"])
                    kern = next(v for kname, v in kernels[mach_name].items() if _short(kname) == name)
                    blocks = main["grid"][0] * main["grid"][1] * main["grid"][2]
                    row = model_row(kern, bits, m, n, k, blocks, main["block"][0], main["smem"], mach)
                    row.update(machine=mach_name, model=model, layer=layer, kernel=name,
                               operations_per_call=[_short(x["kernel"]) for x in launches])
                    rows.append(row)
    return dict(kernels=kernels, rows=rows)


def run_humming(out_dir: Path, cubins: dict | None = None) -> dict:
    """Loop-only rows of Humming's kernels (H100, fp16, G = 128) on every layer and WHOLE_MS; `cubins` (if given)
    receives each kernel's cubin (built with -lineinfo)."""
    mach = MACHINES["H100 SXM"]
    kernels, rows = {}, []
    for model, layer, n, k in LAYERS:
        for bits in (2, 3):
            for built in humming_cubins(bits, n, k, WHOLE_MS, out_dir / "humming"):
                facts = humming_facts(built["tuning"], bits, built["threads"])
                key = f"humming uint{bits} M<={8 if built['tuning']['block_shape'][0] <= 8 else 16} N={n} K={k}"
                if key not in kernels:
                    found = analyze_cubin(Path(built["cubin"]), {},
                                          lambda name, f=facts: f if "humming" in name else {})
                    ((_, kernels[key]),) = found.items()
                    if cubins is not None:
                        cubins[key] = Path(built["cubin"])
                kern = kernels[key]
                # stream-K: a persistent grid of ctas_per_sm blocks on every SM
                blocks = mach["sms"] * facts["ctas_per_sm"]
                smem = facts["stages"] * (facts["hbm_bytes_per_stage"] + facts["act_bytes_per_stage"])
                row = model_row(kern, bits, built["m"], n, k, blocks, built["threads"], smem, mach,
                                ctas_per_sm=facts["ctas_per_sm"])
                row.update(machine="H100 SXM", model=model, layer=layer, kernel=key, tuning=built["tuning"])
                rows.append(row)
    return dict(kernels=kernels, rows=rows)


# ------------------------------------------------------------------ the whole kernel (ours)
#
# The loop-only rows above count one hot-loop trip. Here every instruction each warp executes under the
# kernel's own launch plan is counted:
#
#   warp w = prologue + its items x (hot-loop trip) + per segment (row block it touches): the full-segment
#            path (C store) or the partial-segment path (partial sums, fence, arrival atomic)
#            + on the last warp to arrive at a split row block: the reduction (fixed + per contributor)
#            + tail;  warps of the last block past the plan's warp count: the early exit.
#
# Each region's count is a path through the SASS control-flow graph (benchmarks/sass.py Cfg) of the
# instantiation the host code launches: basic blocks are assigned to regions by loop structure (the hot
# loop, the segment loop around it, the reduction loop) and by the kernel-body source line of their
# instructions (-lineinfo, nvdisasm -gi), against the statements in DECODE_ANCHORS. 64-bit divisions take
# their 32-bit fast path (the modelled shapes' operands fit in 32 bits: asserted), never the CALL.

DECODE_SOURCE = ROOT / "csrc" / "gemm" / "decode.cuh"
# the statement of gsq_decode_kernel that opens each region, in source order
DECODE_ANCHORS = dict(
    kernel="gsq_decode_kernel(", segment="while (item < end)", store="if (seg_begin == rb * chunks",
    splitk="const int slot", arrive="if (!arrive_last(", reduce_loop="for (int w = first; w <= last; ++w)",
    reduce_store="store_row_block<T, MT>(C, sum")
L2_ROUND_TRIP_CYCLES = 700  # one dependent L2 access (fence, atomic, load of a partial), SM clocks
WHOLE_MS = [1, 4, 8, 16]
WHOLE_GROUPS = [128, 64]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TARGETS = dict(instructions_per_weight={2: 0.050, 3: 0.065}, critical_path_ratio=1.2, distinct_inflight_kb=32)
WHOLE_ASSUMPTIONS = dict(
    l2_round_trip_cycles=L2_ROUND_TRIP_CYCLES,
    issue="one warp-instruction per clock per scheduler, 4 schedulers per SM; block b on SM b % SMs (one wave), "
          "warp w of a block on scheduler w % 4",
    critical_path="max(busiest scheduler's issue cycles, HBM cycles) + one L2 round trip (the first load) + the "
                  "longest reduction chain: (2 + steps) dependent L2 round trips (fence, arrival atomic, then the "
                  "partials: one round trip per trip of the reduction loop when its SASS issues all of a trip's "
                  "loads before its first add (reduce_batch contributors), the remainder one contributor each) + "
                  "the reducer's instructions",
    critical_path_serial="issue + HBM + one L2 round trip + chain, nothing overlapped: a pessimistic variant "
                         "(reported, not used for the target)",
    bound="the layer's bytes (codes, scales, activations, output) / HBM bandwidth + one L2 round trip",
    distinct_inflight="per SM (mean over active SMs): per warp, the mean over its n items of the items in flight "
                      "while it waits for item j, min(stages - 1, n - j) (the ring holds stages - 1; nothing past the "
                      "range's end is fetched, so every byte in flight is distinct)",
    inflight="per SM: per warp min(stages - 1, n) items, the most its ring holds at once",
    stages="the kernel's own ring depth per instantiation (DecodeSmem::kStages, re-derived in decode_stages and "
           "checked against each launch's shared memory)",
    divisions="64-bit divisions (the kernel before: begin/end, item/chunks, owner_of, one per contributor) take "
              "their 32-bit fast path (operands below 2^31, asserted), never the CALL; the kernel now divides in "
              "32 bits only (the plan keeps items * (warps + 1) below 2^31)",
    reduction="counted once per split row block, on the last contributor to arrive: fixed + contributors x per "
              "contributor (the unrolled loop's remainder copies at the loop's per-contributor cost)",
    predicated="a predicated-off instruction counts (it takes its issue slot); BRA.DIV (divergence) not taken",
)


def decode_anchors(path: Path = DECODE_SOURCE) -> dict[str, int]:
    """Source line (1-based) of each DECODE_ANCHORS statement: the first one after the kernel's signature."""
    lines = Path(path).read_text().splitlines()
    out: dict[str, int] = {}
    start = 0
    for key, text in DECODE_ANCHORS.items():
        hit = next((i for i in range(start, len(lines)) if text in lines[i]), None)
        if hit is None:
            raise ValueError(f"{path}: '{text}' not found after line {start}: the kernel changed, update "
                             "DECODE_ANCHORS (kernel_static.py)")
        out[key] = hit + 1
        start = hit
    return out


def line_region(line: int | None, a: dict[str, int]) -> str:
    """The kernel-body region of a source line (by the anchors' order)."""
    if line is None or line < a["kernel"]:
        return "other"
    if line < a["segment"]:
        return "prologue"
    if line < a["store"]:
        return "segment"  # the segment's bounds, the accumulator reset, loop code hoisted out of the hot loop
    if line < a["splitk"]:
        return "store"  # full segment: C store
    if line <= a["arrive"]:
        return "splitk"  # partial segment: partial sums, owner_of, fence + arrival atomic
    if a["reduce_loop"] < line < a["reduce_store"]:
        return "per_contributor"
    if line < a["reduce_store"]:
        return "reduce"
    if line == a["reduce_store"]:
        return "reduce_store"
    return "tail"


def _division_slow_path(block: sass.Block) -> bool:
    """The 64-bit arm of a 64-bit division / remainder: a CALL to the compiler's helper."""
    return any(ins.base == "CALL" and re.search(r"(div|rem)_[su]64", ins.target_label or "") for ins in block.instrs)


def _is_division_fast_path(block: sass.Block) -> bool:
    """The inline 32-bit arm of a 64-bit division / remainder (the 64-bit arm is a CALL)."""
    return block.count("I2F.U32.RP") > 0 and block.count("MUFU.RCP") > 0


def _mma_count(cfg, opcodes: tuple, body) -> int:
    """mma instructions in the basic blocks ``body`` of ``cfg``."""
    return sum(cfg.blocks[j].count(*opcodes) for j in body)


def _hot_loop_and_enclosing(loops: list, mma, what: str):
    """(the hot loop: the innermost loop with the most mma, the fewest blocks breaking ties; the smallest
    loop around it). ``loops`` as ``sass.Cfg.loops()``; ``mma(body)`` counts a body's mma."""
    with_mma = [lp for lp in loops if mma(lp[2])]
    inner = [lp for lp in with_mma if not any(o is not lp and o[2] < lp[2] for o in with_mma)]
    hot = max(inner, key=lambda lp: (mma(lp[2]), -len(lp[2])))
    around = [lp for lp in loops if hot[2] < lp[2]]
    if not around:
        raise ValueError(f"no {what} loop around the hot loop")
    return hot, min(around, key=lambda lp: len(lp[2]))


def decode_regions(instrs: list, token_tiles: int, anchors: dict[str, int]) -> dict:
    """Per-execution instruction counts of gsq_decode_kernel's regions, from its SASS (nvdisasm -gi)."""
    cfg = sass.Cfg(instrs, avoid=_division_slow_path)
    loops = cfg.loops()
    # a 64-bit division's 32-bit arm is a block of its own beside the CALL; without any such CALL (the kernel
    # divides in 32 bits) there is no division path to tell apart
    has64 = any(_division_slow_path(b) for b in cfg.blocks)

    def is_div(b: sass.Block) -> bool:
        return has64 and _is_division_fast_path(b)

    mma = functools.partial(_mma_count, cfg, ("HMMA",))
    hot, seg = _hot_loop_and_enclosing(loops, mma, "segment")
    inside = [lp for lp in loops if lp[2] < seg[2] and not (lp[2] & hot[2])]
    if len(inside) != 1:
        raise ValueError(f"expected one reduction loop inside the segment loop, found {len(inside)}")
    red = inside[0]

    def region_of(b: sass.Block) -> str:
        return Counter(line_region(ins.line[1] if ins.line else None, anchors) for ins in b.instrs).most_common(1)[0][0]

    per_contrib_blocks = set(red[2]) | {j for j in seg[2] if region_of(cfg.blocks[j]) == "per_contributor"}
    zero = set(hot[2]) | per_contrib_blocks  # counted by their own regions

    def weight(b: sass.Block) -> int:
        return 0 if b.index in zero else b.size

    head, latch = seg[0], seg[1]
    atoms = [j for j in seg[2] if cfg.blocks[j].count("ATOMG.E.ADD", "ATOM.E.ADD", "RED.E.ADD")]
    if len(atoms) != 1:
        raise ValueError(f"expected one arrival atomic in the segment loop, found {len(atoms)}")
    arrive = atoms[0]

    def stores(region):
        js = [j for j in seg[2] - zero if region_of(cfg.blocks[j]) == region and cfg.blocks[j].count("STG")]
        if not js:
            raise ValueError(f"no global store in region {region}")
        return max(js, key=lambda j: cfg.blocks[j].count("STG"))

    full = cfg.path(head, latch, weight, allowed=seg[2] - {arrive}, via=stores("store"))
    to_arrive = cfg.path(head, arrive, weight, allowed=seg[2])
    not_last = cfg.path(arrive, latch, weight, allowed=seg[2], longest=False)  # arrived, not the last
    last = cfg.path(arrive, latch, weight, allowed=seg[2], via=stores("reduce_store"))
    item = cfg.path(hot[0], hot[1], allowed=hot[2])
    red_trip = cfg.path(red[0], red[1], allowed=red[2])
    if None in (full, to_arrive, not_last, last, item, red_trip):
        raise ValueError("a region's path was not found in the SASS")
    # one contributor's partial is kFloats / 4 = 4 MT float4 loads (csrc/gemm/reduce.cuh add_partial)
    loads = 4 * token_tiles
    red_loads = [cfg.blocks[j].count("LDG") for j in red_trip[1]]
    if sum(red_loads) % loads or any(x % loads for x in red_loads):
        raise ValueError(f"reduction loop loads {red_loads}: not whole contributors in each basic block")
    unroll = sum(red_loads) // loads

    def batched(b: sass.Block) -> int:
        """Contributors whose partials one block loads before its first add (one L2 round trip for all)."""
        ops = [ins.base for ins in b.instrs]
        if "LDG" not in ops:
            return unroll
        first_add = next((i for i, o in enumerate(ops) if o == "FADD"), len(ops))
        last_load = max(i for i, o in enumerate(ops) if o == "LDG")
        return ops.count("LDG") // loads if last_load < first_add else 1

    batch = min(batched(cfg.blocks[j]) for j in red_trip[1])
    outside = (cfg.reachable - seg[2]) | {head}
    pro = cfg.path(0, head, allowed=outside)
    exits = [j for j in cfg.reachable if cfg.blocks[j].instrs[-1].base == "EXIT"
             and cfg.blocks[j].instrs[-1].unconditional]
    after = {s for j in seg[2] for s in cfg.blocks[j].succ if s not in seg[2]}  # where the segment loop exits
    tails = [t for t in (cfg.path(a, e, allowed=cfg.reachable - seg[2]) for a in after for e in exits) if t]
    first_exit = next(i for i, ins in enumerate(instrs) if ins.base == "EXIT")

    def breakdown(blocks):
        c = Counter()
        for j in blocks:
            if j not in zero:
                c.update(line_region(ins.line[1] if ins.line else None, anchors) for ins in cfg.blocks[j].instrs)
        return dict(c)

    def divisions(blocks):
        return sum(is_div(cfg.blocks[j]) for j in blocks if j not in zero)

    fast = [cfg.blocks[j].size for j in cfg.reachable if is_div(cfg.blocks[j])]

    partial_path = to_arrive[1] + not_last[1][1:]
    paths = (pro[1][:-1], full[1], partial_path, last[1])
    return dict(
        item=item[0], prologue=pro[0] - cfg.blocks[head].size, tail=max(t[0] for t in tails), idle=first_exit + 1,
        segment_full=full[0], segment_partial=to_arrive[0] + not_last[0] - cfg.blocks[arrive].size,
        reduce_fixed=last[0] - not_last[0], per_contributor=red_trip[0] / unroll, reduce_unroll=unroll,
        reduce_batch=batch,
        breakdown=dict(prologue=breakdown(pro[1][:-1]), segment_full=breakdown(full[1]),
                       segment_partial=breakdown(partial_path),
                       reduce_fixed={r: v - breakdown(not_last[1]).get(r, 0) for r, v in breakdown(last[1]).items()}),
        divisions_64=dict(prologue=divisions(pro[1][:-1]), segment_full=divisions(full[1]),
                          segment_partial=divisions(partial_path),
                          per_contributor=sum(is_div(cfg.blocks[j]) for j in red_trip[1]) / unroll),
        division_fast_path_instructions=round(sum(fast) / len(fast), 1) if fast else 0,
        # the hot loop's mma are its own: none may be counted on another region's path
        tensor_ops_outside_hot_loop=sum(cfg.blocks[j].count("HMMA") for p in paths for j in p if j not in zero),
        blocks=len(cfg.blocks), reachable_blocks=len(cfg.reachable))


def decode_split(items: int, warps: int, chunks: int) -> list[tuple[int, int, list[tuple[int, int, int, bool]]]]:
    """The decode kernel's work split (csrc/gemm/decode.cuh, re-derived; tests/test_kernel_static.py checks it
    against the kernel run by the emulator): warp w streams items [items w / warps, items (w + 1) / warps)
    as segments, one per row block it touches: (row block, first item, end item, covers the whole row block)."""
    out = []
    for w in range(warps):
        begin, end = items * w // warps, items * (w + 1) // warps
        segs, i = [], begin
        while i < end:
            rb = i // chunks
            se = min(end, (rb + 1) * chunks)
            segs.append((rb, i, se, i == rb * chunks and se == (rb + 1) * chunks))
            i = se
        out.append((begin, end, segs))
    return out


def owner_of(i: int, items: int, warps: int) -> int:
    """The warp whose range holds item i (csrc/gemm/decode.cuh owner_of)."""
    return ((i + 1) * warps - 1) // items


def _in_flight_sum(n: int, ring: int) -> int:
    """sum over j < n of min(ring, n - j): a warp's items in flight while it waits for each of its n items."""
    return n * (n + 1) // 2 if n <= ring else ring * (ring + 1) // 2 + (n - ring) * ring


def whole_kernel_row(reg: dict, plan: dict, n: int, k: int, m: int, bits: int, g: int, ck: int, mach: dict,
                     stages: int | None = None, reduction: str = "serial") -> dict:
    """Whole-kernel instructions per weight, critical path and distinct bytes in flight of one layer.
    `stages` (DecodeSmem::kStages; None: the kernel's own, decode_stages) and `reduction` ("serial": the
    reducer's loop loads reduce_batch contributors' partials per round trip; "tree": a what-if where they are
    added in a tree, log2(contributors) dependent steps) are the kernel's unless a what-if says otherwise."""
    warps = plan["warps"]
    chunks = k // ck
    items = n // 64 * chunks
    if stages is None:
        stages = decode_stages(bits, ck, g, 2 if m > 8 else 1)
    if items * (warps + 1) >= 2**31:
        raise ValueError("64-bit divisions would leave their 32-bit fast path: not modelled")
    split = decode_split(items, warps, chunks)
    instr = [0] * warps
    parts = Counter()
    contributors: dict[int, list[int]] = {}
    for w, (begin, end, segs) in enumerate(split):
        n_items = end - begin
        parts["prologue"] += reg["prologue"]
        parts["items"] += n_items * reg["item"]
        parts["tail"] += reg["tail"]
        for rb, _, _, whole in segs:
            if whole:
                parts["segment_full"] += reg["segment_full"]
            else:
                parts["segment_partial"] += reg["segment_partial"]
                contributors.setdefault(rb, []).append(w)
        instr[w] = reg["prologue"] + reg["tail"] + n_items * reg["item"] + sum(
            reg["segment_full"] if whole else reg["segment_partial"] for *_, whole in segs)
    chain_cycles, chain = 0, 0
    reduction_max = 0
    for rb, ws in contributors.items():
        first, last = owner_of(rb * chunks, items, warps), owner_of((rb + 1) * chunks - 1, items, warps)
        if ws != list(range(first, last + 1)):
            raise AssertionError(f"row block {rb}: contributors {ws} != owner_of range {first}..{last}")
        # the last of them to arrive reduces, after its own stream: fence and arrival atomic (two dependent L2
        # round trips), then per contributor one dependent load of its partial and the adds
        extra = reg["reduce_fixed"] + len(ws) * reg["per_contributor"]
        parts["reduce"] += extra
        reduction_max = max(reduction_max, extra)
        # "serial": the unrolled loop's trip loads `reduce_batch` contributors' partials before its first add (one
        # round trip for them all), the remainder one at a time
        batch = reg.get("reduce_batch", 1)
        steps = (len(ws) // batch + len(ws) % batch if reduction == "serial"
                 else math.ceil(math.log2(len(ws))) if len(ws) > 1 else 1)
        cyc = (2 + steps) * L2_ROUND_TRIP_CYCLES + reg["reduce_fixed"] + (
            len(ws) if reduction == "serial" else steps) * reg["per_contributor"]
        if cyc > chain_cycles:
            chain_cycles, chain = cyc, 2 + steps
    idle = plan["grid_x"] * 4 - warps
    parts["idle_exit"] = idle * reg["idle"]
    total = sum(parts.values())
    # placement: block b on SM b % sms (one wave), warp w % 4 of a block on scheduler w % 4
    sched: Counter = Counter()
    sm_inflight: Counter = Counter()
    sm_distinct: Counter = Counter()
    item_bytes = 64 * ck * bits // 8 + (ck // g) * 64 * 2
    for w, (begin, end, _) in enumerate(split):
        sm = (w // 4) % mach["sms"]
        sched[(sm, w % 4)] += instr[w]
        n_items = end - begin
        sm_inflight[sm] += min(stages - 1, n_items) * item_bytes
        # while the warp waits for its item j, items j .. min(j + stages - 2, n - 1) are in flight (nothing past
        # the range's end is fetched): the mean over its items
        sm_distinct[sm] += item_bytes * _in_flight_sum(n_items, stages - 1) / max(n_items, 1)
    clk = mach["clock_ghz"] * 1e9
    hbm_bytes = n * k * bits / 8 + n * (k // g) * 2 + m * k * 2 + m * n * 2
    hbm_cycles = hbm_bytes / (mach["hbm_tbs"] * 1e12) * clk
    issue_cycles = max(sched.values())  # the busiest scheduler's warps' streams at one instruction per clock
    critical = max(issue_cycles, hbm_cycles) + L2_ROUND_TRIP_CYCLES + chain_cycles
    bound = hbm_cycles + L2_ROUND_TRIP_CYCLES
    distinct_kb = sum(sm_distinct.values()) / len(sm_distinct) / 1024
    ipw = total / (n * k)
    return dict(
        n=n, k=k, m=m, bits=bits, group=g, chunk_k=ck, items=items, warps=warps, blocks=plan["grid_x"],
        blocks_per_sm=-(-plan["grid_x"] // mach["sms"]), active_sms=len(sm_inflight),
        items_per_warp=round(items / warps, 2),
        max_items_per_warp=max(e - b for b, e, _ in split), split_row_blocks=len(contributors),
        max_contributors=max((len(v) for v in contributors.values()), default=0),
        instructions=int(total), instructions_by_region={r: int(v) for r, v in parts.items()},
        instructions_per_weight=round(ipw, 4), loop_instructions_per_weight=round(reg["item"] / (64 * ck), 4),
        slowest_warp_instructions=int(max(instr)), reduction_instructions_max=int(reduction_max),
        issue_cycles=int(issue_cycles), hbm_cycles=int(hbm_cycles),
        reduction_chain_round_trips=chain, chain_cycles=int(chain_cycles), critical_path_cycles=int(critical),
        critical_path_serial_cycles=int(issue_cycles + hbm_cycles + L2_ROUND_TRIP_CYCLES + chain_cycles),
        bound_cycles=int(bound), critical_path_ratio=round(critical / bound, 2),
        inflight_kb_per_sm=round(sum(sm_inflight.values()) / len(sm_inflight) / 1024, 1),
        distinct_inflight_kb_per_sm=round(distinct_kb, 1),
        distinct_inflight_kb_per_sm_min=round(min(sm_distinct.values()) / 1024, 1),
        met=dict(instructions_per_weight=ipw <= TARGETS["instructions_per_weight"][bits],
                 critical_path=critical <= TARGETS["critical_path_ratio"] * bound,
                 distinct_inflight=distinct_kb >= TARGETS["distinct_inflight_kb"]))


def what_if_rows(reg: dict, plan: dict, n: int, k: int, m: int, bits: int, g: int, ck: int, mach: dict,
                 min_items: int = 8) -> dict[str, dict]:
    """The same model for kernels that do not exist (yet): what the targets ask of the design.

    * now: the kernel as compiled;
    * fewer warps: every warp streams >= `min_items` items (warps = items / min_items, at least one per SM),
      its ring deep enough for 32 KB distinct in flight per SM (the smallest ring depth that gets there);
    * + tree reduction: the split row blocks' partials added in log2(contributors) dependent steps;
    * + no 64-bit division: each division site on the paths gone (its 32-bit arm's instructions)."""
    out = {"now": whole_kernel_row(reg, plan, n, k, m, bits, g, ck, mach)}
    items = n // 64 * (k // ck)
    warps = min(plan["warps"], max(mach["sms"], items // min_items))
    fewer = dict(plan, warps=warps, grid_x=-(-warps // 4))
    for stages in range(3, 33):
        row = whole_kernel_row(reg, fewer, n, k, m, bits, g, ck, mach, stages=stages)
        if row["met"]["distinct_inflight"]:
            break
    act = 8 * (2 if m > 8 else 1) * (ck + 8) * 2
    item_bytes = 64 * ck * bits // 8 + (ck // g) * 64 * 2
    ring = dict(stages=stages, ring_kb_per_warp=round(stages * (item_bytes + act) / 1024, 1))
    out["fewer warps"] = dict(row, **ring)
    out["+ tree reduction"] = dict(whole_kernel_row(reg, fewer, n, k, m, bits, g, ck, mach, stages=stages,
                                                    reduction="tree"), **ring)
    d = reg["division_fast_path_instructions"]
    div = reg["divisions_64"]
    lean = dict(reg, prologue=reg["prologue"] - d * div["prologue"],
                segment_full=reg["segment_full"] - d * div["segment_full"],
                segment_partial=reg["segment_partial"] - d * div["segment_partial"],
                per_contributor=reg["per_contributor"] - d * div["per_contributor"])
    out["+ no 64-bit division"] = dict(whole_kernel_row(lean, fewer, n, k, m, bits, g, ck, mach, stages=stages,
                                                        reduction="tree"), **ring)
    return out


def our_decode_kernel(m: int, k: int, bits: int, g: int, dtype: str, mach: dict) -> str:
    """The decode instantiation csrc/gsq_gemm.cu's host code launches for this K, G, M, dtype (emulator dry run
    at N = 64: the dispatch depends on K, G and M only)."""
    from gsq_vllm import cuda_emu

    key = (m, k, bits, g, dtype, mach["sms"], mach["smem_sm"])
    if key not in _KERNEL_NAMES:
        t = DTYPES[dtype]
        a = torch.zeros(m, k, dtype=t)
        b = torch.zeros(1, k * 2 * bits, dtype=torch.int32)
        s = torch.zeros(1, k // g * 64, dtype=t)
        opts = cuda_emu.EmuOptions(sms=mach["sms"], smem_per_sm=mach["smem_sm"], dry_run=True)
        _, counters = cuda_emu.default_emulator().gemm(a, b, s, bits, g, 64, k, opts)
        (launch,) = counters["launches"]
        facts = our_kernel_facts(launch["kernel"])
        # the model's ring depth and placement (4 warps a block) are the launch's
        if launch["smem"] != launch["block"][0] // 32 * facts["stages"] * decode_stage_bytes(
                bits, facts["chunk_k"], g, facts["token_tiles"]) or launch["block"][0] != 128:
            raise AssertionError(f"{launch}: not the ring depth decode_stages() models ({facts['stages']})")
        _KERNEL_NAMES[key] = _short(launch["kernel"])
    return _KERNEL_NAMES[key]


_KERNEL_NAMES: dict = {}


def our_decode_regions(cubin: Path) -> dict[str, dict]:
    """decode_regions of every decode instantiation in the cubin (built with -lineinfo), by short name."""
    anchors = decode_anchors()
    funcs = sass.nvdisasm_functions(cubin)
    names = sass.demangle(list(funcs))
    out = {}
    for mangled, instrs in funcs.items():
        facts = our_kernel_facts(names[mangled])
        if facts.get("kind") == "decode":
            out[_short(names[mangled])] = decode_regions(instrs, facts["token_tiles"], anchors)
    return out


def run_whole_ours(cubins: dict[str, Path], kernels: dict[str, dict]) -> dict:
    """The whole-kernel rows of our decode kernel: every layer, M, dtype, G and bit width, per machine."""
    from gsq_vllm import cuda_emu

    emu = cuda_emu.default_emulator()
    regions, rows, what_ifs = {}, [], []
    for mach_name, mach in MACHINES.items():
        regions[mach_name] = our_decode_regions(cubins[mach_name])
        for model, layer, n, k in LAYERS:
            for dtype in DTYPES:
                for g in WHOLE_GROUPS:
                    for bits in (2, 3):
                        for m in WHOLE_MS:
                            name = our_decode_kernel(m, k, bits, g, dtype, mach)
                            facts = our_kernel_facts(name)
                            plan = emu.plan(m, n, k, bits, g, mach["sms"], mach["smem_sm"])
                            if plan["token_tiles"] != facts["token_tiles"]:
                                raise AssertionError(f"{name}: plan token tiles {plan['token_tiles']}")
                            row = whole_kernel_row(regions[mach_name][name], plan, n, k, m, bits, g, facts["chunk_k"],
                                                   mach)
                            kern = next(v for kname, v in kernels[mach_name].items() if _short(kname) == name)
                            row.update(machine=mach_name, model=model, layer=layer, dtype=dtype, kernel=name,
                                       registers=kern["registers"], spill_stores=kern["spill_stores"])
                            rows.append(row)
                            if mach_name == "H100 SXM" and dtype == "fp16" and g == 128 and m in (1, 16):
                                for what, r in what_if_rows(regions[mach_name][name], plan, n, k, m, bits, g,
                                                            facts["chunk_k"], mach).items():
                                    what_ifs.append(dict(r, what_if=what, machine=mach_name, model=model,
                                                         layer=layer, dtype=dtype, kernel=name))
    return dict(regions=regions, rows=rows, what_if=what_ifs)


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}  -- loop only: one hot-loop trip per weight (MODEL, not a measurement)")
    hdr = ("machine", "layer", "N", "K", "b", "M", "regs", "occ", "instr/w", "issue", "tensor", "HBM need",
           "KB infl", "KB need", "model %HBM", "limit")
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["machine"], r.get("model", "") + ":" + r.get("layer", ""), r["n"], r["k"], r["bits"], r["m"],
            r.get("registers", ""), r["occupancy"], r["instructions_per_weight"], r["issue_bound"],
            r["tensor_bound"], r["hbm_need"], r["inflight_kb"], r["inflight_needed_kb"],
            f"{100 * r['model_fraction_of_hbm']:.0f}", r["limited_by"])))


# ------------------------------------------------------------------ the whole kernel (Humming)
#
# Humming's kernel (humming-kernels, compiled by its own NVRTC path with -lineinfo added) is one loop over
# work units per CTA (a persistent grid): per unit a setup, the main loop (stages_per_trip k blocks per trip),
# up to stages_per_trip - 1 tail stages, and an epilogue that combines the slices of a split tile in order
# through a lock. Regions from its SASS the same way as ours, but by control-flow structure only (no source
# anchors in their code): the tail stages are the blocks outside the hot loop that hold mma (and the blocks
# of the same source lines); a unit's fixed path is taken at its shortest for an unsplit tile and at its
# longest for a slice of a split tile (its epilogue's branches are not told apart further). All 8 warps of a
# CTA run the same path.


def humming_regions(instrs: list, stages_per_trip: int) -> dict:
    cfg = sass.Cfg(instrs, avoid=_division_slow_path)
    loops = cfg.loops()

    mma = functools.partial(_mma_count, cfg, ("HMMA", "HGMMA"))
    hot, unit = _hot_loop_and_enclosing(loops, mma, "work-unit")
    outside_hot = unit[2] - hot[2]

    def main_line(j):
        c = Counter(ins.line for ins in cfg.blocks[j].instrs if ins.line)
        return c.most_common(1)[0][0] if c else None

    tail_lines = {main_line(j) for j in outside_hot if mma([j])}
    tail = {j for j in outside_hot if mma([j]) or main_line(j) in tail_lines}
    zero = set(hot[2]) | tail

    def weight(b: sass.Block) -> int:
        return 0 if b.index in zero else b.size

    head, latch = unit[0], unit[1]
    item = cfg.path(hot[0], hot[1], allowed=hot[2])
    fixed_min = cfg.path(head, latch, weight, allowed=unit[2], longest=False)
    fixed_max = cfg.path(head, latch, weight, allowed=unit[2])
    ts = sorted(tail)
    tail_path = cfg.path(ts[0], ts[-1], allowed=tail) if ts else (0, [])
    tail_stages = mma(tail_path[1]) / (mma(hot[2]) / stages_per_trip) if ts else 0
    pro = cfg.path(0, head, allowed=(cfg.reachable - unit[2]) | {head})
    exits = [j for j in cfg.reachable if cfg.blocks[j].instrs[-1].base == "EXIT"
             and cfg.blocks[j].instrs[-1].unconditional]
    after = {s for j in unit[2] for s in cfg.blocks[j].succ if s not in unit[2]}
    tails = [t for t in (cfg.path(a, e, allowed=cfg.reachable - unit[2]) for a in after for e in exits) if t]
    if None in (item, fixed_min, fixed_max, pro) or not tails:
        raise ValueError("a region's path was not found in Humming's SASS")
    return dict(item=item[0], stages_per_trip=stages_per_trip, prologue=pro[0] - cfg.blocks[head].size,
                unit_fixed_min=fixed_min[0], unit_fixed_max=fixed_max[0],
                tail_stage=tail_path[0] / tail_stages if tail_stages else 0, tail_stages_in_sass=tail_stages,
                exit=max(t[0] for t in tails),
                # the main loop's and the tail's mma are counted by stage: none on a fixed path
                tensor_ops_outside_loops=sum(mma([j]) for j in fixed_max[1] + pro[1][:-1] if j not in zero),
                blocks=len(cfg.blocks), reachable_blocks=len(cfg.reachable))


def humming_schedule(n: int, k: int, tuning: dict, sms: int) -> list[list[tuple[int, int]]]:
    """Per CTA of Humming's persistent grid: its work units (output tile, k blocks), re-derived in Python from
    reading its scheduler (humming/include/humming/scheduler.cuh, v0.1.19; not checked against a GPU run):
    grid = SMs x CTAs per SM; whole waves of output tiles are data-parallel (a tile's whole K on one CTA) unless
    every tile is streamed; the rest (a last partial wave, merged with a whole wave when it is <= 1/10 of the
    grid) are streamed by k blocks in equal contiguous ranges per CTA (at least ceil((K blocks - 1) / 9),
    rounded up to a multiple of the stage count), cut at tile boundaries into slices."""
    bn, bk = tuning["block_shape"][1], tuning["block_shape"][2]
    grid = sms * tuning.get("num_ctas_per_sm", 1)
    stages = tuning["num_stages"]
    tiles, kb = -(-n // bn), k // bk
    units: list[list[tuple[int, int]]] = [[] for _ in range(grid)]
    if not tuning.get("use_stream_k", False):
        for t in range(tiles):
            units[t % grid].append((t, kb))
        return units
    streamed = tiles
    if tiles > grid:
        streamed = tiles % grid
        if streamed and streamed * 10 <= grid:
            streamed += grid
    waves = (tiles - streamed) // grid
    for c in range(grid):
        units[c] = [(c + w * grid, kb) for w in range(waves)]
    per_cta = max(-(-streamed * kb // grid), -(-(kb - 1) // 9))
    per_cta = -(-per_cta // stages) * stages
    total = tiles * kb
    for c in range(grid):
        i = waves * grid * kb + per_cta * c
        end = min(total, i + per_cta)
        while i < end:
            t = i // kb
            s = min(end, (t + 1) * kb) - i
            units[c].append((t, s))
            i += s
    return units


def humming_whole_row(reg: dict, facts: dict, tuning: dict, n: int, k: int, m: int, bits: int, mach: dict) -> dict:
    units = humming_schedule(n, k, tuning, mach["sms"])
    kb = k // tuning["block_shape"][2]
    slices = Counter(t for cta in units for t, _ in cta)
    covered = Counter()
    for cta in units:
        for t, s in cta:
            covered[t] += s
    if any(v != kb for v in covered.values()) or len(covered) != -(-n // tuning["block_shape"][1]):
        raise AssertionError("Humming schedule does not cover every tile's K once")
    p, warps = reg["stages_per_trip"], facts["warps"]
    per_warp, parts = [], Counter()
    stages, stage_bytes = facts["stages"], facts["hbm_bytes_per_stage"]
    distinct = []
    for cta in units:
        w = reg["prologue"] + reg["exit"]  # a CTA without work runs them too
        parts["prologue"] += warps * w
        dist_num = 0.0
        for t, s in cta:
            fixed = reg["unit_fixed_max"] if slices[t] > 1 else reg["unit_fixed_min"]
            loop = (s // p) * reg["item"] + (s % p) * reg["tail_stage"]
            w += fixed + loop
            parts["units_fixed"] += warps * fixed
            parts["items"] += warps * loop
            dist_num += s * (stages - 1) * stage_bytes * s / (s + stages - 1)
        per_warp.append(w)
        distinct.append(dist_num / sum(s for _, s in cta) if cta else 0.0)
    total = sum(parts.values())
    sched: Counter = Counter()
    sm_distinct: Counter = Counter()
    for c, w in enumerate(per_warp):
        sched[c % mach["sms"]] += w * warps / 4  # 8 warps: 2 per scheduler
        sm_distinct[c % mach["sms"]] += distinct[c]
    clk = mach["clock_ghz"] * 1e9
    hbm_bytes = n * k * bits / 8 + n * (k // GROUP) * 2 + m * k * 2 + m * n * 2
    hbm_cycles = hbm_bytes / (mach["hbm_tbs"] * 1e12) * clk
    issue_cycles = max(sched.values())
    widest = max(slices.values())
    # slices of a split tile combine in order: each waits for the previous one's release (lock), reads the
    # partial so far and releases: two dependent L2 round trips per slice
    chain = 2 * widest if widest > 1 else 0
    chain_cycles = chain * L2_ROUND_TRIP_CYCLES
    critical = max(issue_cycles, hbm_cycles) + L2_ROUND_TRIP_CYCLES + chain_cycles
    bound = hbm_cycles + L2_ROUND_TRIP_CYCLES
    distinct_kb = sum(sm_distinct.values()) / len(sm_distinct) / 1024
    ipw = total / (n * k)
    loop_ipw = reg["item"] / (reg["stages_per_trip"] * facts["weights_per_stage"] / warps)
    return dict(
        n=n, k=k, m=m, bits=bits, group=GROUP, ctas=len(units), tiles=len(covered),
        split_tiles=sum(v > 1 for v in slices.values()), max_slices=widest,
        units_per_cta=round(sum(len(u) for u in units) / len(units), 2),
        instructions=int(total), instructions_by_region={r: int(v) for r, v in parts.items()},
        instructions_per_weight=round(ipw, 4), loop_instructions_per_weight=round(loop_ipw, 4),
        issue_cycles=int(issue_cycles), hbm_cycles=int(hbm_cycles), reduction_chain_round_trips=chain,
        chain_cycles=chain_cycles, critical_path_cycles=int(critical), bound_cycles=int(bound),
        critical_path_ratio=round(critical / bound, 2), distinct_inflight_kb_per_sm=round(distinct_kb, 1),
        met=dict(instructions_per_weight=ipw <= TARGETS["instructions_per_weight"][bits],
                 critical_path=critical <= TARGETS["critical_path_ratio"] * bound,
                 distinct_inflight=distinct_kb >= TARGETS["distinct_inflight_kb"]))


def run_whole_humming(loop_only: dict, cubins: dict[str, Path]) -> dict:
    """Whole-kernel rows of Humming's kernels that run_humming compiled (H100, fp16, G = 128)."""
    mach = MACHINES["H100 SXM"]
    regions, rows = {}, []
    for r in loop_only["rows"]:
        kern = loop_only["kernels"][r["kernel"]]
        cubin = cubins[r["kernel"]]
        if r["kernel"] not in regions:
            (instrs,) = [v for name, v in sass.nvdisasm_functions(cubin).items() if "humming" in name]
            regions[r["kernel"]] = humming_regions(instrs, kern["stages_per_trip"])
            if regions[r["kernel"]]["item"] != kern["loop_instructions"]:
                raise AssertionError(f"{r['kernel']}: hot loop {regions[r['kernel']]['item']} instructions in the "
                                     f"CFG, {kern['loop_instructions']} in the loop-only reading")
        row = humming_whole_row(regions[r["kernel"]], kern, r["tuning"], r["n"], r["k"], r["m"], r["bits"], mach)
        row.update(machine=mach_name_of(mach), model=r["model"], layer=r["layer"], kernel=r["kernel"],
                   dtype="fp16", tuning=r["tuning"])
        rows.append(row)
    return dict(regions=regions, rows=rows)


def mach_name_of(mach: dict) -> str:
    return next(name for name, m in MACHINES.items() if m is mach)


WHOLE_NOTE = ("MODEL, not a measurement: whole-kernel warp-instructions counted from the SASS (per-region paths) "
              "under the kernel's own launch plan; cycles from machine constants; no GPU was run")


def _mark(ok: bool, value: float, target: float, lower_is_better: bool = True) -> str:
    if ok:
        return "met"
    return f"MISSED x{value / target:.2f}" if lower_is_better else f"MISSED x{target / value:.2f}"


def print_whole(whole: dict, label: str, machine: str = "H100 SXM") -> None:
    """Per layer and (bits, M): ours whole-kernel and loop-only, Humming's where modelled, the critical path
    against the HBM bound and distinct bytes in flight, each target met or missed (the worst of fp16 / bf16 x
    G = 128 / 64 decides)."""
    rows = [r for r in whole[label]["rows"] if r["machine"] == machine]
    hum = {(r["n"], r["k"], r["bits"], r["m"]): r for r in whole.get("humming", {}).get("rows", [])}
    t = TARGETS
    print(f"\nWHOLE KERNEL per layer, {machine}, TP=1 -- {WHOLE_NOTE}")
    print(f"targets: <= {t['instructions_per_weight'][2]} (2-bit) / {t['instructions_per_weight'][3]} (3-bit) "
          f"warp-instr/weight; critical path <= {t['critical_path_ratio']}x (bytes / HBM + one L2 round trip); "
          f">= {t['distinct_inflight_kb']} KB distinct in flight per SM. Ours: fp16 G=128 value, [worst of "
          "fp16/bf16 x G=128/64]; a target is met only when all four are.")
    hdr = ("layer", "b", "M", "warps", "items/warp", "ours whole", "[worst]", "ours loop", "Humming whole",
           "Humming loop", "crit cyc", "bound cyc", "crit/bound [worst]", "Humming crit/bound",
           "distinct KB/SM [worst]", "Humming KB/SM", "instr/w target", "crit target", "in-flight target")
    print(" | ".join(hdr))
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["layer"], r["bits"], r["m"]), []).append(r)
    for (model, layer, bits, m), rs in groups.items():
        base = next(r for r in rs if r["dtype"] == "fp16" and r["group"] == 128)
        worst_ipw = max(rs, key=lambda r: r["instructions_per_weight"])
        worst_crit = max(rs, key=lambda r: r["critical_path_ratio"])
        worst_kb = min(rs, key=lambda r: r["distinct_inflight_kb_per_sm"])
        h = hum.get((base["n"], base["k"], bits, m))
        hw = "n/a" if h is None else f"{h['instructions_per_weight']:.4f}"
        hl = "n/a" if h is None else f"{h['loop_instructions_per_weight']:.4f}"
        hc = "n/a" if h is None else f"{h['critical_path_ratio']:.2f}"
        hk = "n/a" if h is None else f"{h['distinct_inflight_kb_per_sm']:.1f}"
        print(" | ".join(str(x) for x in (
            f"{model}:{layer}", bits, m, base["warps"], base["items_per_warp"],
            f"{base['instructions_per_weight']:.4f}",
            f"[{worst_ipw['instructions_per_weight']:.4f}]", f"{base['loop_instructions_per_weight']:.4f}", hw, hl,
            base["critical_path_cycles"], base["bound_cycles"],
            f"{base['critical_path_ratio']:.2f} [{worst_crit['critical_path_ratio']:.2f}]", hc,
            f"{base['distinct_inflight_kb_per_sm']:.1f} [{worst_kb['distinct_inflight_kb_per_sm']:.1f}]", hk,
            _mark(all(r["met"]["instructions_per_weight"] for r in rs), worst_ipw["instructions_per_weight"],
                  t["instructions_per_weight"][bits]),
            _mark(all(r["met"]["critical_path"] for r in rs), worst_crit["critical_path_ratio"],
                  t["critical_path_ratio"]),
            _mark(all(r["met"]["distinct_inflight"] for r in rs), worst_kb["distinct_inflight_kb_per_sm"],
                  t["distinct_inflight_kb"], lower_is_better=False))))
    print(f"\nWHERE THE INSTRUCTIONS GO ({machine}, fp16, G=128, M=1; share of the whole kernel's warp-instructions) "
          f"-- MODEL, not a measurement")
    print(" | ".join(("layer", "b", "items/warp", "prologue", "hot loop", "full segments", "partial segments",
                      "reductions", "idle/tail", "slowest warp", "reduction chain (L2 round trips)", "issue cyc",
                      "HBM cyc", "chain cyc")))
    for r in rows:
        if r["dtype"] == "fp16" and r["group"] == 128 and r["m"] == 1:
            p = r["instructions_by_region"]
            tot = r["instructions"]
            print(" | ".join(str(x) for x in (
                f"{r['model']}:{r['layer']}", r["bits"], r["items_per_warp"], f"{p['prologue'] / tot:.0%}",
                f"{p['items'] / tot:.0%}", f"{p.get('segment_full', 0) / tot:.0%}",
                f"{p.get('segment_partial', 0) / tot:.0%}", f"{p.get('reduce', 0) / tot:.0%}",
                f"{(p['tail'] + p['idle_exit']) / tot:.0%}", r["slowest_warp_instructions"],
                r["reduction_chain_round_trips"], r["issue_cycles"], r["hbm_cycles"], r["chain_cycles"])))


def print_what_if(whole: dict, label: str) -> None:
    rows = whole[label].get("what_if", [])
    if not rows:
        return
    print("\nWHAT-IF (H100 SXM, fp16, G=128): the same MODEL applied to decode kernels that do not exist -- "
          "what the targets ask of the design; MODEL, not a measurement")
    print(" | ".join(("layer", "b", "M", "design", "warps", "items/warp", "ring stages (KB/warp)", "instr/w",
                      "crit/bound", "distinct KB/SM", "targets met (instr/w, crit, in flight)")))
    for r in rows:
        ring = f"{r['stages']} ({r['ring_kb_per_warp']})" if "stages" in r else "3"
        met = r["met"]
        print(" | ".join(str(x) for x in (
            f"{r['model']}:{r['layer']}", r["bits"], r["m"], r["what_if"], r["warps"], r["items_per_warp"], ring,
            f"{r['instructions_per_weight']:.4f}", f"{r['critical_path_ratio']:.2f}",
            f"{r['distinct_inflight_kb_per_sm']:.1f}",
            "/".join("yes" if met[t] else "no" for t in ("instructions_per_weight", "critical_path",
                                                         "distinct_inflight")))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, str(RESULTS / "kernel_static.json"), flag="--out")
    ap.add_argument("--humming", action="store_true", help="also model Humming (installs humming-kernels apart)")
    ap.add_argument("--label", default="gsq", help="name of our kernel's entry in the JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cubins: dict[str, Path] = {}
        result = {"note": "MODEL, not a measurement: STATIC MODEL from SASS, launch plans and machine constants; "
                          "no GPU was run",
                  "assumptions": dict(issue_per_clk=ISSUE_PER_CLK, hmma_per_clk=HMMA_PER_CLK,
                                      latency_ns=LATENCY_NS, group_size=GROUP, machines=MACHINES),
                  "host": platform.node(), args.label: run_ours(tmp, cubins)}
        print_table(f"{args.label} (csrc/gsq_gemm.cu)", [r for r in result[args.label]["rows"]
                                                       if r["model"] == "llama3.1-8b" and r["m"] in (1, 16)])
        whole = {"note": WHOLE_NOTE, "assumptions": WHOLE_ASSUMPTIONS, "targets": TARGETS,
                 args.label: run_whole_ours(cubins, result[args.label]["kernels"])}
        if args.humming:
            hum_cubins: dict[str, Path] = {}
            result["humming"] = run_humming(tmp, hum_cubins)
            print_table(f"Humming {HUMMING_VERSION}", [r for r in result["humming"]["rows"]
                                                       if r["model"] == "llama3.1-8b" and r["m"] in (1, 16)])
            whole["humming"] = run_whole_humming(result["humming"], hum_cubins)
        result["whole_kernel"] = whole
        print_whole(whole, args.label)
        print_what_if(whole, args.label)
    print()
    write_json(result, args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

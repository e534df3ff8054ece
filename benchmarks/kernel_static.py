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
  uint2/uint3, group 128, fp16) at M <= 8 and M = 16, compiled by its NVRTC
  path (benchmarks/humming_cubins.py; needs pip access once).

    python benchmarks/kernel_static.py [--humming] [--out benchmarks/results/kernel_static.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sass  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

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


def compile_ours(arch: str, out_dir: Path) -> tuple[Path, dict[str, dict]]:
    """nvcc csrc/gsq_gemm.cu -> cubin; returns it and ptxas's per-function spill report."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as torch_flags
    except ImportError:
        torch_flags = []
    cubin = out_dir / f"gsq_gemm_sm{arch}.cubin"
    cmd = [sass.tool("nvcc"), "-cubin", "-O3", "-std=c++20", *torch_flags, "-Xptxas", "-v",
           f"-arch=sm_{arch}", str(ROOT / "csrc" / "gsq_gemm.cu"), "-o", str(cubin)]
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


def our_kernel_facts(name: str) -> dict:
    """What one hot-loop trip of our kernels covers (csrc/gemm/): the weights are the 16-row A
    operand of m16n8k16 (256 weights per mma, shared by the MT n8 token tiles).

    * gsq_decode_kernel<T, BITS, CK, G, MT>: every warp streams its own items (64 rows x CK k)
      through a 3-stage cp.async ring: one item per trip, the next two in flight; per k step 4
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
                stages=3 if kind == "decode" else 2, weights_per_stage=weights, weights_per_hmma=per_hmma,
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


def humming_cubins(bits: int, n: int, k: int, ms: list[int], cache: Path) -> list[dict]:
    site = humming_site()
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["LD_LIBRARY_PATH"] = f"{site / 'nvidia' / 'cu13' / 'lib'}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    res = subprocess.run([sys.executable, str(HERE / "humming_cubins.py"), str(cache), str(bits), str(n), str(k),
                          "fp16", *map(str, ms)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"humming_cubins.py failed:\n{res.stderr[-4000:]}")
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


def run_ours(out_dir: Path) -> dict:
    kernels, rows = {}, []
    for mach_name, mach in MACHINES.items():
        cubin, spills = compile_ours(mach["arch"], out_dir)
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


def run_humming(out_dir: Path) -> dict:
    mach = MACHINES["H100 SXM"]
    kernels, rows = {}, []
    for model, layer, n, k in LAYERS[:4]:  # Llama-3.1-8B shapes
        for bits in (2, 3):
            for built in humming_cubins(bits, n, k, [1, 16], out_dir / "humming"):
                facts = humming_facts(built["tuning"], bits, built["threads"])
                found = analyze_cubin(Path(built["cubin"]), {}, lambda name, f=facts: f if "humming" in name else {})
                (name, kern), = found.items()
                key = f"humming uint{bits} M<={8 if built['m'] <= 8 else 16} N={n} K={k}"
                kernels[key] = kern
                # stream-K: a persistent grid of ctas_per_sm blocks on every SM
                blocks = mach["sms"] * facts["ctas_per_sm"]
                smem = facts["stages"] * (facts["hbm_bytes_per_stage"] + facts["act_bytes_per_stage"])
                row = model_row(kern, bits, built["m"], n, k, blocks, built["threads"], smem, mach,
                                ctas_per_sm=facts["ctas_per_sm"])
                row.update(machine="H100 SXM", model=model, layer=layer, kernel=key, tuning=built["tuning"])
                rows.append(row)
    return dict(kernels=kernels, rows=rows)


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}  (MODEL, not measured)")
    hdr = ("machine", "layer", "N", "K", "b", "M", "regs", "occ", "instr/w", "issue", "tensor", "HBM need",
           "KB infl", "KB need", "model %HBM", "limit")
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["machine"], r.get("model", "") + ":" + r.get("layer", ""), r["n"], r["k"], r["bits"], r["m"],
            r.get("registers", ""), r["occupancy"], r["instructions_per_weight"], r["issue_bound"],
            r["tensor_bound"], r["hbm_need"], r["inflight_kb"], r["inflight_needed_kb"],
            f"{100 * r['model_fraction_of_hbm']:.0f}", r["limited_by"])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "kernel_static.json"))
    ap.add_argument("--humming", action="store_true", help="also model Humming (installs humming-kernels apart)")
    ap.add_argument("--label", default="gsq", help="name of our kernel's entry in the JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = {"note": "STATIC MODEL from SASS, launch plans and machine constants; no GPU was run",
                  "assumptions": dict(issue_per_clk=ISSUE_PER_CLK, hmma_per_clk=HMMA_PER_CLK,
                                      latency_ns=LATENCY_NS, group_size=GROUP, machines=MACHINES),
                  "host": platform.node(), args.label: run_ours(tmp)}
        print_table(f"{args.label} (csrc/gsq_gemm.cu)", [r for r in result[args.label]["rows"]
                                                       if r["model"] == "llama3.1-8b" and r["m"] in (1, 16)])
        if args.humming:
            result["humming"] = run_humming(tmp)
            print_table(f"Humming {HUMMING_VERSION}", result["humming"]["rows"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(result, indent=1))
    os.replace(tmp_out, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

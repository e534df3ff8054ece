"""The static cost model's SASS reading (benchmarks/sass.py, benchmarks/kernel_static.py).

The model's numbers are a model; what is tested here is that it reads SASS
right: the hot loop, the paths through it, and our kernel's compiled loop
holding the tensor-core work the kernel's source says it does.
"""

import os
import sys
from pathlib import Path

import pytest

from benchmarks import sass

# An outer loop (0x10 .. 0xb0) around an inner one (0x20 .. 0x90) with a skippable block
# (0x50 .. 0x60), a nested copy loop (0x70 .. 0x80) and a divergence check leaving the loop.
SYNTHETIC = """
        Function : _Z4testv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0030*/                   LDS R5, [R6] ;
        /*0040*/               @P0 BRA 0x70 ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R7], desc[UR4][R8.64] ;
        /*0060*/                   LDGDEPBAR ;
        /*0070*/                   LOP3.LUT R9, R9, 0x3, RZ, 0xc0, !PT ;
        /*0080*/              @!P1 BRA 0x70 ;
        /*0088*/                   BRA.DIV UR7, 0xd0 ;
        /*0090*/              @!P2 BRA 0x20 ;
        /*00a0*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*00b0*/              @!P3 BRA 0x10 ;
        /*00c0*/                   EXIT ;
"""


def test_hot_loop_paths_on_synthetic_sass():
    (instrs,) = sass.parse_sass(SYNTHETIC).values()
    loop = sass.hot_loop(instrs)
    assert (loop.head, loop.tail) == (0x20, 0x90)  # the innermost loop with tensor ops, not the outer one
    # the copy block taken / skipped, the inner loop once, the divergence check (BRA.DIV) not taken
    assert loop.executed == 9 and loop.executed_min == 7
    assert loop.by_class["tensor"] == 1 and loop.by_class["global/async"] == 2
    assert loop.by_class["control"] == 4 and loop.by_class["shared"] == 1


def test_classes():
    assert sass.classify("HMMA.16816.F32.BF16") == "tensor"
    assert sass.classify("LDSM.16.M88.4") == "shared"
    assert sass.classify("LDGSTS.E.BYPASS.LTC128B.128") == "global/async"
    assert sass.classify("HFMA2.MMA") == "fp16/fp32 math"
    assert sass.classify("LOP3.LUT") == "integer/logic"
    assert sass.classify("BAR.SYNC.DEFER_BLOCKING") == "control"


@pytest.fixture(scope="module")
def sm90_cubin(tmp_path_factory):
    """csrc/gsq_gemm.cu for sm_90 as kernel_static.py builds it (with -lineinfo): (cubin, spills)."""
    try:
        sass.tool("nvcc"), sass.tool("cuobjdump"), sass.tool("nvdisasm")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from benchmarks import kernel_static

    return kernel_static.compile_ours("90", tmp_path_factory.mktemp("sm90"))


@pytest.fixture(scope="module")
def our_sm90(sm90_cubin):
    from benchmarks import kernel_static

    return kernel_static.analyze_cubin(*sm90_cubin, kernel_static.our_kernel_facts)


def test_our_compiled_hot_loop_holds_the_kernels_mma_work(our_sm90):
    assert len(our_sm90) == 64  # decode + prefill x 2 dtypes x 2 bit widths x 4 (CK, G) x 2 token tilings
    for name, k in our_sm90.items():
        # one trip: a warp's 16-row tiles (4 at decode, plus the correction mma; 1 at prefill) x CK / 16
        # k steps x MT token tiles
        mmas_per_step = 4 + 1 if k["kind"] == "decode" else 1
        per_stage = mmas_per_step * k["chunk_k"] // 16 * k["token_tiles"]
        assert k["hmma_per_trip"] == k["stages_per_trip"] * per_stage and k["stages_per_trip"] >= 1, name
        assert k["registers"] and k["spill_stores"] == 0 and k["stack"] == 0, name
        assert 0 < k["instructions_per_weight"] < 2, name


def test_model_hbm_need_matches_the_bandwidth_arithmetic():
    from benchmarks import kernel_static

    kern = dict(registers=64, instructions_per_weight=0.05, weights_per_hmma=256, stages=4,
                hbm_bytes_per_stage=8192, loop_instructions_min=1, weights_per_warp_per_trip=1)
    row = kernel_static.model_row(kern, 2, 1, 4096, 4096, 264, 128, 40000, kernel_static.MACHINES["H100 SXM"])
    # 3.35 TB/s / (2/8 + 2/128 bytes per weight) / (132 SMs x 1.75 GHz)
    assert row["hbm_need"] == pytest.approx(3.35e12 / (0.25 + 2 / 128) / (132 * 1.75e9), abs=0.1)
    assert row["issue_bound"] == pytest.approx(80.0) and row["tensor_bound"] == pytest.approx(128.0)



# ------------------------------------------------------------------ the whole kernel

# nvdisasm -gi text: a guarded entry, a 64-bit division (CALL to the helper, or the inline 32-bit arm), a
# loop left by a predicated CALL to a label (sm_80's idiom), a divergence branch, a converged-warp branch
# around a warpsync helper, and the helpers after the code.
SYNTHETIC_NV = """
//--------------------- .text._Z4testv --------------------------
        .section        .text._Z4testv,"ax",@progbits
.text._Z4testv:
        //## File "/x/k.cu", line 10
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x20, PT ;
        /*0020*/               @P0 EXIT ;
        //## File "/x/k.cu", line 11
        /*0030*/              @!P1 BRA `(.L_x_1) ;
        /*0040*/                   MOV R29, 0x60 ;
        /*0050*/                   CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64) ;
        /*0060*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*0070*/                   I2F.U32.RP R3, R4 ;
        /*0080*/                   MUFU.RCP R3, R3 ;
.L_x_2:
        //## File "/x/k.cu", line 2 inlined at "/x/k.cu", line 12
        //## File "/x/k.cu", line 12
        /*0090*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*00a0*/                   BRA.DIV UR4, `(.L_x_9) ;
        /*00b0*/              @P2 CALL.REL.NOINC `(.L_x_3) ;
        /*00c0*/                   BRA `(.L_x_2) ;
.L_x_3:
        //## File "/x/k.cu", line 13
        /*00d0*/                   BRA.CONV ~URZ, `(.L_x_4) ;
        /*00e0*/                   CALL.REL.NOINC `($__internal_1_$__cuda_sm70_warpsync) ;
.L_x_4:
        /*00f0*/                   STG.E [R2.64], R4 ;
        /*0100*/                   EXIT ;
.L_x_9:
        /*0110*/                   WARPSYNC R5 ;
        /*0120*/                   BRA `(.L_x_2) ;
        .weak           $__internal_0_$__cuda_sm20_div_s64
$__internal_0_$__cuda_sm20_div_s64:
        /*0130*/                   IMAD R1, R2, R3, RZ ;
        /*0140*/                   RET.REL.NODEC R20 `(_Z4testv) ;
"""


def test_nvdisasm_lines_and_warp_paths_on_synthetic_sass():
    (instrs,) = sass.parse_nvdisasm(SYNTHETIC_NV).values()
    assert len(instrs) == 21
    hmma = next(i for i in instrs if i.base == "HMMA")
    assert hmma.line == ("/x/k.cu", 12) and hmma.frames == (("/x/k.cu", 2), ("/x/k.cu", 12))
    from benchmarks import kernel_static

    cfg = sass.Cfg(instrs, avoid=kernel_static._division_slow_path)
    at = {b.addr: b.index for b in cfg.blocks}
    # the division's CALL arm, the divergence handler, the warpsync helper and the subroutine: unreachable
    assert {cfg.blocks[j].addr for j in cfg.reachable} == {0x0, 0x30, 0x70, 0x90, 0xB0, 0xC0, 0xD0, 0xF0}
    assert cfg.blocks[at[0xB0]].succ == [at[0xD0], at[0xC0]]  # the predicated CALL to a label is a branch
    assert cfg.blocks[at[0xD0]].succ == [at[0xF0]]  # BRA.CONV taken
    ((head, latch, body),) = cfg.loops()
    assert (cfg.blocks[head].addr, cfg.blocks[latch].addr) == (0x90, 0xC0) and len(body) == 3
    # entry -> exit: the guarded EXIT falls through, the 32-bit division arm, the loop once, the store
    total, path = cfg.path(0, at[0xF0])
    assert total == 3 + 1 + 2 + 2 + 1 + 1 + 2 and [cfg.blocks[j].addr for j in path] == [
        0x0, 0x30, 0x70, 0x90, 0xB0, 0xD0, 0xF0]
    assert cfg.path(0, at[0xF0], weight=lambda b: 0 if b.index in body else b.size)[0] == 3 + 1 + 2 + 1 + 2
    assert kernel_static._is_division_fast_path(cfg.blocks[at[0x70]])
    # without the avoid rule the 64-bit arm is the longer way
    assert sass.Cfg(instrs).path(0, at[0xF0])[0] == total + 1


def test_lineinfo_changes_no_instruction(sm90_cubin, tmp_path):
    """kernel_static.py builds with -lineinfo for the region analysis: the SASS must be the plain build's."""
    from benchmarks import kernel_static

    plain, _ = kernel_static.compile_ours("90", tmp_path, lineinfo=False)
    a, b = sass.sass_functions(sm90_cubin[0]), sass.sass_functions(plain)
    assert a.keys() == b.keys()
    for name in a:
        assert [(i.pred, i.op, i.args) for i in a[name]] == [(i.pred, i.op, i.args) for i in b[name]], name


@pytest.fixture(scope="module")
def sm90_regions(sm90_cubin):
    from benchmarks import kernel_static

    return kernel_static.our_decode_regions(sm90_cubin[0])


def test_decode_regions_from_sass(sm90_regions, our_sm90):
    """Every decode instantiation's regions found; the hot-loop trip is the loop-only model's."""
    assert len(sm90_regions) == 32
    loops = {name.split("(")[0].removeprefix("void "): k for name, k in our_sm90.items() if k["kind"] == "decode"}
    for name, r in sm90_regions.items():
        assert r["item"] == loops[name]["loop_instructions"], name
        # a segment is more than its bounds: it stores C or a partial, so never cheaper than 20 instructions
        assert 50 < r["prologue"] < 1000 and 20 < r["segment_full"] < 1000 and 20 < r["segment_partial"] < 1000
        assert r["reduce_unroll"] >= 1 and 10 < r["per_contributor"] < 500 and r["reduce_fixed"] > 0, name
        assert 1 <= r["reduce_batch"] <= r["reduce_unroll"], name
        assert r["tail"] >= 1 and 1 <= r["idle"] < 20, name
        assert r["tensor_ops_outside_hot_loop"] == 0, name
        # the per-source-region breakdown covers each path's instructions exactly
        for region in ("segment_full", "segment_partial", "prologue", "reduce_fixed"):
            assert sum(r["breakdown"][region].values()) == r[region], (name, region)


def test_decode_ring_depth_is_the_kernels():
    """decode_stages (re-derived) against the shared memory the host code launches each decode kernel with."""
    from benchmarks import kernel_static
    import torch

    from gsq_vllm import cuda_emu as ce

    emu = ce.default_emulator()
    seen = set()
    for bits, k, g, m, smem in [(2, 4096, 128, 1, 228), (3, 4096, 128, 1, 228), (2, 4096, 64, 16, 228),
                                (3, 4096, 64, 16, 164), (2, 576, 64, 1, 228), (3, 1024, 32, 12, 100),
                                (2, 4096, 128, 1, 100)]:
        a = torch.zeros(m, k, dtype=torch.float16)
        b = torch.zeros(1, k * 2 * bits, dtype=torch.int32)
        s = torch.zeros(1, k // g * 64, dtype=torch.float16)
        _, counters = emu.gemm(a, b, s, bits, g, 64, k, ce.EmuOptions(smem_per_sm=smem * 1024, dry_run=True))
        (launch,) = counters["launches"]
        facts = kernel_static.our_kernel_facts(launch["kernel"])
        stage = kernel_static.decode_stage_bytes(bits, facts["chunk_k"], g, facts["token_tiles"])
        assert launch["smem"] == launch["block"][0] // 32 * facts["stages"] * stage
        assert 3 <= facts["stages"] and facts["stages"] * stage <= 40 * 1024
        assert launch["block"][0] == (128 if smem >= 164 else 64)
        seen.add(facts["stages"])
    assert len(seen) >= 3


def test_decode_split_covers_the_items_once():
    from benchmarks import kernel_static

    for items, warps, chunks in [(27, 16, 9), (24, 16, 8), (2048, 2048, 32), (3072, 2112, 32), (7168, 1584, 32),
                                 (64, 4, 16), (5, 5, 1)]:
        split = kernel_static.decode_split(items, warps, chunks)
        assert len(split) == warps and sum(e - b for b, e, _ in split) == items
        assert [b for b, _, _ in split][1:] == [e for _, e, _ in split][:-1] and split[-1][1] == items
        for begin, end, segs in split:
            assert sum(se - sb for _, sb, se, _ in segs) == end - begin
            for rb, sb, se, whole in segs:
                assert rb * chunks <= sb < se <= (rb + 1) * chunks
                assert whole == (sb == rb * chunks and se == (rb + 1) * chunks)
        for rb in range(items // chunks):
            touching = [w for w, (b, e, _) in enumerate(split) if b < (rb + 1) * chunks and e > rb * chunks]
            first = kernel_static.owner_of(rb * chunks, items, warps)
            last = kernel_static.owner_of((rb + 1) * chunks - 1, items, warps)
            assert touching == list(range(first, last + 1))


def _plan(n, k, warps, grid_x=None):
    return dict(warps=warps, grid_x=grid_x or -(-warps // 4), token_tiles=1)


def test_whole_kernel_counts_every_region():
    from benchmarks import kernel_static

    reg = dict(item=300, prologue=200, tail=3, idle=8, segment_full=120, segment_partial=190, reduce_fixed=60,
               per_contributor=65.0)
    mach = kernel_static.MACHINES["H100 SXM"]
    n, k, ck = 4096, 4096, 128
    items, chunks = n // 64 * (k // ck), k // ck
    for warps in (2048, 2112, 1584, 1056, 512, 64):
        row = kernel_static.whole_kernel_row(reg, _plan(n, k, warps), n, k, 1, 2, 128, ck, mach)
        by = row["instructions_by_region"]
        assert row["instructions"] == sum(by.values())
        assert by["items"] == items * reg["item"] and by["prologue"] == warps * reg["prologue"]
        assert row["instructions"] >= items * reg["item"] + warps * (reg["prologue"] + reg["tail"])
        # segments: one per (warp, row block it touches); the split row blocks reduced once each
        split = kernel_static.decode_split(items, warps, chunks)
        segs = [s for _, _, ss in split for s in ss]
        assert by.get("segment_full", 0) + by.get("segment_partial", 0) == sum(
            reg["segment_full"] if s[3] else reg["segment_partial"] for s in segs)
        contributors = {}
        for w, (_, _, ss) in enumerate(split):
            for rb, _, _, whole in ss:
                if not whole:
                    contributors.setdefault(rb, set()).add(w)
        assert row["split_row_blocks"] == len(contributors)
        assert by.get("reduce", 0) == pytest.approx(sum(reg["reduce_fixed"] + len(c) * reg["per_contributor"]
                                                        for c in contributors.values()))
        # the reducer's serial chain: fence, arrival atomic, one load per contributor of the widest row block
        widest = max((len(c) for c in contributors.values()), default=0)
        assert row["max_contributors"] == widest
        assert row["reduction_chain_round_trips"] == (2 + widest if contributors else 0)
        assert row["instructions_per_weight"] == pytest.approx(row["instructions"] / (n * k), abs=1e-4)
        assert row["loop_instructions_per_weight"] == pytest.approx(reg["item"] / (64 * ck), abs=1e-4)


def test_whole_kernel_critical_path_and_distinct_bytes():
    from benchmarks import kernel_static

    reg = dict(item=300, prologue=200, tail=3, idle=8, segment_full=120, segment_partial=190, reduce_fixed=60,
               per_contributor=65.0)
    mach = kernel_static.MACHINES["H100 SXM"]
    l2 = kernel_static.L2_ROUND_TRIP_CYCLES
    # one item per warp, no split (chunks = 1): nothing past a range's end is fetched, so the one item is all a
    # warp has in flight, whatever the ring's depth
    for stages in (3, None):
        row = kernel_static.whole_kernel_row(reg, _plan(8448, 128, 132), 8448, 128, 1, 2, 128, 128, mach, stages)
        assert row["split_row_blocks"] == 0 and row["chain_cycles"] == 0
        assert row["distinct_inflight_kb_per_sm"] == pytest.approx(row["inflight_kb_per_sm"], abs=0.1)
        assert row["inflight_kb_per_sm"] == pytest.approx(4 * (2048 + 128) / 1024, abs=0.1)  # 4 warps an SM
    assert row["critical_path_cycles"] == max(row["issue_cycles"], row["hbm_cycles"]) + l2
    # 32 items over 16 warps of one row block: 16 contributors, one reducer chain
    row = kernel_static.whole_kernel_row(reg, _plan(64, 4096, 16), 64, 4096, 1, 2, 128, 128, mach)
    assert row["max_contributors"] == 16 and row["reduction_chain_round_trips"] == 18
    assert row["chain_cycles"] == 18 * l2 + int(reg["reduce_fixed"] + 16 * reg["per_contributor"])
    # the reduction loop's trip loading 4 contributors before its first add: 4 round trips for the 16
    batched = kernel_static.whole_kernel_row(dict(reg, reduce_batch=4), _plan(64, 4096, 16), 64, 4096, 1, 2, 128,
                                             128, mach)
    assert batched["reduction_chain_round_trips"] == 6
    assert batched["chain_cycles"] == 6 * l2 + int(reg["reduce_fixed"] + 16 * reg["per_contributor"])
    # two items a warp, a deeper ring: both in flight while it waits for the first, one for the second
    assert row["distinct_inflight_kb_per_sm"] == pytest.approx(row["inflight_kb_per_sm"] * 3 / 4, abs=0.1)
    # a range longer than the ring: ring - 1 items in flight but for its last ones
    row = kernel_static.whole_kernel_row(reg, _plan(64, 4096, 2), 64, 4096, 1, 2, 128, 128, mach, stages=5)
    per_warp = (2048 + 128) * (4 * 5 / 2 + 12 * 4) / 16  # 16 items: 4 + 3 + 2 + 1 at the end, 12 x 4 before
    assert row["distinct_inflight_kb_per_sm"] == pytest.approx(2 * per_warp / 1024, abs=0.1)


# the kernel's own split, logged by an instrumented copy of csrc/gemm/decode.cuh under the emulator
SPLIT_PROBES = [
    ("#pragma once\n", "#pragma once\n#include <cstdio>\n"),
    ("  const int begin = range_begin(gw, items, warps_total), end = range_begin(gw + 1, items, warps_total);\n",
     "  const int begin = range_begin(gw, items, warps_total), end = range_begin(gw + 1, items, warps_total);\n"
     "  if (lane == 0) std::fprintf(stderr, \"GSQ_RANGE %d %d %d\\n\", gw, begin, end);\n"),
    ("    const int seg_end = min(end, (rb + 1) * chunks);\n",
     "    const int seg_end = min(end, (rb + 1) * chunks);\n"
     "    if (lane == 0) std::fprintf(stderr, \"GSQ_SEGMENT %d %d %d %d\\n\", gw, rb, seg_begin, seg_end);\n"),
    ("    if (!arrive_last(counters + rb, last - first + 1, lane)) continue;\n",
     "    if (!arrive_last(counters + rb, last - first + 1, lane)) continue;\n"
     "    if (lane == 0) std::fprintf(stderr, \"GSQ_REDUCE %d %d %d %d\\n\", gw, rb, first, last);\n"),
]


def test_decode_split_is_the_kernels(tmp_path):
    """decode_split / owner_of (re-derived in Python) against what the kernel itself does, run by the
    emulator from a copy of csrc/ that logs each warp's range, its segments and each reduction."""
    import json
    import shutil
    import subprocess

    from benchmarks import kernel_static

    from gsq_vllm import cuda_emu as ce

    csrc = tmp_path / "csrc"
    shutil.copytree(Path(ce.CSRC), csrc)
    dec = csrc / "gemm" / "decode.cuh"
    src = dec.read_text()
    for old, new in SPLIT_PROBES:
        assert src.count(old) == 1, f"probe is stale (the kernel changed): {old!r}"
        src = src.replace(old, new)
    dec.write_text(src)
    lib = ce.build_library(out_dir=tmp_path / "lib", csrc=csrc,
                           cxxflags=[f for f in ce.CXXFLAGS if f not in ("-O2", "-g")] + ["-O1"])
    here = Path(__file__).parent
    res = subprocess.run([sys.executable, str(here / "decode_split_probe.py"), str(lib)], capture_output=True,
                         text=True, cwd=here, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    logs: dict[int, list[list[str]]] = {}
    case = None
    for line in res.stderr.splitlines():
        words = line.split()
        if words and words[0] == "GSQ_CASE":
            case = int(words[1])
            logs[case] = []
        elif words and words[0] in ("GSQ_RANGE", "GSQ_SEGMENT", "GSQ_REDUCE"):
            logs[case].append(words)
    cases = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert len(cases) == 5
    reduced_somewhere = False
    for c in cases:
        facts = kernel_static.our_kernel_facts(c["kernel"])
        warps, chunks = c["plan"]["warps"], c["k"] // facts["chunk_k"]
        items = c["n"] // 64 * chunks
        split = kernel_static.decode_split(items, warps, chunks)
        log = logs[c["case"]]
        assert {tuple(map(int, x[1:])) for x in log if x[0] == "GSQ_RANGE"} == {
            (w, b, e) for w, (b, e, _) in enumerate(split)}
        segments = [tuple(map(int, x[1:])) for x in log if x[0] == "GSQ_SEGMENT"]
        assert sorted(segments) == sorted(
            (w, rb, sb, se) for w, (_, _, segs) in enumerate(split) for rb, sb, se, _ in segs)
        # each split row block reduced once, by one of its contributors, over exactly the Python contributors
        contributors: dict[int, list[int]] = {}
        for w, (_, _, segs) in enumerate(split):
            for rb, _, _, whole in segs:
                if not whole:
                    contributors.setdefault(rb, []).append(w)
        reductions = {int(x[2]): (int(x[1]), int(x[3]), int(x[4])) for x in log if x[0] == "GSQ_REDUCE"}
        assert len([x for x in log if x[0] == "GSQ_REDUCE"]) == len(reductions)
        assert reductions.keys() == contributors.keys()
        for rb, (reducer, first, last) in reductions.items():
            assert list(range(first, last + 1)) == contributors[rb] and reducer in contributors[rb]
        reduced_somewhere |= bool(reductions)
        row = kernel_static.whole_kernel_row(dict(item=1, prologue=1, tail=1, idle=1, segment_full=1,
                                                  segment_partial=1, reduce_fixed=1, per_contributor=1),
                                             c["plan"], c["n"], c["k"], 1, 2, 64, facts["chunk_k"],
                                             kernel_static.MACHINES["H100 SXM"])
        assert row["split_row_blocks"] == len(reductions)
        assert row["max_contributors"] == max((b - a + 1 for _, a, b in reductions.values()), default=0)
    assert reduced_somewhere and not all(logs[c["case"]] and any(x[0] == "GSQ_REDUCE" for x in logs[c["case"]])
                                         for c in cases)


# ------------------------------------------------------------------ Humming's whole kernel

HUMMING_M8 = {"block_shape": [8, 128, 128], "warp_shape": [8, 64, 32], "use_stream_k": True, "num_stages": 4,
              "num_ctas_per_sm": 1}


def test_humming_schedule_covers_each_tile_once():
    from benchmarks import kernel_static

    for n, k, ctas in [(4096, 4096, 1), (6144, 4096, 1), (28672, 4096, 1), (4096, 14336, 1), (57344, 8192, 2),
                       (1024, 512, 1)]:
        tuning = dict(HUMMING_M8, num_ctas_per_sm=ctas)
        units = kernel_static.humming_schedule(n, k, tuning, 132)
        assert len(units) == 132 * ctas
        kb, tiles = k // 128, n // 128
        per_tile = {}
        for cta in units:
            for t, s in cta:
                per_tile[t] = per_tile.get(t, 0) + s
                assert 0 < s <= kb
        assert per_tile == {t: kb for t in range(tiles)}
        # a CTA's streamed range is contiguous: its slices after its whole tiles run in tile order
        for cta in units:
            streamed = [t for t, s in cta if s < kb] or [0]
            assert streamed == sorted(streamed)
    # every tile streamed when there are fewer tiles than CTAs; ranges a multiple of the stage count
    units = kernel_static.humming_schedule(4096, 4096, HUMMING_M8, 132)
    assert sorted({sum(s for _, s in cta) for cta in units}) == [0, 8]
    # 224 tiles: one data-parallel wave of 132, the other 92 tiles x 32 k blocks streamed in ranges of
    # ceil(92 * 32 / 132) = 23 -> 24 (4 stages)
    units = kernel_static.humming_schedule(28672, 4096, HUMMING_M8, 132)
    assert all(cta[0] == (c, 32) for c, cta in enumerate(units))
    assert {sum(s for _, s in cta[1:]) for cta in units} == {24, 92 * 32 - 24 * 122, 0}
    # 142 tiles: the last 10 (<= 1/10 of the grid) are merged with the whole wave: everything streamed
    units = kernel_static.humming_schedule(142 * 128, 4096, HUMMING_M8, 132)
    assert sum(s for cta in units for _, s in cta) == 142 * 32 and all(
        sum(s for _, s in cta) in (36, 142 * 32 - 36 * 126, 0) for cta in units)


def _humming_site():
    from benchmarks import kernel_static

    site = Path(os.environ.get("GSQ_HUMMING_SITE", Path.home() / ".cache" / "gsq-vllm" /
                               f"humming-{kernel_static.HUMMING_VERSION}"))
    if not (site / "humming").exists():
        pytest.skip("humming-kernels not installed apart (kernel_static.py --humming installs it)")
    return site


def test_humming_regions_and_lineinfo(tmp_path):
    """Humming's kernel as kernel_static.py builds it (-lineinfo) has the plain build's SASS; its regions:
    the hot loop is the loop-only reading's, the tail holds stages_per_trip - 1 stages."""
    _humming_site()
    from benchmarks import kernel_static

    with_lines = kernel_static.humming_cubins(2, 4096, 4096, [1], tmp_path / "a")
    plain = kernel_static.humming_cubins(2, 4096, 4096, [1], tmp_path / "b", lineinfo=False)
    a = sass.sass_functions(Path(with_lines[0]["cubin"]))
    b = sass.sass_functions(Path(plain[0]["cubin"]))
    assert [[(i.pred, i.op, i.args) for i in v] for v in a.values()] == [
        [(i.pred, i.op, i.args) for i in v] for v in b.values()]
    built = with_lines[0]
    facts = kernel_static.humming_facts(built["tuning"], 2, built["threads"])
    (kern,) = kernel_static.analyze_cubin(Path(built["cubin"]), {},
                                          lambda name: facts if "humming" in name else {}).values()
    (instrs,) = [v for name, v in sass.nvdisasm_functions(Path(built["cubin"])).items() if "humming" in name]
    reg = kernel_static.humming_regions(instrs, kern["stages_per_trip"])
    assert reg["item"] == kern["loop_instructions"]
    assert reg["tail_stages_in_sass"] == kern["stages_per_trip"] - 1
    assert 0 < reg["unit_fixed_min"] <= reg["unit_fixed_max"] and reg["prologue"] > 0 and reg["exit"] > 0
    assert reg["tensor_ops_outside_loops"] == 0
    row = kernel_static.humming_whole_row(reg, kern, built["tuning"], 4096, 4096, 1, 2,
                                          kernel_static.MACHINES["H100 SXM"])
    by = row["instructions_by_region"]
    assert row["instructions"] == sum(by.values()) and by["items"] > 0
    assert row["instructions_per_weight"] > row["loop_instructions_per_weight"]


def test_what_if_designs_change_only_what_they_say():
    from benchmarks import kernel_static

    reg = dict(item=338, prologue=222, tail=3, idle=8, segment_full=127, segment_partial=195, reduce_fixed=64,
               per_contributor=64.75, division_fast_path_instructions=19.0,
               divisions_64=dict(prologue=3, segment_full=1, segment_partial=3, per_contributor=1.0))
    mach = kernel_static.MACHINES["H100 SXM"]
    plan = _plan(4096, 4096, 2048)
    rows = kernel_static.what_if_rows(reg, plan, 4096, 4096, 1, 2, 128, 128, mach)
    assert rows["now"] == kernel_static.whole_kernel_row(reg, plan, 4096, 4096, 1, 2, 128, 128, mach)
    fewer, tree, lean = rows["fewer warps"], rows["+ tree reduction"], rows["+ no 64-bit division"]
    assert fewer["warps"] == 256 and fewer["max_items_per_warp"] == 8 and fewer["met"]["distinct_inflight"]
    assert tree["instructions"] == fewer["instructions"] and tree["chain_cycles"] < fewer["chain_cycles"]
    by = tree["instructions_by_region"]
    partial, full = by.get("segment_partial", 0) / 195, by.get("segment_full", 0) / 127
    contributions = (by["reduce"] - tree["split_row_blocks"] * 64) / 64.75
    removed = 19 * (3 * tree["warps"] + 3 * partial + 1 * full + 1 * contributions)
    assert lean["instructions"] == pytest.approx(tree["instructions"] - removed, abs=2)

"""The static cost model's SASS reading (benchmarks/sass.py, benchmarks/kernel_static.py).

The model's numbers are a model; what is tested here is that it reads SASS
right: the hot loop, the paths through it, and our kernel's compiled loop
holding the tensor-core work the kernel's source says it does.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sass  # noqa: E402

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
def our_sm90(tmp_path_factory):
    try:
        sass.tool("nvcc"), sass.tool("cuobjdump")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    import kernel_static

    cubin, spills = kernel_static.compile_ours("90", tmp_path_factory.mktemp("sm90"))
    return kernel_static.analyze_cubin(cubin, spills, kernel_static.our_kernel_facts)


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
    import kernel_static

    kern = dict(registers=64, instructions_per_weight=0.05, weights_per_hmma=256, stages=4,
                hbm_bytes_per_stage=8192, loop_instructions_min=1, weights_per_warp_per_trip=1)
    row = kernel_static.model_row(kern, 2, 1, 4096, 4096, 264, 128, 40000, kernel_static.MACHINES["H100 SXM"])
    # 3.35 TB/s / (2/8 + 2/128 bytes per weight) / (132 SMs x 1.75 GHz)
    assert row["hbm_need"] == pytest.approx(3.35e12 / (0.25 + 2 / 128) / (132 * 1.75e9), abs=0.1)
    assert row["issue_bound"] == pytest.approx(80.0) and row["tensor_bound"] == pytest.approx(128.0)

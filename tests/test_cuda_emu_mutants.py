"""A harness that passes a broken kernel is worse than none: break the kernel, watch the emulator fail it.

Each mutant is a copy of csrc/ with one deliberate bug in one file (every
replaced snippet must occur exactly once, so a kernel change that makes a
mutant stale fails here and the mutant gets rewritten, not silently
skipped). Each is built into its own emulator library and run, in a
subprocess with a time limit, on cases chosen to reach every code path
(tests/emu_mutant_run.py: both kernels, 2/3-bit, fp16/bf16, every K chunk
and group size, split row blocks with warp boundaries inside items, uneven
prefill splits, rows past M, all three schedules); it is caught when any
case raises (a fault, a memory-order race, ...), leaves NaN, breaks the
float64 bound or leaves a split-K counter non-zero. The unmodified tree
must pass the same cases.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gsq_vllm import cuda_emu as ce

HERE = Path(__file__).parent

# name -> (file under csrc/, [(old, new), ...])
MUTANTS = {
    "swapped A fragment registers": ("gemm/layout.cuh", [(
        "    a[0] = magic_pair<T, BITS, 4 * S>(w), a[1] = magic_pair<T, BITS, 4 * S + 1>(w);\n"
        "    a[2] = magic_pair<T, BITS, 4 * S + 2>(w), a[3] = magic_pair<T, BITS, 4 * S + 3>(w);",
        "    a[0] = magic_pair<T, BITS, 4 * S>(w), a[2] = magic_pair<T, BITS, 4 * S + 1>(w);\n"
        "    a[1] = magic_pair<T, BITS, 4 * S + 2>(w), a[3] = magic_pair<T, BITS, 4 * S + 3>(w);")]),
    "swapped B fragment registers": ("gemm/decode.cuh", [(
        "b[s][0][0] = r[0], b[s][0][1] = r[1], b[s + 1][0][0] = r[2]",
        "b[s][0][0] = r[1], b[s][0][1] = r[0], b[s + 1][0][0] = r[2]")]),
    "dropped cp.async wait": ("gemm/prefill.cuh", [("    ptx::cp_async_wait<kPrefillStages - 2>();\n", "")]),
    "dropped barrier": ("gemm/prefill.cuh", [("    __syncthreads();  // chunk", "    // chunk")]),
    "prefetch one stage too far": ("gemm/prefill.cuh", [("const int nxt = it + kPrefillStages - 1;",
                                                         "const int nxt = it + kPrefillStages;")]),
    "3-bit spare pair bit from the wrong word": ("gemm/layout.cuh", [(
        "shift_by<j + 1 - 15>(w[w0 + 1])", "shift_by<j + 1 - 15>(w[w0 + 2])")]),
    "wrong scale column": ("gemm/decode.cuh", [("add_scaled<T, MT>(acc[tile], p, scales[gi * 32 + tile]);",
                                                "add_scaled<T, MT>(acc[tile], p, scales[gi * 32 + (tile ^ 1)]);")]),
    "no zero-fill for rows past M": ("gemm/prefill.cuh", [("(valid ? token : 0)", "token"),
                                                          ("valid ? 16 : 0", "16")]),
    "split end past the next split's start": ("gemm/prefill.cuh", [(
        "const int c_end = (int)((long long)chunks * (split + 1) / splits);",
        "const int c_end = min(chunks, (int)((long long)chunks * (split + 1) / splits) + 1);")]),
    "unclamped decode prefetch": ("gemm/decode.cuh", [("      if (item + kStages - 1 < end)  // no prefetch",
                                                       "      if (true)  // no prefetch")]),
    "unclamped decode prologue": ("gemm/decode.cuh", [("    if (begin + st < end)  // nothing past",
                                                       "    if (true)  // nothing past")]),
    "decode waits one group short": ("gemm/decode.cuh", [("      ptx::cp_async_wait<kStages - 2>();",
                                                          "      ptx::cp_async_wait<kStages - 1>();")]),
    "decode ring read without __syncwarp": ("gemm/decode.cuh", [("      __syncwarp();  // item's pieces", "      // item's pieces")]),
    "decode ring refills the stage being read": ("gemm/decode.cuh", [(
        "const int refill = stage == 0 ? kStages - 1 : stage - 1;", "const int refill = stage;")]),
    "wrong code offset": ("gemm/layout.cuh", [("Fmt<T>::magic(j) | ((1u << (BITS - 1)) << j)",
                                               "Fmt<T>::magic(j) | ((1u << (BITS - 1)) << j) | (1u << j)")]),
    "tile sums miss the correction": ("gemm/decode.cuh", [("F::mma_cd(p[mt], a, b[s][mt], corr[mt]);",
                                                           "F::mma_c0(p[mt], a, b[s][mt]);")]),
    "reducer skips the last contributor": ("gemm/decode.cuh", [("for (int w = first; w <= last; ++w)",
                                                                "for (int w = first; w < last; ++w)")]),
    "reducer reads the first contributor's other slot": ("gemm/decode.cuh", [(
        "< rb * chunks ? 1 : 0);", "< rb * chunks ? 0 : 1);")]),
    # right wherever a block has kDecodeWarps warps, wrong where shared memory is short (sm_86/89)
    "warp index assumes four warps a block": ("gemm/decode.cuh", [(
        "const int gw = blockIdx.x * (blockDim.x / 32) + warp;", "const int gw = blockIdx.x * kDecodeWarps + warp;")]),
    "split-K counter not reset": ("gemm/reduce.cuh", [("    if (lane == 0) atomicExch(counter, 0);", "")]),
    "rows past M stored": ("gemm/decode.cuh", [("        if (token < M) C[(size_t)token * N + row]",
                                                "        C[(size_t)token * N + row]")]),
    "one slot for both partial segments": ("gemm/decode.cuh", [(
        "const int slot = 2 * gw + (seg_begin == begin ? 0 : 1);", "const int slot = 2 * gw;")]),
    # memory order: each of these still computes the right sums on a CPU; only the emulator's
    # PTX memory-model checks (docs/EMULATOR.md, "Memory order") can fail them
    "split-K writer without its fence": ("gemm/reduce.cuh", [(
        "  __threadfence();  // this lane's partial is visible device-wide before the count moves\n", "")]),
    "split-K reader without its fence": ("gemm/reduce.cuh", [(
        "    __threadfence();  // the others' partials, after their counts\n", "")]),
    "arrival atomic without __syncwarp": ("gemm/reduce.cuh", [("  __syncwarp();\n  int old = 0;", "  int old = 0;")]),
    # right wherever every warp boundary is a whole item (items % warps == 0), wrong elsewhere
    "owner_of off by one": ("gemm/decode.cuh", [(
        "return (int)(((unsigned)i * (unsigned)warps + (unsigned)warps - 1u) / (unsigned)items);",
        "return (int)((unsigned)i * (unsigned)warps / (unsigned)items);")]),
    "uneven prefill splits lose the remainder": ("gemm/prefill.cuh", [(
        "  const int c_begin = (int)((long long)chunks * split / splits);\n"
        "  const int c_end = (int)((long long)chunks * (split + 1) / splits);",
        "  const int c_begin = chunks / splits * split;\n"
        "  const int c_end = chunks / splits * (split + 1);")]),
}

TIME_LIMIT_S = 120
# Mutants and the unmodified tree alike: -O1 without debug info compiles in half the time of the
# default -O2 -g (13 s against 23 s a library on 2 cores) and runs the cases as fast (torch-bound).
MUTANT_CXXFLAGS = [f for f in ce.CXXFLAGS if f not in ("-O2", "-g")] + ["-O1"]


def _mutate(src: str, edits) -> str:
    for old, new in edits:
        assert src.count(old) == 1, f"mutant is stale: {old!r} occurs {src.count(old)} times"
        src = src.replace(old, new)
    return src


def _build(name: str, mutant, root: Path) -> Path:
    """A copy of csrc/ with the mutant's edits, built into its own emulator library."""
    d = root / name.replace(" ", "_").replace("'", "")
    shutil.copytree(ce.CSRC, d / "csrc", ignore=shutil.ignore_patterns("cpu"))
    if mutant is not None:
        path, edits = mutant
        f = d / "csrc" / path
        f.write_text(_mutate(f.read_text(), edits))
    return ce.build_library(out_dir=d, csrc=d / "csrc", cxxflags=MUTANT_CXXFLAGS)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every mutant's library (and the unmodified tree's), built two at a time."""
    root = tmp_path_factory.mktemp("mutants")
    jobs = {"unmodified": None} | MUTANTS
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_build, name, m, root) for name, m in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def _verdict(lib: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        res = subprocess.run([sys.executable, "-m", "emu_mutant_run", str(lib)], capture_output=True, text=True,
                             timeout=TIME_LIMIT_S, env=env, cwd=HERE)
    except subprocess.TimeoutExpired:
        return {"caught": True, "how": f"hung for {TIME_LIMIT_S} s"}
    if res.returncode != 0:
        return {"caught": True, "how": f"process died ({res.returncode}): {res.stderr[-500:]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_unmodified_kernel_passes_the_mutant_cases(built):
    v = _verdict(built["unmodified"])
    assert not v["caught"], v["how"]


@pytest.mark.parametrize("name", list(MUTANTS))
def test_mutant_is_caught(built, name):
    v = _verdict(built[name])
    assert v["caught"], f"the emulator passed a kernel with '{name}'"


def test_at_least_eight_mutants():
    assert len(MUTANTS) >= 8

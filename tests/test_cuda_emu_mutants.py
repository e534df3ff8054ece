"""A harness that passes a broken kernel is worse than none: break the kernel, watch the emulator fail it.

Each mutant is a copy of csrc/gsq_gemm.cu with one deliberate bug (every
replaced snippet must occur exactly once, so a kernel change that makes a
mutant stale fails here and the mutant gets rewritten, not silently
skipped). Each is built into its own emulator library and run, in a
subprocess with a time limit, on a few cases chosen to reach every code
path (2/3-bit, fp16/bf16, partial row blocks, an uneven split-K plan, all
three schedules); it is caught when any case raises, leaves NaN, or breaks
the float64 bound. The unmodified kernel must pass the same cases.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gsq_vllm import cuda_emu as ce

HERE = Path(__file__).parent

MUTANTS = {
    "swapped A fragment registers": [(
        "      afrag[1] = *reinterpret_cast<const uint32_t*>(r1);\n"
        "      afrag[2] = *reinterpret_cast<const uint32_t*>(r0 + 8);",
        "      afrag[2] = *reinterpret_cast<const uint32_t*>(r1);\n"
        "      afrag[1] = *reinterpret_cast<const uint32_t*>(r0 + 8);")],
    "swapped B fragment registers": [("bfrag[j][p % 2] = ", "bfrag[j][1 - p % 2] = ")],
    "dropped cp.async wait": [("    ptx::cp_async_wait<kStages - 2>();\n", "")],
    "dropped barrier": [("    __syncthreads();  // stage", "    // stage")],
    "prefetch one stage too far": [("const int nxt = it + kStages - 1;", "const int nxt = it + kStages;")],
    "3-bit plane off by one": [("(w[2] >> (8 * h + p))", "(w[2] >> (8 * h + p + 1))")],
    "wrong scale column": [("        sc.x = sv[j];\n        sc.y = sv[j];",
                            "        sc.x = sv[(j + 1) % 8];\n        sc.y = sv[(j + 1) % 8];")],
    "no zero-fill for rows past M": [("(valid ? grow : 0)", "grow"), ("valid ? 16 : 0", "16")],
    "unclamped split end": [("const int kt_end = min(kt_begin + k_tiles_per_split, k_tiles);",
                             "const int kt_end = kt_begin + k_tiles_per_split;")],
    "wrong 3-bit code offset": [("kOffset = BITS == 3 ? 4u : 2u", "kOffset = BITS == 3 ? 3u : 2u")],
    "reduction drops the +8 rows": [("atomicAdd(&red[(row + 8) * kTileN + col], acc[mt][j][2]);",
                                     "atomicAdd(&red[row * kTileN + col], acc[mt][j][2]);")],
    "split-K workspace not zeroed": [("cudaMemsetAsync(ws, 0, plan.workspace_bytes, stream)", "cudaSuccess")],
    "rows past M stored": [("    if (grow >= M) continue;\n", "")],
}

TIME_LIMIT_S = 120


def _mutate(src: str, edits) -> str:
    for old, new in edits:
        assert src.count(old) == 1, f"mutant is stale: {old!r} occurs {src.count(old)} times in gsq_gemm.cu"
        src = src.replace(old, new)
    return src


def _build(name: str, edits, root: Path) -> Path:
    d = root / name.replace(" ", "_")
    d.mkdir()
    (d / "gsq_gemm.cu").write_text(_mutate(ce.KERNEL_SOURCE.read_text(), edits))
    return ce.build_library(d / "gsq_gemm.cu", d)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every mutant's library (and the unmodified kernel's), built two at a time."""
    root = tmp_path_factory.mktemp("mutants")
    jobs = {"unmodified": []} | MUTANTS
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_build, name, edits, root) for name, edits in jobs.items()}
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

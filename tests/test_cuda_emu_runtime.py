"""The emulator itself: its 16-bit arithmetic, its instructions, and the mistakes it must report.

Probe kernels (tests/cuda_emu/probes.cu) run through the same C API as the
real GEMM; each either uses an instruction the way the PTX ISA documents it
or makes one mistake that must come back as an error naming the source line
(or as poisoned NaN output, for data read before its cp.async landed).
"""

import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from gsq_vllm import cuda_emu as ce

PROBES = Path(__file__).parent / "cuda_emu" / "probes.cu"


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    return ce.Emulator(ce.build_library(PROBES, tmp_path_factory.mktemp("probes")))


def _line_of(text: str) -> int:
    lines = PROBES.read_text().splitlines()
    hits = [i + 1 for i, ln in enumerate(lines) if text in ln]
    assert len(hits) == 1, text
    return hits[0]


def _run(emu, probe, a, n, order="forward"):
    dummy = torch.zeros(16, dtype=torch.int32)
    return emu.gemm(a, dummy, dummy.half(), probe, 64, n, a.shape[1], ce.EmuOptions(order=order))[0]


# ------------------------------------------------------------------ mistakes


def test_read_past_the_end_faults_with_the_source_line(probes):
    a = torch.ones(1, 64, dtype=torch.float16)
    with pytest.raises(ce.EmulatorError) as e:
        _run(probes, 1, a, 32)
    msg = str(e.value)
    assert f"probes.cu:{_line_of('c[threadIdx.x] = a[count + threadIdx.x];')}" in msg, msg
    assert "bytes past the end of buffer A (128 bytes)" in msg, msg


def test_store_into_an_input_faults(probes):
    with pytest.raises(ce.EmulatorError, match=r"probes.cu:\d+.*byte 0 of buffer A"):
        _run(probes, 5, torch.ones(1, 64, dtype=torch.float16), 32)


def test_divergent_barrier_is_reported(probes):
    with pytest.raises(ce.EmulatorError, match=r"divergent __syncthreads.*probes.cu:\d+.*probes.cu:\d+"):
        _run(probes, 2, torch.ones(1, 64, dtype=torch.float16), 64)


def test_collective_with_an_exited_lane_deadlocks(probes):
    with pytest.raises(ce.EmulatorError, match="deadlock") as e:
        _run(probes, 4, torch.ones(1, 64, dtype=torch.float16), 64)
    assert "62 thread(s) 1-31,33-63 at mma probes.cu:" in str(e.value) and "2 thread(s) 0,32 exited" in str(e.value)


@pytest.mark.parametrize("order", ce.ORDERS)
def test_data_read_before_its_wait_is_poison(probes, order):
    a = torch.arange(256, dtype=torch.float16)
    waited = _run(probes, 3, a.view(256, 1), 1, order).view(32, 8)
    assert torch.equal(waited, a.view(32, 8).roll(-1, 0))  # thread t got row t + 1
    unwaited = _run(probes, 3, a.view(128, 2), 2, order)
    assert torch.isnan(unwaited).all()


def test_misaligned_cp_async_is_reported(probes):
    with pytest.raises(ce.EmulatorError, match=r"cp.async at probes.cu:\d+.*source not aligned"):
        _run(probes, 8, torch.ones(1, 64, dtype=torch.float16), 32)


# ------------------------------------------------------------------ memory order


def _message_passing(emu, variant, order="forward"):
    """Probe 9 (split-K's arrival in miniature); returns the last block's sums [32 lanes, 4]."""
    c = emu.gemm(torch.zeros(1, variant + 1, dtype=torch.float16), torch.zeros(16, dtype=torch.int32),
                 torch.zeros(16, dtype=torch.float16), 9, 64, 1024, variant + 1, ce.EmuOptions(order=order))[0]
    return c.view(torch.uint8)[0, 1536:].view(torch.float32).view(32, 4)


@pytest.mark.parametrize("variant", [0, 8, 10])
@pytest.mark.parametrize("order", ce.ORDERS)
def test_fence_atomic_fence_orders_the_partials(probes, order, variant):
    """Writer: store, fence, __syncwarp, atomic (0, 10), or store, __syncwarp, fence and atomic in
    lane 0 only (8); reader: atomic, fence, ld.global.cg (or cp.async: 10). Lanes 1-31 are released
    by lane 0's atomic through the barrier and learn the count through __shfl_sync."""
    s = _message_passing(probes, variant, order)
    want = torch.stack([torch.full((32,), 3.0), 2.0 * torch.arange(32), torch.zeros(32), torch.full((32,), 2.0)], 1)
    assert torch.equal(s, want)


@pytest.mark.parametrize("variant,why", [
    (1, "the writer executed no fence (__threadfence) between the store and an atomic that releases it"),
    (2, "the writer executed a fence after the store (at probes.cu:{fence}), but no atomic released it"),
    (3, "this thread's atomic observed the writer's release, but it executed no fence"),
    (4, "released through the atomic at probes.cu:{atomic}"),
    (9, "this thread's atomic observed the writer's release, but it executed no fence"),
])
@pytest.mark.parametrize("order", ce.ORDERS)
def test_a_broken_release_acquire_sequence_is_a_race(probes, variant, why, order):
    if variant == 4 and order != "forward":
        pytest.skip("block 1 must run after block 0's atomic")  # reverse: it reads before block 0 stores
    with pytest.raises(ce.EmulatorError, match="memory-order race") as e:
        _message_passing(probes, variant, order)
    msg = str(e.value)
    lines = dict(fence=_line_of("if (variant != 1) __threadfence();"),
                 atomic=_line_of("if (lane == 0 && !(variant == 4 && w == 1)) old = atomicAdd(counter, 1);"))
    assert why.format(**lines) in msg, msg
    insn, text = ("cp.async", "the reader's copy") if variant == 9 else ("ld.global.cg", "the reader's load")
    assert f"loads it ({insn} at probes.cu:{_line_of(text)})" in msg, msg
    assert f"probes.cu:{_line_of('part[32 * w + lane] = make_float4')}" in msg, msg  # the store's line


def test_unordered_stores_race(probes):
    with pytest.raises(ce.EmulatorError, match="two stores neither of which is ordered") as e:
        _message_passing(probes, 7)
    msg = str(e.value)
    assert "block (1,0,0) thread 0 (warp 0 lane 0) stores to it at " in msg, msg
    assert msg.count(f"probes.cu:{_line_of('unordered stores')} ") == 2, msg  # both stores, same line


@pytest.mark.parametrize("variant,text", [(5, "plain scalar store"), (6, "plain scalar load")])
def test_plain_access_to_written_memory_is_refused(probes, variant, text):
    """C, the workspace and the counters are closed to plain accesses during a launch: one the
    emulator cannot see (a scalar store, any plain load) faults instead of escaping the checks."""
    with pytest.raises(ce.EmulatorError, match="does not intercept") as e:
        _message_passing(probes, variant)
    assert f"probes.cu:{_line_of(text)}" in str(e.value), str(e.value)


def test_store_past_the_end_of_written_memory_is_reported(probes):
    with pytest.raises(ce.EmulatorError) as e:
        _message_passing(probes, 11)
    msg = str(e.value)
    assert f"probes.cu:{_line_of('store past the end')}" in msg, msg
    assert "a 2-byte store at 0 bytes past the end of buffer C (2048 bytes)" in msg, msg


# ------------------------------------------------------------------ instructions


def test_mma_computes_a_times_b(probes):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).half()
    b = torch.randn(8, 16, generator=gen).half()  # row n = column n of the B operand
    c = _run(probes, 6, torch.cat([a, b]), 8)  # [24, 8]: D is the first 16 rows
    ref = (a.double() @ b.double().t()).float().half()
    assert torch.allclose(c[:16].float(), ref.float(), rtol=2**-10, atol=0)


def test_ldmatrix_x4_gives_each_lane_its_row_pair(probes):
    a = torch.arange(256, dtype=torch.float16).view(32, 8)  # 4 matrices of 8 rows
    c = _run(probes, 7, a, 8).view(32, 4, 2)
    for lane in range(32):
        for m in range(4):
            row, col = lane // 4, 2 * (lane % 4)
            assert c[lane, m].tolist() == a[8 * m + row, col : col + 2].tolist()


# ------------------------------------------------------------------ 16-bit arithmetic

FORMATS = {False: (10, 5), True: (7, 8)}  # (mantissa bits, exponent bits): binary16, bfloat16


def _value(bits16, bf16):
    mb, eb = FORMATS[bf16]
    sign = -1 if bits16 >> 15 else 1
    e, m = (bits16 >> mb) & ((1 << eb) - 1), bits16 & ((1 << mb) - 1)
    bias = (1 << (eb - 1)) - 1
    if e == (1 << eb) - 1:
        return None  # inf / nan: not exercised here
    if e == 0:
        return sign * Fraction(m, 1 << (mb + bias - 1))
    return sign * Fraction(m + (1 << mb)) * Fraction(2) ** (e - bias - mb)


def _round(x: Fraction, bf16) -> int:
    """Exact round-to-nearest-even of a rational into the format (independent of the C++ code)."""
    mb, eb = FORMATS[bf16]
    bias = (1 << (eb - 1)) - 1
    sign = 0x8000 if x < 0 else 0
    x = abs(x)
    if x == 0:
        return sign
    e = max(x.numerator.bit_length() - x.denominator.bit_length() + 1, 2 - bias)
    while e > 1 - bias and x < Fraction(2) ** (e - 1):
        e -= 1
    while x >= Fraction(2) ** e:
        e += 1
    e -= 1  # now 2^e <= x < 2^(e+1), or the subnormal range
    e = max(e, 1 - bias)
    q = x / Fraction(2) ** (e - mb)
    n = q.numerator // q.denominator
    rem = q - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2):
        n += 1
    bits = n if (e == 1 - bias and n < (1 << mb)) else ((e + bias) << mb) + n - (1 << mb)
    if bits >= ((1 << eb) - 1) << mb:
        return sign | (((1 << eb) - 1) << mb)
    return sign | bits


@pytest.mark.parametrize("bf16", [False, True])
def test_16bit_arithmetic_is_correctly_rounded(probes, bf16):
    rng = random.Random(1 if bf16 else 0)
    mb, eb = FORMATS[bf16]
    finite = lambda: rng.choice([rng.randrange(0, 0x7C00 if not bf16 else 0x7F80),  # noqa: E731
                                 rng.randrange(0, 1 << (mb + 2))]) | rng.choice([0, 0x8000])
    for _ in range(3000):
        a, b, c = finite(), finite(), finite()
        va, vb, vc = _value(a, bf16), _value(b, bf16), _value(c, bf16)
        for op, exact in (("mul", va * vb), ("add", va + vb), ("sub", va - vb), ("fma", va * vb + vc)):
            got = probes.half_op(op, a, b, c, bf16=bf16)
            want = _round(exact, bf16)
            if exact == 0:  # sign of an exact zero follows IEEE rules; compare magnitude only
                got, want = got & 0x7FFF, want & 0x7FFF
            assert got == want, f"{op}({a:#06x}, {b:#06x}, {c:#06x}) bf16={bf16}: {got:#06x} != {want:#06x}"
    for _ in range(3000):  # float32 -> 16 bit, including values near ties and the subnormal range
        x = float(torch.tensor(rng.uniform(-1, 1) * 2.0 ** rng.randint(-30 if not bf16 else -130, 17)).float())
        assert probes.half_op("float2half", x=x, bf16=bf16) == _round(Fraction(x), bf16), x
    want = torch.tensor([65520.0]).half().view(torch.int16).item() & 0xFFFF  # rounds to inf in fp16
    assert probes.half_op("float2half", x=65520.0) == want == 0x7C00

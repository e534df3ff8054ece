"""The real CUDA GEMM source (csrc/gsq_gemm.cu) run under the CPU emulator.

The matrix covers bits 2 / 3 / 1.58 x fp16 / bf16 x G 32 / 64 / 128 x M in
{1, 2, 3, 8, 15, 16, 17, 32, 33, 64, 65, 256} (decode kernel up to 16,
prefill kernel above); each case takes one (N, K, SM count, schedule) from a
rotation, so every shape, K chunk (64 and 128), split-K plan (row blocks
split unevenly between warps, prefill splits of unequal length), schedule
order and resident-block count appears across the matrix. The output buffer
is poisoned (NaN) before each run and every element must lie within the
fp32-accumulation bound of float64.
"""

import itertools

import pytest
import torch

from emu_util import check_against_float64, random_activations, random_layer
from gsq_vllm import cuda_emu as ce
from gsq_vllm.cuda_gemm import chunk_k
from gsq_format.format import storage_bits

MS = [1, 2, 3, 8, 15, 16, 17, 32, 33, 64, 65, 256]
# (N, K, sms): K in 64-row k tiles; small SM counts force split-K plans, several uneven
ROTATION = {
    32: [(64, 384, 132), (128, 576, 5), (256, 256, 3), (192, 1024, 7), (64, 1152, 2), (128, 640, 8)],
    64: [(128, 576, 5), (64, 384, 132), (192, 1024, 7), (256, 256, 3), (128, 576, 8), (64, 1152, 2)],
    128: [(192, 1024, 7), (64, 384, 132), (128, 640, 4), (256, 256, 3), (64, 1152, 5), (128, 768, 1)],
}
SCHEDULES = [("forward", 1), ("reverse", 2), ("random", 1), ("random", 3)]  # (order, resident blocks)

CASES = []
for i, (bits, dtype, g, m) in enumerate(
    itertools.product([2, 3, 1.58], [torch.float16, torch.bfloat16], [32, 64, 128], MS)
):
    n, k, sms = ROTATION[g][i % len(ROTATION[g])]
    order, resident = SCHEDULES[(i // len(ROTATION[g])) % len(SCHEDULES)]
    CASES.append(pytest.param(bits, dtype, g, m, n, k, sms, order, resident, i,
                              id=f"{bits}b-{str(dtype)[6:]}-G{g}-M{m}-N{n}-K{k}-sm{sms}-{order}{resident}"))


@pytest.fixture(scope="module")
def emu():
    return ce.default_emulator()


@pytest.mark.parametrize("bits,dtype,g,m,n,k,sms,order,resident,seed", CASES)
def test_kernel_matches_float64(emu, bits, dtype, g, m, n, k, sms, order, resident, seed):
    w_t, b_r, s_r = random_layer(n, k, bits, g, dtype, seed)
    a = random_activations(m, k, dtype, seed)
    opts = ce.EmuOptions(sms=sms, order=order, seed=seed, resident_blocks=resident)
    c, stats = emu.gemm(a, b_r, s_r, storage_bits(bits), g, n, k, opts)
    assert c.shape == (m, n) and c.dtype == dtype
    plan = emu.plan(m, n, k, storage_bits(bits), g, sms)
    check_against_float64(c, a, w_t, plan["splits"])
    # one launch, no memset or conversion around it; its grid is the plan's
    (launch,) = stats["launches"]
    assert launch["grid"] == (plan["grid_x"], plan["grid_y"], plan["splits"]) and stats["blocks"] == (
        plan["grid_x"] * plan["grid_y"] * plan["splits"])


def test_matrix_covers_every_reduction_case(emu):
    decode_split = prefill_uneven = unsplit = 0
    for c in CASES:
        bits, _, g, m, n, k, sms = c.values[:7]
        p = emu.plan(m, n, k, storage_bits(bits), g, sms)
        chunks = k // chunk_k(k, g)
        decode_split += m <= 16 and p["workspace_bytes"] > 0
        prefill_uneven += m > 16 and p["splits"] > 1 and chunks % p["splits"] != 0
        unsplit += p["workspace_bytes"] == 0
    assert decode_split >= 10 and prefill_uneven >= 5 and unsplit >= 10


@pytest.mark.parametrize("bits", [2, 3])
def test_torch_op_is_the_emulator(bits):
    """torch.ops.gsq.gemm_emulated takes torch.ops.gsq.gemm's arguments and runs the emulator."""
    n, k, g, m, dtype = 128, 512, 128, 5, torch.bfloat16
    w_t, b_r, s_r = random_layer(n, k, bits, g, dtype, seed=11)
    a = random_activations(m, k, dtype, seed=11)
    with ce.options(sms=3, order="random", seed=5):
        c = torch.ops.gsq.gemm_emulated(a, b_r, s_r, bits, g, n, k)
    direct, _ = ce.default_emulator().gemm(a, b_r, s_r, bits, g, n, k, ce.EmuOptions(sms=3))
    assert torch.equal(c, direct)  # the schedule never changes the numbers
    check_against_float64(c, a, w_t, 3)
    with pytest.raises(ValueError, match="does not match"):
        torch.ops.gsq.gemm_emulated(a, b_r[:, :-4], s_r, bits, g, n, k)


def test_emulated_op_traces_under_torch_compile():
    n, k, g, bits, dtype = 64, 256, 64, 2, torch.float16
    w_t, b_r, s_r = random_layer(n, k, bits, g, dtype, seed=3)
    a = random_activations(4, k, dtype, seed=3)
    f = torch.compile(lambda x: torch.ops.gsq.gemm_emulated(x, b_r, s_r, bits, g, n, k) * 2, fullgraph=True)
    check_against_float64(f(a) / 2, a, w_t)


def test_kernel_refuses_what_it_cannot_take(emu):
    w_t, b_r, s_r = random_layer(128, 256, 2, 64, torch.float16, seed=0)
    a = random_activations(1, 256, torch.float16, seed=0)
    with pytest.raises(ce.EmulatorError, match="invalid argument"):
        emu.gemm(a, b_r, s_r, 4, 64, 128, 256)  # bits 4


@pytest.mark.parametrize("bits,m", [(2, 1), (3, 12)])
def test_decode_with_fewer_warps_a_block(emu, bits, m):
    """Where four rings do not fit one SM's shared memory (sm_86/89: 100 KB), the plan launches blocks of
    fewer warps; the kernel indexes its warps by blockDim."""
    n, k, g, sms, smem, dtype = 320, 640, 64, 3, 100 * 1024, torch.float16
    w_t, b_r, s_r = random_layer(n, k, bits, g, dtype, seed=m)
    a = random_activations(m, k, dtype, seed=m)
    c, stats = emu.gemm(a, b_r, s_r, bits, g, n, k, ce.EmuOptions(sms=sms, smem_per_sm=smem, order="reverse"))
    plan = emu.plan(m, n, k, bits, g, sms, smem)
    (launch,) = stats["launches"]
    assert launch["block"][0] < 128 and plan["grid_x"] * launch["block"][0] // 32 >= plan["warps"]
    assert plan["workspace_bytes"] > 0  # a split row block
    check_against_float64(c, a, w_t)

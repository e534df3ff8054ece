"""CPU checks of the CUDA kernel layout written by ``repack`` and its torch inverse.

The kernel's own reading of that layout (word and bit positions, magic-number
dequant, scale columns) is run from its real source under the emulator
(tests/test_cuda_emu.py); here: repack keeps exactly the checkpoint's bytes,
places every code once, and ``dequant_repacked`` (the no-kernel fallback)
inverts it.
"""

import pytest
import torch

from gsq_vllm import cuda_gemm as cg
from gsq_format.format import code_offset, dequantize, grid_range, pack_codes, storage_bits

SHAPES = [(64, 64, 64), (128, 256, 128), (192, 576, 64), (64, 128, 128)]  # (N, K, G)


def _random_layer(n, k, bits, g, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = grid_range(bits)
    q = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(n, k // g, generator=gen) + 0.5).to(dtype)
    return q, s, pack_codes(q, bits)


@pytest.mark.parametrize("bits", [2, 3, 1.58])
@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_repacked_inverts_repack(bits, n, k, g, dtype):
    q, s, qweight = _random_layer(n, k, bits, g, dtype, seed=n + k + g)
    b_r, s_r = cg.repack(qweight, s, bits, g)
    assert b_r.dtype == torch.int32 and b_r.shape == (n // 64, k * 2 * storage_bits(bits))
    assert b_r.numel() * 32 == n * k * storage_bits(bits)  # no padding: same bytes as on disk
    assert s_r.shape == (n // 64, k // g * 64) and s_r.dtype == dtype
    # the kernel multiplies code and scale in `dtype`, so compare with that rounding
    ref = (q.to(dtype).view(n, -1, g) * s.unsqueeze(-1)).view(n, k)
    back = cg.dequant_repacked(b_r, s_r, bits, g, n, k)
    torch.testing.assert_close(back, ref, rtol=0, atol=0)
    # and with the format's own fp32 dequant to the dtype's rounding
    torch.testing.assert_close(back.float(), dequantize(q, s, g), rtol=1e-2, atol=0)


@pytest.mark.parametrize("bits", [2, 3])
def test_repack_is_a_permutation_of_codes(bits):
    # every code lands in exactly one (word, bit) slot: distinct codes in -> distinct slots out
    n, k, g = 64, 128, 64
    q, s, qweight = _random_layer(n, k, bits, g, torch.float16, seed=3)
    b_r, _ = cg.repack(qweight, s, bits, g)
    w = b_r.to(torch.int64) & 0xFFFFFFFF
    ones = sum(((w >> i) & 1).sum() for i in range(32))
    u = q.to(torch.int64) + code_offset(bits)
    expect = sum(((u >> i) & 1).sum() for i in range(storage_bits(bits)))
    assert int(ones) == int(expect)


@pytest.mark.parametrize("bits", [2, 3])
def test_gsq_gemm_fallback_matches_reference(bits):
    n, k, g, m = 128, 192, 64, 5
    q, s, qweight = _random_layer(n, k, bits, g, torch.bfloat16, seed=7)
    b_r, s_r = cg.repack(qweight, s, bits, g)
    a = torch.randn(m, k, dtype=torch.bfloat16)
    out = cg.gsq_gemm(a, b_r, s_r, bits, g, n, k)
    ref = a.double() @ dequantize(q, s, g).double().t()
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    out2 = cg.dequant_matmul(a, qweight, s, bits, g)
    assert ((out2.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_cuda_supports_and_errors():
    assert cg.cuda_supports(576, 576, 2, 64)
    assert cg.cuda_supports(192, 576, 3, 64)
    assert cg.cuda_supports(4096, 4096, 1.58, 128)
    assert not cg.cuda_supports(576, 576, 2, 128)  # G does not divide K
    assert not cg.cuda_supports(96, 576, 2, 64)  # N not a multiple of 64
    assert not cg.cuda_supports(128, 128, 4, 64)
    assert cg.cuda_supports(128, 128, 2, 32)
    assert not cg.cuda_supports(128, 128, 2, 16)  # not a format group size
    q, s, qweight = _random_layer(64, 96, 2, 32, torch.float16)
    with pytest.raises(ValueError, match="does not support"):
        cg.repack(qweight, s, 2, 32)
    b_r, s_r = cg.repack(*_random_layer(64, 128, 2, 64, torch.float16)[2:0:-1], 2, 64)
    with pytest.raises(ValueError, match="must be"):
        cg.gsq_gemm(torch.randn(2, 64, dtype=torch.float16), b_r, s_r, 2, 64, 64, 128)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        cg.gsq_gemm(torch.randn(2, 128, dtype=torch.bfloat16), b_r, s_r, 2, 64, 64, 128)
    assert isinstance(cg.cuda_kernel_available(), bool)


def test_repack_in_chunks_equals_whole(monkeypatch):
    n, k, g, bits = 320, 256, 128, 3
    q, s, qweight = _random_layer(n, k, bits, g, torch.float16, seed=11)
    whole = cg.repack(qweight, s, bits, g)
    monkeypatch.setattr(cg, "REPACK_CHUNK_WEIGHTS", 128 * k)  # 128 rows per chunk: 3 uneven chunks
    chunked = cg.repack(qweight, s, bits, g)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_shape_rules_come_from_the_extension():
    """csrc/gsq_rules.h is the one statement of the kernel's shapes: cuda_gemm reads it from gsq_vllm._C, or
    from gsq_vllm._C_cpu (compiled from the same header) on machines without the CUDA extension."""
    from gsq_format.format import SUPPORTED_GROUP_SIZES

    ext, prefix = cg._rules_module()
    assert ext is not None and ext.__name__ in ("gsq_vllm._C", "gsq_vllm._C_cpu")
    rules = cg.shape_rules()
    assert set(rules) == {"group_sizes", "storage_bits", "n_multiple", "k_multiple"}
    assert set(rules["group_sizes"]) <= set(SUPPORTED_GROUP_SIZES)  # the kernel takes no group the format lacks
    assert rules["n_multiple"] == cg.ROW_BLOCK  # the layout's row block
    assert [cg.chunk_k(k, g) for k, g in [(256, 64), (256, 128), (256, 32), (192, 64), (128, 32)]] == [128, 128, 64, 64, 64]
    assert "K % 64 == 0" in cg.shape_problem(64, 96, 2, 32) and cg.shape_problem(64, 128, 1.58, 32) is None

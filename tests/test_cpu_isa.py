"""The CPU GEMM's run-time ISA dispatch: every kernel this CPU can run gives the dequantized
reference, and the choice can be forced (GSQ_CPU_ISA) or refused with one clear error.

Each kernel (generic, AVX2+FMA, AVX-512 fp32, AVX-512 BF16 dot products, AMX bf16 tiles) is compiled into the same
library whatever the build machine; here each one that cpuid allows is switched in with set_isa and checked, so an
AVX-512 machine also checks the AVX2 kernel that an AVX2-only machine would run.
"""

import os
import subprocess
import sys

import pytest
import torch

from gsq_vllm import cpu_gemm as C
from gsq_format import format as F

pytestmark = pytest.mark.skipif(not C.cpp_kernel_available(), reason="gsq_vllm._C_cpu not built")

ISAS = C._cpp.supported_isas() if C.cpp_kernel_available() else []
# The kernels that compute the exact products (the int8-activation ones round x: tested apart).
INT8 = [i for i in ISAS if i in ("avx512vnni", "avx2int8")]
EXACT = [i for i in ISAS if i not in INT8]


@pytest.fixture
def isa(request):
    """The fused kernel of one ISA, with the table-lookup decode kernels off (they round the
    activations; tests/test_cpu_tl.py checks them), so small M runs the ISA's kernel too."""
    before = C._cpp.set_isa(request.param)
    tl_before = C._cpp.set_tl("off") if hasattr(C._cpp, "set_tl") else None
    yield request.param
    C._cpp.set_isa(before)
    if tl_before is not None:
        C._cpp.set_tl(tl_before)


def _case(n, k, bits, g, seed):
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = F.grid_range(bits)
    q = torch.randint(qmin, qmax + 1, (n, k), dtype=torch.int8, generator=gen)
    s = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).to(torch.bfloat16)
    lo, hi = C.repack_for_cpu(F.pack_codes(q, bits), bits, g)
    return q, s, lo, hi


@pytest.mark.parametrize("isa", EXACT, indirect=True)
@pytest.mark.parametrize("bits", [2, 3, 1.58])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_every_isa_matches_reference(isa, bits, g):
    n, k = 37, 7 * g  # N not a multiple of any tile or task size; at G=32 a full 4-group block and a 3-group tail
    q, s, lo, hi = _case(n, k, bits, g, seed=g + int(bits * 10))
    sb = F.storage_bits(bits)
    w = F.dequantize(q, s, g).double()  # exact: small integer codes times bf16 scales
    gen = torch.Generator().manual_seed(3)
    for m in (1, 2, 5, 8, 9, 19, 40, 70):  # tail tiles of the 4- and 8-row tiles; AMX: 1-4 token tiles, a second pass
        x = torch.randn(m, k, generator=gen)
        ref = x.double() @ w.t()
        tol = 1e-5 * ref.abs().max().item()
        y = C._cpp.gemm(x, lo, hi, s.float(), sb, g)  # float32 in and out
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol)
        y = C._cpp.gemm(x, lo, hi, s, sb, g)  # bf16 scales read directly
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=tol)
        xb = x.bfloat16()  # bf16 in, bf16 out: the float32 result rounded once
        yb = C._cpp.gemm(xb, lo, hi, s, sb, g)
        assert yb.dtype == torch.bfloat16
        refb = (xb.double() @ w.t()).float()
        torch.testing.assert_close(yb.float(), refb.bfloat16().float(), rtol=1e-2, atol=1e-2 * refb.abs().max().item())


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_every_isa_dequantizes_exactly(isa, bits, g):
    """The blocked path's dequantized block is the format's dequantize bit for bit, in float32
    and in bf16 (one round-to-nearest-even of the exact float32 product)."""
    n, k = 21, 5 * g
    q, s, lo, hi = _case(n, k, bits, g, seed=g + bits)
    for dtype in (torch.float32, torch.bfloat16):
        for g0, g1 in ((0, 5), (1, 4)):
            w = C._cpp.dequant(lo, hi, s.float(), bits, g, g0, g1, dtype)
            assert torch.equal(w, F.dequantize(q, s, g, dtype)[:, g0 * g:g1 * g])


def _int8_reference(x, q, s, g, offset):
    """y with x rounded as the int8 kernel does: per (row, group) a = max|x| / 127 and
    q = round(x * (127 / max|x|)), all in float32."""
    m, k = x.shape
    xg = x.float().view(m, k // g, g)
    amax = xg.abs().amax(-1, keepdim=True)
    a = amax / 127
    inv = torch.full_like(amax, 127.0).div(amax)  # a true division (127 / t is 127 * t.reciprocal())
    xq = torch.round(xg * torch.where(amax > 0, inv, 0))
    u = q.double().view(q.shape[0], k // g, g) + offset  # unsigned codes, the kernel's integers
    dots = torch.einsum("mgk,ngk->mng", xq.double(), u - offset)  # exact integer sums
    return (dots * (a.double().squeeze(-1).unsqueeze(1) * s.double().unsqueeze(0))).sum(-1)


@pytest.mark.parametrize("isa", INT8, indirect=True)
@pytest.mark.parametrize("bits", [2, 3, 1.58])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_int8_activation_kernel_matches_its_rounding(isa, bits, g):
    """GSQ_CPU_ISA=avx512vnni / avx2int8: the integer dot products are exact, so the result is the
    int8-rounded activations times the weight up to float32 summation; and it stays near the
    bf16 result. K = 5 groups: a partial last block for G = 32 and 64 in both kernels."""
    n, k = 29, 5 * g  # N: whole 4-row output tiles and a tail
    q, s, lo, hi = _case(n, k, bits, g, seed=g + int(3 * bits))
    bits = F.storage_bits(bits)
    offset = 2 ** (bits - 1)
    gen = torch.Generator().manual_seed(5)
    for m in (1, 2, 3, 8, 11):  # 1, 2, 3 and 4 rows of x per tile
        x = torch.randn(m, k, generator=gen).bfloat16()
        ref = _int8_reference(x, q, s, g, offset)
        y = C._cpp.gemm(x, lo, hi, s, bits, g)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
        yf = C._cpp.gemm(x.float(), lo, hi, s, bits, g)
        torch.testing.assert_close(yf.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        ys = C._cpp.gemm(x.float(), lo, hi, s.float(), bits, g)  # float32 scales
        torch.testing.assert_close(ys.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        exact = x.double() @ F.dequantize(q, s, g).double().t()
        assert (yf.double() - exact).abs().max() < 0.02 * exact.abs().max()  # int8 rounding, not a bug


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_every_isa_through_the_custom_op(isa):
    """torch.ops.gsq.cpu_gemm (what vLLM calls) on bf16 activations, decode and prefill sizes."""
    n, k, g = 64, 512, 64
    q, s, lo, hi = _case(n, k, 2, g, seed=7)
    w = F.dequantize(q, s, g, torch.float32)
    for m in (1, 8, min(C.cpp_max_rows() + 3, 300)):  # amx: fused at every M
        x = torch.randn(m, k).bfloat16()
        y = torch.ops.gsq.cpu_gemm(x, lo, hi, s, 2, g)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        tol = 5e-2 if isa in INT8 else 2e-2  # int8 activations
        torch.testing.assert_close(y.float(), x.float() @ w.t(), rtol=tol, atol=tol)


def test_best_isa_is_chosen_and_names_are_checked():
    # cpuid decides: the widest kernel this CPU has is the one in use (unless forced)
    if not os.environ.get("GSQ_CPU_ISA"):  # the int8 kernel is opt-in only
        assert C.cpu_isa() == EXACT[-1]
    with pytest.raises(RuntimeError, match="generic, avx2, avx512, avx512bf16, amx, avx512vnni or avx2int8"):
        C._cpp.set_isa("sse9")


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=120)


def test_gsq_cpu_isa_forces_a_kernel():
    r = _python("from gsq_vllm import cpu_gemm as C; print(C.cpu_isa())", GSQ_CPU_ISA="generic")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "generic"
    r = _python("from gsq_vllm import cpu_gemm as C; print(C.cpu_isa())", GSQ_CPU_ISA="avx3000")
    assert r.returncode != 0 and "must be generic, avx2, avx512, avx512bf16, amx, avx512vnni or avx2int8" in r.stderr


def test_fused_row_limit_can_be_set_and_is_checked():
    code = "from gsq_vllm import cpu_gemm as C; print(C.cpp_max_rows())"
    r = _python(code, GSQ_CPU_FUSED_MAX_ROWS="512")
    assert r.returncode == 0 and r.stdout.strip() == "512", r.stderr
    r = _python(code, GSQ_CPU_FUSED_MAX_ROWS="-3")
    assert r.returncode != 0 and "GSQ_CPU_FUSED_MAX_ROWS=-3: must be a whole number >= 0" in r.stderr


def test_large_layers_keep_the_fused_kernel_for_more_rows():
    """A layer of 8M+ weights runs the fused kernel past the small-layer crossover (its dequantized
    block would not stay in cache): the op's result is then the fused kernel's, bit for bit."""
    n, k, g = 2048, 4096, 64
    q, s, lo, hi = _case(n, k, 2, g, seed=11)
    finite = [i for i in EXACT if i != "amx"]  # amx stays fused at every M: no crossover to test
    before = C._cpp.set_isa(finite[-1])
    try:
        m = C.cpp_max_rows() + 4
        assert C.cpp_max_rows(n, k) >= m
        x = torch.randn(m, k).bfloat16()
        assert torch.equal(torch.ops.gsq.cpu_gemm(x, lo, hi, s, 2, g), C._cpp.gemm(x, lo, hi, s, 2, g))
    finally:
        C._cpp.set_isa(before)


@pytest.mark.skipif("amx" not in ISAS, reason="this CPU (or its OS) gives no AMX tiles")
def test_amx_kernel_is_fused_at_prefill_sizes_and_matches_its_rounding():
    n, k, g = 96, 640, 128  # K = 5 groups: a partial 128-code block; N = 6 channel tiles
    q, s, lo, hi = _case(n, k, 3, g, seed=13)
    before = C._cpp.set_isa("amx")
    try:
        assert C.cpp_max_rows(n, k) > 10**9 and C._cpp.max_fused_rows(n, k, False) < 100  # float32 x: avx512's
        w = F.dequantize(q, s, g)
        wb = w.bfloat16().double()  # the kernel rounds each weight to bf16 once (3-bit: codes +-3)
        for m in (3, 16, 17, 64, 65, 100, 257):  # 1-4 token tiles, then paired and single extra passes
            x = torch.randn(m, k).bfloat16()
            y = torch.ops.gsq.cpu_gemm(x, lo, hi, s, 3, g)
            assert torch.equal(y, C._cpp.gemm(x, lo, hi, s, 3, g))  # the op ran the fused kernel
            assert torch.equal(y, C._cpp.gemm(x, lo, hi, s.float(), 3, g))  # float32 scales: same table
            ref = x.double() @ wb.t()  # exact products, float64 sums; y is that rounded to bf16
            torch.testing.assert_close(y.double(), ref.float().bfloat16().double(), rtol=8e-3, atol=1e-6 * ref.abs().max().item())
    finally:
        C._cpp.set_isa(before)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_dense_bf16_kernel_matches_reference(isa):
    """gsq::cpu_dense (bf16 layers kept unquantized, on CPUs without a bf16 dot product): every
    tile of rows (fused) and the float32-slice path above it, K not a multiple of the lanes, N not
    a multiple of the tiles, a bias, leading dims; float32 sums of the exact bf16 products. Under
    an int8 kernel too: dense layers keep exact products (and, under avx2int8, the AVX2 code)."""
    gen = torch.Generator().manual_seed(21)
    n, k = 45, 8 * 16 + 5
    w = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16()
    for m in (1, 2, 3, 4, 5, 7, 9, 16, 17, 40):
        x = torch.randn(m, k, generator=gen)
        ref = x.double() @ w.double().t() + bias.double()
        y = C.cpu_dense(x, w, bias)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        yb = C.cpu_dense(x.bfloat16(), w, None)  # bf16 in, bf16 out: rounded once
        refb = x.bfloat16().double() @ w.double().t()
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.double(), refb.bfloat16().double(), rtol=8e-3, atol=1e-6 * refb.abs().max().item())
    x3 = torch.randn(2, 3, k, generator=gen).bfloat16()
    assert torch.equal(C.cpu_dense(x3, w, bias), C.cpu_dense(x3.reshape(6, k), w, bias).reshape(2, 3, n))
    with pytest.raises(RuntimeError, match="columns"):
        C.cpu_dense(torch.randn(1, k + 1), w, None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        C.cpu_dense(torch.randn(1, k), w.float(), None)


def _dense_int8_reference(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """y in float64 from the documented rounding: x per (row, block of 32) to q = round(x * 127 /
    max|x|) in float32 arithmetic, then exact integer block sums times the block and row scales."""
    m, k = x.shape
    kp = wq.shape[1]
    xf = torch.nn.functional.pad(x.float(), (0, kp - k)).reshape(m, kp // 32, 32)
    amax = xf.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    xq = torch.round(xf * inv).to(torch.int64)
    blocks = torch.einsum("mbk,nbk->mnb", xq, wq.reshape(-1, kp // 32, 32).to(torch.int64))  # exact integers
    return (blocks.double() * (amax[..., 0] / 127.0).double()[:, None, :]).sum(2) * ws.double()[None, :]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_dense_int8_kernel_matches_reference(isa):
    """gsq::cpu_dense_int8 (GSQ_CPU_DENSE=int8): the AVX-512 VNNI kernel under the kernels of a
    CPU with VNNI, the AVX2 one under the other SIMD kernels, the portable loop under generic;
    1- and 2-row tiles and their tails, N not a multiple of the 4-row tile, K not a multiple of 32
    (a partial last block) and an odd count of blocks (the VNNI kernel's lone last block), a bias,
    leading dims."""
    vnni_here = "avx512vnni" in ISAS
    want = ("generic" if isa == "generic" else
            "avx512vnni" if vnni_here and isa in ("avx512vnni", "avx512bf16", "amx") else "avx2")
    assert C._cpp.dense_int8_kernel() == want
    gen = torch.Generator().manual_seed(22)
    n, k = 45, 8 * 16 + 5
    w = torch.randn(n, k, generator=gen)
    w[3] = 0.0  # an all-zero row: scale 0, not NaN
    bias = torch.randn(n, generator=gen).bfloat16()
    wq, ws = C.quantize_dense_int8(w.bfloat16())
    assert wq.dtype == torch.int8 and wq.shape == (n, 160) and ws.shape == (n,)
    for m in (1, 2, 3, 4, 5, 7, 16, 17, 40):
        x = torch.randn(m, k, generator=gen) * 3
        x[0, 32:64] = 0.0  # an all-zero block of x
        ref = _dense_int8_reference(x, wq, ws)
        y = C.cpu_dense_int8(x, wq, ws, None)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item())
        yb = C.cpu_dense_int8(x.bfloat16(), wq, ws, bias)  # bf16 in, bf16 out, the bias before the rounding
        refb = _dense_int8_reference(x.bfloat16(), wq, ws) + bias.double()
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.double(), refb.float().bfloat16().double(), rtol=8e-3, atol=1e-5 * refb.abs().max().item())
    x3 = torch.randn(2, 3, k, generator=gen).bfloat16()
    assert torch.equal(C.cpu_dense_int8(x3, wq, ws, None), C.cpu_dense_int8(x3.reshape(6, k), wq, ws, None).reshape(2, 3, n))
    # Given the bf16 weight, the op keeps int8 up to 2 rows of x; above, gsq::cpu_dense where the CPU
    # has no bf16 dot product, torch's (oneDNN) linear where it has.
    wb = w.bfloat16()
    native = C._cpp.bf16_gemm_is_native()
    for m in (1, 2, 3, 8):
        x = torch.randn(m, k, generator=gen).bfloat16()
        above = torch.nn.functional.linear(x, wb, bias) if native else C.cpu_dense(x, wb, bias)
        want = C.cpu_dense_int8(x, wq, ws, bias) if m <= 2 else above
        assert torch.equal(C.cpu_dense_int8(x, wq, ws, bias, wb), want), m
    # float32 x tells the two apart (bf16 outputs of both are often equal): torch's linear runs
    # in the weight's dtype, gsq::cpu_dense keeps x in float32
    x = torch.randn(8, k, generator=gen)
    want = torch.nn.functional.linear(x.bfloat16(), wb).float() if native else C.cpu_dense(x, wb)
    assert torch.equal(C.cpu_dense_int8(x, wq, ws, None, wb), want)
    x = torch.randn(3, k, generator=gen)  # a float32 model's weight: torch's linear above 2 rows
    torch.testing.assert_close(C.cpu_dense_int8(x, wq, ws, None, w), x @ w.t())
    with pytest.raises(RuntimeError, match="weight wq was made from"):
        C.cpu_dense_int8(torch.randn(1, k), wq, ws, None, wb[:, :-1])
    with pytest.raises(RuntimeError, match="columns"):
        C.cpu_dense_int8(torch.randn(1, k - 32), wq, ws, None)
    with pytest.raises(RuntimeError, match="int8"):
        C.cpu_dense_int8(torch.randn(1, k), wq.float(), ws, None)


def test_dense_int8_is_close_to_the_float_product():
    """What the rounding costs, on a weight and activations shaped like SmolLM2's lm_head input
    (a large column): per-row int8 weights and per-32 int8 x stay within 2 % of x @ W.T (1.25 % here;
    Gaussian weights alone cost ~0.7 %: a step of max|w| / 127 over ~3.2 sigma)."""
    gen = torch.Generator().manual_seed(23)
    w = torch.randn(512, 576, generator=gen) * 0.05
    x = torch.randn(8, 576, generator=gen)
    x[:, 7] *= 30.0  # an outlier column: only its block's scale grows
    ref = x.double() @ w.double().t()
    y = C.cpu_dense_int8(x, *C.quantize_dense_int8(w), None).double()
    rel = (y - ref).norm() / ref.norm()
    assert rel < 0.02, rel
    wq, ws = C.quantize_dense_int8(w)
    assert ((wq[:, :576].float() * ws[:, None] - w).abs() <= ws[:, None] / 2 + 1e-7).all()  # half a step per weight
    assert (wq[:, 576:] == 0).all()


def test_dense_kernel_is_wanted_exactly_without_a_bf16_dot_product():
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    native = C._cpp.bf16_gemm_is_native()
    assert native == ("avx512bf16" in ISAS or "amx" in ISAS)
    assert C.dense_kernel_wanted(w) == (not native)
    assert not C.dense_kernel_wanted(w.float())  # float32 layers keep vLLM's (fast) float32 GEMM
    r = _python("import torch; from gsq_vllm import cpu_gemm as C; print(C.dense_kernel_wanted(torch.zeros(8, 16, dtype=torch.bfloat16)))",
                GSQ_CPU_DENSE="0")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr

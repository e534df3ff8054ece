"""The table-lookup (T-MAC-style) decode kernels (csrc/cpu/tl_kernel.h; tl_avx2.cpp, tl_avx512.cpp):
every variant this CPU can run (so an AVX-512 machine also checks the AVX2 one), 2-bit, ternary
(stored as 2-bit) and 3-bit, G = 32/64/128, M = 1..4 (one kernel call) and 5, 13 (passes of 4 rows
of x over the weight), N not a multiple of the 16-row tile, K with whole and partial super-chunks
of the planes' streams.

Two references. The kernel's own rounding (tl_kernel.h): per (row m of x, group g, plane p) the
step is a_p = amax_p / 127, amax_p the largest |entry| the plane's tables can hold (lo: 3/2 (|x_a| +
|x_b|) over the pairs of the centred 2-bit codes, hi: (|x_0| + |x_1|) + (|x_2| + |x_3|) over four),
every table entry (a float32 partial sum e whose products are exact) is stored as
round_half_even(e * 127 / amax_p), and the centring term -1/2 sum_g x enters once per group; the
lookups' integer sums are then exact, so y is that rounding's result up to float32 summation
(checked to 1e-5 of max|y|). And the float product x @ W.T: each lookup is off by at most a_p / 2,
so |y - x @ W.T| <= sum_g |s[n, g]| (a_lo[m, g] G/4 + a_hi[m, g] G/4 at 3 bits: G/2 lo lookups,
G/4 hi ones counted twice), checked per output element (plus float32 slack)."""

import os
import subprocess
import sys

import pytest
import torch

from gsq_format import format as F
from gsq_vllm import cpu_gemm as C

pytestmark = pytest.mark.skipif(not C.cpp_kernel_available() or not hasattr(C._cpp, "set_tl"),
                                reason="gsq_vllm._C_cpu (with the table-lookup kernels) not built")

TLS = C._cpp.supported_tl() if C.cpp_kernel_available() and hasattr(C._cpp, "supported_tl") else []


@pytest.fixture
def tl(request):
    before = C._cpp.set_tl(request.param)
    yield request.param
    C._cpp.set_tl(before)


def _case(n, k, bits, g, seed):
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = F.grid_range(bits)
    q = torch.randint(qmin, qmax + 1, (n, k), dtype=torch.int8, generator=gen)
    s = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).to(torch.bfloat16)
    s[0, 0] = -s[0, 0]  # a negative scale (and the tensor's first one: the kernels' scalar bf16 path)
    lo, hi = C.repack_for_cpu(F.pack_codes(q, bits), bits, g)
    return q, s, lo, hi


def _round(e, inv):
    return torch.round(e * inv).double()  # float32 product, round half to even, as vcvtps2dq


def _step(amax):
    """(a, inv) of a plane's tables from its float32 amax [m, ng], as the kernel computes them."""
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))  # (127.0 / t is 127 * (1 / t))
    return (amax / 127).double(), inv


def tl_reference(x, q, s, g, bits):
    """(y, bound): y from the kernel's stated rounding (float32 tables, float64 sums), and the bound on |y - x @ W.T|."""
    sb = F.storage_bits(bits)
    x = x.float()
    m, k = x.shape
    n, ng, quarter = q.shape[0], k // g, g // 4
    u = q.to(torch.int64) + (4 if sb == 3 else 2)  # unsigned codes
    lcode = (u & 3).view(n, ng, g).float()
    xg = x.view(m, ng, g)
    xs = [xg[:, None, :, i * quarter:(i + 1) * quarter] for i in range(4)]  # [m, 1, ng, Q]
    ax = [t.abs() for t in xs]
    a_lo, inv_lo = _step(1.5 * torch.maximum(ax[0] + ax[1], ax[2] + ax[3]).amax(-1)[:, 0])  # [m, ng]
    ls = [lcode[None, :, :, i * quarter:(i + 1) * quarter] - 2 for i in range(4)]  # [1, n, ng, Q]
    total = torch.zeros(m, n, ng, dtype=torch.float64)
    for p in (0, 2):  # lo nibble: pair (j, j+Q); hi nibble: pair (j+2Q, j+3Q)
        e = (xs[p] * ls[p] + xs[p + 1] * ls[p + 1]) + 0.5 * (xs[p] + xs[p + 1])  # the codes centred: l - 3/2
        total += _round(e, inv_lo[:, None, :, None]).sum(-1)
    total += (-0.5 * xg.double().sum(-1) * inv_lo.double())[:, None, :]  # the centring, in lo steps
    sa = s.double()[None] * a_lo[:, None]  # [m, n, ng]
    y = (total * sa).sum(-1)
    bound = (sa.abs() * (g // 4)).sum(-1)  # G/2 lookups, each off by a_lo / 2
    if sb == 3:
        a4 = xg.view(m, ng, g // 4, 4).abs()
        a_hi, inv_hi = _step(((a4[..., 0] + a4[..., 1]) + (a4[..., 2] + a4[..., 3])).amax(-1))
        sign = (2 * (u >> 2) - 1).view(n, ng, g // 4, 4).float()[None]  # [1, n, ng, G/4, 4]
        x4 = xg.view(m, ng, g // 4, 4)[:, None]
        e = ((x4[..., 0] * sign[..., 0] + x4[..., 1] * sign[..., 1]) + x4[..., 2] * sign[..., 2]) + x4[..., 3] * sign[..., 3]
        sh = s.double()[None] * a_hi[:, None]
        y += (2 * _round(e, inv_hi[:, None, :, None]).sum(-1) * sh).sum(-1)
        bound += (sh.abs() * (g // 4)).sum(-1)  # G/4 lookups, counted twice, each off by a_hi / 2
    return y, bound


@pytest.mark.parametrize("tl", TLS, indirect=True)
@pytest.mark.parametrize("bits", [2, 1.58, 3])
@pytest.mark.parametrize("g", [32, 64, 128])
def test_tl_matches_its_rounding_and_the_float_bound(tl, bits, g):
    sb = F.storage_bits(bits)
    w_cache = {}
    for n, k in ((37, 7 * g), (45, 2048)):  # partial super-chunks (7 groups) and whole ones (K = 2048)
        q, s, lo, hi = _case(n, k, bits, g, seed=g + int(10 * bits) + k)
        w = w_cache.setdefault(k, F.dequantize(q, s, g).double())  # exact: small codes times bf16 scales
        gen = torch.Generator().manual_seed(k)
        for m in (1, 2, 3, 4, 5, 13):
            assert C._cpp.tl_in_use(m) == tl
            x = torch.randn(m, k, generator=gen)
            x[0, :g] *= 8  # an outlier group: only its own tables get coarser
            if m > 1:
                x[1, g:2 * g] = 0  # an all-zero group: step 0, entries 0
            ref, bound = tl_reference(x, q, s, g, bits)
            exact = x.double() @ w.t()
            for xx, ss in ((x, s), (x, s.float())):  # bf16 and float32 scales
                y = C._cpp.gemm(xx, lo, hi, ss, sb, g)
                assert y.dtype == torch.float32 and y.shape == (m, n)
                torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
                err = (y.double() - exact).abs()
                assert (err <= bound * (1 + 1e-4) + 1e-5 * exact.abs().max()).all(), (err / bound).max()
            yb = C._cpp.gemm(x.bfloat16(), lo, hi, s, sb, g)  # bf16 in, bf16 out: the float32 result of bf16 x, rounded once
            refb, _ = tl_reference(x.bfloat16(), q, s, g, bits)
            assert yb.dtype == torch.bfloat16
            torch.testing.assert_close(yb.double(), refb.float().bfloat16().double(), rtol=8e-3,
                                       atol=1e-5 * refb.abs().max().item())


@pytest.mark.parametrize("tl", TLS, indirect=True)
def test_tl_through_the_custom_op_and_old_path_kept(tl):
    """torch.ops.gsq.cpu_gemm (what vLLM calls) runs the tables up to TL_MAX_ROWS rows, the fused
    kernel above; GSQ_CPU_TL=off / set_tl("off") gives the old kernel bit for bit."""
    n, k, g = 70, 1024, 64
    q, s, lo, hi = _case(n, k, 2, g, seed=5)
    for m in (1, 4, 5, C._cpp.TL_MAX_ROWS, C._cpp.TL_MAX_ROWS + 1):
        x = torch.randn(m, k).bfloat16()
        y = torch.ops.gsq.cpu_gemm(x, lo, hi, s, 2, g)
        if m <= C._cpp.TL_MAX_ROWS:
            assert torch.equal(y, C._cpp.gemm(x, lo, hi, s, 2, g))
            ref, _ = tl_reference(x, q, s, g, 2)
            torch.testing.assert_close(y.double(), ref.float().bfloat16().double(), rtol=8e-3, atol=1e-5 * ref.abs().max().item())
        C._cpp.set_tl("off")
        try:
            assert C._cpp.tl_in_use(m) == ""
            old = torch.ops.gsq.cpu_gemm(x, lo, hi, s, 2, g)
            if m <= C._cpp.max_fused_rows(n, k):  # above, the op's blocked path
                assert torch.equal(old, C._cpp.gemm(x, lo, hi, s, 2, g))
            if m > C._cpp.TL_MAX_ROWS:
                assert torch.equal(old, y)
        finally:
            C._cpp.set_tl(tl)


@pytest.mark.skipif(not TLS, reason="no table-lookup kernel on this CPU")
def test_tl_choice_follows_the_isa_and_threads_agree():
    before_isa, before_tl = C._cpp.isa(), C._cpp.set_tl("auto")
    try:
        assert C._cpp.tl_in_use(C._cpp.TL_MAX_ROWS + 1) == ""
        C._cpp.set_isa("generic")
        assert C._cpp.tl_in_use(1) == ""  # the portable reference stays float
        C._cpp.set_isa("avx2")
        assert C._cpp.tl_in_use(1) == "avx2"  # an AVX2 machine's choice
        if "avx512" in TLS:
            C._cpp.set_isa("avx512")  # the VBMI + VNNI tables where cpuid has them
            assert C._cpp.tl_in_use(1) == ("avx512vbmi" if "avx512vbmi" in TLS else "avx512")
        C._cpp.set_isa(before_isa)
        n, k, g = 100, 1536, 128
        q, s, lo, hi = _case(n, k, 3, g, seed=9)
        x = torch.randn(3, k)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            y1 = C._cpp.gemm(x, lo, hi, s, 3, g)
            torch.set_num_threads(2)  # tiles are independent: same bits on any thread count
            assert torch.equal(C._cpp.gemm(x, lo, hi, s, 3, g), y1)
        finally:
            torch.set_num_threads(threads)
        with pytest.raises(RuntimeError, match="auto, off, avx2, avx512 or avx512vbmi"):
            C._cpp.set_tl("sse9")
    finally:
        C._cpp.set_isa(before_isa)
        C._cpp.set_tl(before_tl)


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=120)


def test_gsq_cpu_tl_environment_variable():
    code = "from gsq_vllm import cpu_gemm as C; print(C._cpp.tl(), repr(C._cpp.tl_in_use(1)))"
    unset = {k: v for k, v in os.environ.items() if k != "GSQ_CPU_TL"}
    before = C._cpp.set_tl("auto")
    try:
        expected = C._cpp.tl_in_use(1)  # what auto picks under the ISA cpuid chose (the subprocess's too)
    finally:
        C._cpp.set_tl(before)
    for env in (unset, dict(unset, GSQ_CPU_TL="")):  # unset or empty: the default, the tables
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.split() == ["auto", repr(expected)], r.stderr
    r = _python(code, GSQ_CPU_TL="off")
    assert r.returncode == 0 and r.stdout.split() == ["off", "''"], r.stderr
    r = _python(code, GSQ_CPU_TL="auto", GSQ_CPU_ISA="generic")
    assert r.returncode == 0 and r.stdout.split() == ["auto", "''"], r.stderr
    r = _python(code, GSQ_CPU_TL="avx3000")
    assert r.returncode != 0 and "GSQ_CPU_TL=avx3000: must be auto, off, avx2, avx512 or avx512vbmi" in r.stderr


_GUARDED = r'''
import ctypes, mmap, torch
from gsq_format import format as F
from gsq_vllm import cpu_gemm as C
libc = ctypes.CDLL(None)
PAGE = mmap.PAGESIZE
keep = []

def guarded(t, at_end):
    """A copy of t in a mapping whose pages before and after are PROT_NONE: at its end or start."""
    raw = t.contiguous().view(torch.uint8).flatten()
    n = raw.numel()
    total = ((n + PAGE - 1) // PAGE + 2) * PAGE
    mm = mmap.mmap(-1, total)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    assert libc.mprotect(ctypes.c_void_p(addr), PAGE, 0) == 0
    assert libc.mprotect(ctypes.c_void_p(addr + total - PAGE), PAGE, 0) == 0
    keep.append(mm)
    off = total - PAGE - n if at_end else PAGE
    g = torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=off)
    g.copy_(raw)
    return g.view(t.dtype).view(t.shape)

for tl in C._cpp.supported_tl():
    C._cpp.set_tl(tl)
    for bits in (2, 3):
        for g in (32, 64, 128):
            n, k = 37, 7 * g
            qmin, qmax = F.grid_range(bits)
            q = torch.randint(qmin, qmax + 1, (n, k), dtype=torch.int8)
            s = (torch.rand(n, k // g) * 0.1 + 0.01).to(torch.bfloat16)
            lo, hi = C.repack_for_cpu(F.pack_codes(q, bits), bits, g)
            x = torch.randn(4, k)
            want = C._cpp.gemm(x, lo, hi, s, bits, g)
            for at_end in (True, False):
                lo_g = guarded(lo, at_end)
                hi_g = guarded(hi, at_end) if bits == 3 else hi
                for sc in (s, s.float()):
                    got = C._cpp.gemm(x, lo_g, hi_g, guarded(sc, not at_end), bits, g)
                    assert torch.equal(got, C._cpp.gemm(x, lo, hi, sc, bits, g)), (tl, bits, g)
print("ok")
'''


@pytest.mark.skipif(not TLS or not sys.platform.startswith("linux"), reason="needs a table-lookup kernel and mprotect")
def test_tl_reads_only_its_planes_and_scales():
    """Planes ending (and starting) right at a PROT_NONE page, scales starting (and ending) at one:
    the kernels read no byte outside them (the last tile's rows past N repeat row N-1, a stream's
    last partial chunk is loaded masked, a bf16 scale is gathered from the 4 bytes that end at it
    except the tensor's first). A stray read is a SIGSEGV of the child process."""
    r = _python(_GUARDED, GSQ_CPU_TL="auto")
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])

"""CPU path of the GSQ linear: ``y = x @ W.T`` from packed 2/3-bit codes.

No dequantized weight is kept: :func:`repack_for_cpu` turns the checkpoint's
int32 ``qweight`` into *bit planes* laid out per group. Decode-sized calls
run a fused dequant+GEMV C++ kernel (``gsq_vllm._C_cpu``, csrc/cpu/) when it
is built; otherwise, and for prefill, every call dequantizes one K-block (``[N, block_k]`` transient) and
accumulates ``x[:, block] @ W_block.T``. Peak extra memory per call is one
block, never the whole layer or model.

CPU layout (per linear, ``NG = K // G`` groups per row):

* ``lo``  uint8 ``[N, NG, G // 4]``: bits 0-1 of the offset code ``u``.
  Byte ``j`` of group ``g`` holds codes ``j + i * G/4`` (i = 0..3) of the
  group at bits ``2i``; planar so unpacking is 4 shifts of contiguous bytes
  (vectorizes in torch and in the C++ kernel alike).
* ``hi``  uint8 ``[N, NG, G // 8]`` (3-bit only, else ``[0]``): bit 2
  of ``u``, packed in code order: byte ``j`` holds codes ``8j + i`` (i = 0..7)
  at bit ``i``, so bit ``c`` of the group's plane (read as little-endian
  32-bit words) is code ``c``; the C++ kernel unpacks a word with one
  variable shift per lane.
* ``scales`` ``[N, K // G]`` in the checkpoint's scale dtype, unchanged.

Memory: exactly ``storage_bits`` bits per weight plus scales, as on disk.
The GEMM is a ``torch.library`` custom op (``gsq::cpu_gemm``) with a fake
impl so torch.compile can trace through it.
"""

from __future__ import annotations

import os

import torch

from gsq_format.format import FormatError, check_group_size, code_offset, storage_bits, unpack_codes

MAX_BLOCK_K = 1024  # the C++ op's choose_block_k uses the same bound


# Layout of lo/hi that this file writes; the C++ module reports the one it was built for.
LAYOUT_VERSION = 2


def _load_cpp():
    try:
        from gsq_vllm import _C_cpu  # built by setup.py when torch is importable
    except ImportError as e:
        # a bad forced kernel or row limit: say so, don't fall back to the slow path
        if any(var in str(e) for var in ("GSQ_CPU_ISA", "GSQ_CPU_FUSED_MAX_ROWS", "GSQ_CPU_TL")):
            msg = next(line for line in str(e).splitlines() if "GSQ_CPU_" in line)
            raise ImportError(msg.strip()) from None
        return None
    if getattr(_C_cpu, "LAYOUT_VERSION", None) != LAYOUT_VERSION:
        import warnings

        warnings.warn("gsq_vllm._C_cpu was built from older sources (plane layout "
                      f"{getattr(_C_cpu, 'LAYOUT_VERSION', 1)}, expected {LAYOUT_VERSION}); using the torch path. "
                      "Rebuild: pip install --no-build-isolation -e .", stacklevel=2)
        return None
    return _C_cpu


_cpp = _load_cpp()


def cpp_kernel_available() -> bool:
    return _cpp is not None


def cpu_isa() -> str | None:
    """The C++ kernel in use: "amx", "avx512bf16", "avx512", "avx2" or "generic" (chosen from cpuid
    at load; amx also needs the OS to grant the tile state), or "avx512vnni" / "avx2int8" (int8
    activations, only when GSQ_CPU_ISA asks for one); None when the extension is not built."""
    return _cpp.isa() if _cpp is not None else None


def shape_problem(n: int, k: int, bits, group_size: int) -> str | None:
    """None when the CPU kernels take a weight ``[N=n, K=k]``, else why not. The rule is the C++
    extension's (``_C_cpu.shape_ok``, csrc/cpu/gsq_cpu_gemm.cpp) where it is built; without it the
    torch path serves, and it takes every shape the format allows (``gsq_format.format``)."""
    what = f"N={n}, K={k}, bits={bits}, G={group_size}"
    try:
        sb = storage_bits(bits)
        if _cpp is None or not hasattr(_cpp, "shape_ok"):
            check_group_size(k, group_size, what)
            return None if n >= 1 else f"{what}: no rows"
        if _cpp.shape_ok(n, k, sb, group_size):
            return None
    except (FormatError, TypeError) as e:  # TypeError: a size past the C++ int64
        return f"{what}: {e}"
    r = _cpp.shape_rules()
    return f"{what}: needs storage bits in {r['storage_bits']}, G in {r['group_sizes']}, K % G == 0 and N >= 1"


def cpp_max_rows(n: int = 0, k: int = 0) -> int:
    """Up to this many rows of x the fused C++ kernel runs for an ``n`` x ``k`` weight (default: a
    small one); more go to the blocked BLAS path. The crossover depends on the kernel in use and on
    the layer's size; csrc/cpu/gsq_cpu_gemm.cpp says where the numbers come from."""
    return _cpp.max_fused_rows(n, k) if _cpp is not None else 0


def choose_block_k(k: int, group_size: int) -> int:
    """Largest multiple of ``group_size`` dividing ``k``, at most MAX_BLOCK_K (>= group_size)."""
    best = group_size
    for m in range(1, k // group_size + 1):
        bk = group_size * m
        if bk > MAX_BLOCK_K:
            break
        if k % bk == 0:
            best = bk
    return best


def repack_for_cpu(qweight: torch.Tensor, bits: float | int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint ``qweight`` int32 ``[N, K*b/32]`` -> (``lo``, ``hi``) per-group bit planes (module doc)."""
    sb = storage_bits(bits)
    g = group_size
    u = (unpack_codes(qweight, bits).to(torch.int16) + code_offset(bits)).to(torch.uint8)  # [N, K]
    n, k = u.shape
    ng = k // g
    low = (u & 0x3).reshape(n, ng, 4, g // 4)
    lo = torch.zeros(n, ng, g // 4, dtype=torch.uint8)
    for i in range(4):
        lo |= low[:, :, i, :] << (2 * i)
    if sb == 2:
        return lo.contiguous(), torch.zeros(0, dtype=torch.uint8)
    high = (u >> 2).reshape(n, ng, g // 8, 8)
    hi = torch.zeros(n, ng, g // 8, dtype=torch.uint8)
    for i in range(8):
        hi |= high[:, :, :, i] << i
    return lo.contiguous(), hi.contiguous()


def _unpack_groups(lo_b: torch.Tensor, hi_b: torch.Tensor, offset: int) -> torch.Tensor:
    """Planes of some groups (``[N, ng, G/4]``, ``[N, ng, G/8]`` or empty) -> signed int8 ``[N, ng*G]``."""
    n, ng, quarter = lo_b.shape
    shifts2 = torch.arange(0, 8, 2, dtype=torch.uint8).view(1, 1, 4, 1)
    u = (lo_b.unsqueeze(2) >> shifts2) & 0x3  # [N, ng, 4, G/4]
    u = u.reshape(n, ng * quarter * 4)
    if hi_b.numel():
        shifts1 = torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)
        h = (hi_b.unsqueeze(-1) >> shifts1.view(1, 1, 1, 8)) & 0x1  # [N, ng, G/8, 8]
        u = u | (h.reshape(n, -1) << 2)
    return u.to(torch.int8) - offset


def _blocked_gemm(x, lo, hi, scales, bits, group_size, use_cpp: bool = True):
    """K-blocked dequantize + BLAS GEMM; the block is dequantized by the C++ kernel when built
    (and ``use_cpp``), else in torch. Same numbers either way (see the comment below)."""
    n, ng, _ = lo.shape
    k = ng * group_size
    block_k = choose_block_k(k, group_size)
    gpb = block_k // group_size
    offset = 2 ** (bits - 1)
    # Products of small integer codes and scales are exact in float32, so
    # dequantizing in float32 then casting matches a float32 reference exactly.
    # Without a bf16 dot product the GEMM runs in float32, as the C++ op's blocked path does.
    wdtype = x.dtype if scales.dtype == x.dtype and (x.dtype != torch.bfloat16 or _bf16_gemm_is_native()) else torch.float32
    cpp = use_cpp and _cpp is not None and x.device.type == "cpu" and wdtype in (torch.float32, torch.bfloat16)
    s = scales.float().contiguous() if cpp else scales.to(wdtype)
    y = None
    for b in range(k // block_k):
        gs = slice(b * gpb, (b + 1) * gpb)
        if cpp:  # s * code is exact in float32; one rounding to wdtype, as in the torch branch
            w = _cpp.dequant(lo, hi, s, bits, group_size, b * gpb, (b + 1) * gpb, wdtype)
        else:
            codes = _unpack_groups(lo[:, gs], hi[:, gs] if hi.numel() else hi, offset)  # [N, bk]
            w = (codes.to(wdtype).view(n, gpb, group_size) * s[:, gs].unsqueeze(-1)).view(n, block_k)
        part = x[:, b * block_k : (b + 1) * block_k].to(wdtype) @ w.t()
        y = part if y is None else y.add_(part)
    return y.to(x.dtype)


def _bf16_gemm_is_native() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512-BF16 or AMX), so a bf16 GEMM is fast."""
    if _cpp is not None:
        return _cpp.bf16_gemm_is_native()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def cpu_gemm(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x`` [M, K] (any float dtype) -> ``y`` [M, N] in x's dtype, ``y = x @ W.T``.

    ``lo``/``hi``/``scales`` as produced by :func:`repack_for_cpu` (bits 2 or 3;
    ternary is passed as 2, its codes share the 2-bit storage). This is
    ``torch.ops.gsq.cpu_gemm``: registered by the C++ extension when it is built
    (few rows go to the fused kernel, more to a K-blocked dequantize + oneDNN
    GEMM, all without Python), else by :func:`_torch_cpu_gemm` below.
    """
    return torch.ops.gsq.cpu_gemm(x, lo, hi, scales, bits, group_size)


def _fake_cpu_gemm(x, lo, hi, scales, bits, group_size):
    return x.new_empty(x.shape[0], lo.shape[0])


def dense_kernel_wanted(weight: torch.Tensor) -> bool:
    """Whether ``gsq::cpu_dense`` should serve this unquantized bf16 weight ``[N, K]``: a CPU
    without a bf16 dot product (AVX2, AVX-512 before BF16), where vLLM cannot build its oneDNN
    bf16 handle and falls back to torch's bf16 linear, whose time grows with every row of x.
    ``GSQ_CPU_DENSE=0`` keeps vLLM's own path (to compare the two)."""
    return _bf16_dense_on_cpu(weight) and not _cpp.bf16_gemm_is_native()


def _bf16_dense_on_cpu(weight: torch.Tensor) -> bool:
    """A 2-D bf16 CPU weight that gsq::cpu_dense may serve (the kernel built, ``GSQ_CPU_DENSE`` not 0)."""
    return (_cpp is not None and os.environ.get("GSQ_CPU_DENSE", "1") != "0" and weight.device.type == "cpu"
            and weight.dtype == torch.bfloat16 and weight.dim() == 2)


def dense_one_row_wanted(weight: torch.Tensor) -> bool:
    """Whether ``gsq::cpu_dense`` should serve lm_head's calls with one row of x (batch-1 decode) on a
    CPU that has a bf16 dot product, where vLLM serves it with oneDNN (``onednn_mm``). One row
    reads the whole weight for one dot product per output; cpu_dense streams it nearer the
    memory's speed: lm_head 49152 x 2048 bf16, 2 threads, weights read from memory, 2-core
    AVX-512-BF16 EPYC (2026-12-07): 7.8-8.1 ms against oneDNN's 9.7-11.2 (49152 x 576: 3.35 vs
    3.95); from 2 rows oneDNN leads (at 4: 9.0 against 16.9). ``GSQ_CPU_DENSE=0`` keeps vLLM's path."""
    return _bf16_dense_on_cpu(weight) and _cpp.bf16_gemm_is_native()


def cpu_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] (any float dtype) -> ``x @ weight.T + bias`` in x's dtype, for a bf16
    ``weight`` [N, K] (``torch.ops.gsq.cpu_dense``; see :func:`dense_kernel_wanted`). Products and
    sums in float32, the result rounded once."""
    return torch.ops.gsq.cpu_dense(x, weight, bias)


def dense_int8_wanted() -> bool:
    """Whether ``GSQ_CPU_DENSE=int8`` asks for lm_head and the layers a checkpoint keeps in bf16 to
    be served with int8 weights (per output row) and int8 activations (per block of 32), by
    ``gsq::cpu_dense_int8``. Opt-in: it changes the logits a little (docs/results/cpu-serving.md, "int8 lm_head")."""
    return _cpp is not None and os.environ.get("GSQ_CPU_DENSE", "1") == "int8"


def quantize_dense_int8(weight: torch.Tensor, rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense weight ``[N, K]`` (any float dtype) -> ``(wq, ws)`` for :func:`cpu_dense_int8`:
    ``wq`` int8 ``[N, Kp]`` (``Kp`` = K rounded up to 32, zeros past K) with
    ``wq[n] = round(w[n] * 127 / max|w[n]|)``, and ``ws`` float32 ``[N]`` = ``max|w[n]| / 127``
    (0 for an all-zero row). Converted ``rows_per_chunk`` rows at a time, so a large vocabulary
    never needs a float32 copy of the whole weight."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_dense_int8: weight must be 2-D [N, K], got {tuple(weight.shape)}")
    n, k = weight.shape
    kp = -(-k // 32) * 32
    wq = torch.zeros(n, kp, dtype=torch.int8)
    ws = torch.empty(n, dtype=torch.float32)
    for n0 in range(0, n, rows_per_chunk):
        w = weight[n0:n0 + rows_per_chunk].to(torch.float32)
        amax = w.abs().amax(dim=1)
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        wq[n0:n0 + rows_per_chunk, :k] = torch.round(w * inv[:, None]).clamp_(-127, 127).to(torch.int8)
        ws[n0:n0 + rows_per_chunk] = amax / 127.0
    return wq, ws


def cpu_dense_int8(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [..., K] (any float dtype) -> ``x @ W.T + bias`` in x's dtype for W = ``ws[:, None] * wq``
    from :func:`quantize_dense_int8` (``torch.ops.gsq.cpu_dense_int8``). x is rounded to int8 per
    block of 32 columns (scale max|x| / 127); the block products are exact integers, summed in
    float32 with the block scales, and the result rounded once.

    With ``weight`` (the bf16 ``[N, K]`` that ``wq`` was made from), calls with more than 2 rows
    of x run on it instead (:func:`cpu_dense`, or torch's oneDNN linear where the CPU has a bf16
    dot product): there the int8 kernel's extra instructions per
    product cost more than the bytes it saves (csrc/cpu/gsq_cpu_gemm.cpp, kDenseInt8MaxRows). The
    choice is made inside the op, so a compiled graph keeps it for every batch size."""
    return torch.ops.gsq.cpu_dense_int8(x, wq, ws, weight, bias)


if _cpp is not None:  # the ops are defined by the extension; torch.compile needs their shape rules
    torch.library.register_fake("gsq::cpu_gemm")(_fake_cpu_gemm)

    @torch.library.register_fake("gsq::cpu_dense")
    def _fake_cpu_dense(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("gsq::cpu_dense_int8")
    def _fake_cpu_dense_int8(x, wq, ws, weight, bias):
        return x.new_empty(*x.shape[:-1], wq.shape[0])
else:

    @torch.library.custom_op("gsq::cpu_gemm", mutates_args=())
    def _torch_cpu_gemm(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scales: torch.Tensor, bits: int,
                        group_size: int) -> torch.Tensor:
        return _blocked_gemm(x, lo, hi, scales, bits, group_size)

    _torch_cpu_gemm.register_fake(_fake_cpu_gemm)

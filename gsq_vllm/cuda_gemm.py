"""Python face of the CUDA W2A16/W3A16 GEMM: ``C = A @ dequant(B).T``.

This module imports cleanly on CPU-only torch. The compiled op
``torch.ops.gsq.gemm`` comes from the extension ``gsq_vllm._C`` (csrc/) and is
used only when it is importable and the inputs are on a CUDA device; anything
else goes through :func:`dequant_matmul`, a plain dequantise + matmul.

Checkpoint layout (docs/FORMAT.md): ``qweight`` int32 ``[N, K*b/32]`` (offset
codes ``u = q + 2**(b-1)`` packed little-endian along K), ``scales`` fp16/bf16
``[N, K/G]``, ``W[n, k] = scales[n, k//G] * q[n, k]``.

Kernel layout (what :func:`repack` produces; also in docs/FORMAT.md)
--------------------------------------------------------------------
The kernel tiles the logical ``B = W.T`` (``[K, N]``) into 64 x 64 tiles
(``kb`` = k tile, ``nb`` = n tile). A block of 4 warps owns one n tile; warp
``w`` handles rows ``16w .. 16w+15`` of each k tile (one m16n8k16 k step) and
all 64 columns, as 8 mma n8-tiles ``j = 0..7``. Lane ``l`` has
``g = l // 4`` and ``t = l % 4``; the mma B fragment of n8-tile ``j`` holds
``B[k, n]`` for ``n = 8j + g`` and ``k = 2t, 2t+1`` (register ``r = 0``) and
``k = 2t+8, 2t+9`` (``r = 1``).

* 2-bit plane word ``lo[nb, kb, w, l, h]`` (``h = 0, 1``), int32: pair
  ``p = 0..7`` holds the code of ``(k = 16w + 2t + 8r, n = 64nb + 8j + g)``
  at bits ``[2p, 2p+2)`` and the code of ``k + 1`` (same n) at bits
  ``[16+2p, 16+2p+2)``, with ``j = 4h + p // 2`` and ``r = p % 2``. So
  ``(word >> 2p) & 0x00030003`` puts the two codes of one fragment register
  in the low bits of the two 16-bit halves, which OR-ed into the magic
  constant (fp16 1024.0 = 0x6400, bf16 128.0 = 0x4300) gives ``magic + u``
  exactly; subtracting ``magic + offset`` gives the signed code ``q``.
* 2-bit storage (bits 2 and ternary): the code is ``u`` (offset 2).
  3-bit storage: ``lo`` holds ``u & 3`` and a high-bit plane word
  ``hi[nb, kb, w, l]`` holds ``u >> 2`` of the code at ``lo`` word ``h`` bit
  ``2p`` at bit ``8h + p``, and that of bit ``16+2p`` at bit ``16 + 8h + p``
  (offset 4). The kernel ORs ``((hi >> (8h+p)) & 0x00010001) << 2`` into the
  2-bit pair: one shift, one and, one or more per register than 2-bit.
* Words are stored per lane contiguously, ``bits`` words per lane:
  ``b_repacked`` is int32 ``[N/64, (K/64) * 4 * 32 * bits]`` with the last dim
  ordered ``(kb, w, l, word)``, ``word = (lo_h0, lo_h1[, hi])``. A block's
  stage (one k tile) is one contiguous 1 KiB (2-bit) / 1.5 KiB (3-bit) run.
* ``s_repacked`` is ``[K/G, N]`` (scale dtype = activation dtype) with the
  columns of each 64-wide n tile permuted so lane group ``g`` reads its 8
  scales (``n = 8j + g``, ``j = 0..7``) as one 16-byte load:
  ``s_repacked[grp, 64nb + 8g + j] = scales[64nb + 8j + g, grp]``.

Supported by the kernel: bits 2, 3, 1.58; G in {64, 128}; N % 64 == 0;
K % 64 == 0 and K % G == 0; any M >= 1 (tiled by 16/32/64 rows; tuned for
M <= 256 -- above that it still beats dequantising the whole weight per call,
which is what the in-Python fallback would do).
"""

from __future__ import annotations

import torch

from gsq_vllm.format import FormatError, code_offset, normalize_bits, storage_bits, unpack_codes

TILE_N = 64
TILE_K = 64
WARPS = 4  # one m16n8k16 k step (16 rows of K) per warp within a k tile
LANES = 32
KERNEL_GROUP_SIZES = (64, 128)
REPACK_CHUNK_WEIGHTS = 1 << 24  # weights repacked per step (bounds load-time memory)
MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}  # bit patterns of 1024.0 / 128.0

_C = None
_C_ERROR: str | None = None


def _load_extension():
    """Import gsq_vllm._C once (it registers torch.ops.gsq.gemm) and its fake impl."""
    global _C, _C_ERROR
    if _C is not None or _C_ERROR is not None:
        return _C
    try:
        from gsq_vllm import _C as ext  # noqa: PLC0415
    except ImportError as e:
        _C_ERROR = str(e)
        return None
    _C = ext
    _register_fake()
    return _C


def _register_fake():
    # Shape-only implementation so torch.compile can trace through the op.
    @torch.library.register_fake("gsq::gemm")
    def _(a, b, s, bits, group_size, n, k):
        return a.new_empty((a.shape[0], n))


def cuda_kernel_available() -> bool:
    """True when the compiled extension imports and a CUDA device is present."""
    return torch.cuda.is_available() and _load_extension() is not None


def cuda_supports(n: int, k: int, bits, group_size: int) -> bool:
    """True when the kernel handles a weight ``[N=n, K=k]`` (for any M >= 1)."""
    try:
        b = normalize_bits(bits)
    except FormatError:
        return False
    return (
        b in (1.58, 2, 3)
        and group_size in KERNEL_GROUP_SIZES
        and n > 0
        and k > 0
        and n % TILE_N == 0
        and k % TILE_K == 0
        and k % group_size == 0
    )


def _check_supported(n: int, k: int, bits, group_size: int) -> None:
    if not cuda_supports(n, k, bits, group_size):
        raise ValueError(
            f"GSQ CUDA kernel does not support N={n}, K={k}, bits={bits}, G={group_size}: "
            f"needs bits in (1.58, 2, 3), G in {KERNEL_GROUP_SIZES}, N % {TILE_N} == 0, "
            f"K % {TILE_K} == 0 and K % G == 0 (use dequant_matmul for other shapes)"
        )


# --------------------------------------------------------------------------
# repack: checkpoint layout -> kernel layout (pure torch, any device)
# --------------------------------------------------------------------------


def _fragment_index():
    """Index tensors mapping kernel (w, l, h, p, half) -> (k, n) inside a 64x64 tile.

    Returns int64 ``k_idx, n_idx`` of shape ``[4, 32, 2, 8, 2]`` (warp, lane,
    lo word h, pair p, half = 0 for bits 2p / 1 for bits 16+2p).
    """
    w = torch.arange(WARPS).view(4, 1, 1, 1, 1)
    lane = torch.arange(LANES).view(1, 32, 1, 1, 1)
    h = torch.arange(2).view(1, 1, 2, 1, 1)
    p = torch.arange(8).view(1, 1, 1, 8, 1)
    half = torch.arange(2).view(1, 1, 1, 1, 2)
    g, t = lane // 4, lane % 4
    j, r = 4 * h + p // 2, p % 2
    k_idx = 16 * w + 2 * t + 8 * r + half
    n_idx = 8 * j + g
    return torch.broadcast_tensors(k_idx, n_idx)


def repack(
    qweight: torch.Tensor, scales: torch.Tensor, bits, group_size: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint layout -> kernel layout. Run once at load; pure torch, any device.

    Args:
        qweight: int32 ``[N, K*b/32]``, checkpoint packing (b = storage bits).
        scales: fp16/bf16/fp32 ``[N, K/G]``.
        bits: 2, 3 or 1.58 (ternary, stored as 2-bit).
        group_size: G, 64 or 128.
        dtype: dtype of the repacked scales (= the activation dtype the kernel
            runs with); default ``scales.dtype`` (fp32 scales become fp16).
    Returns:
        ``b_repacked`` int32 ``[N/64, (K/64)*128*b]`` and ``s_repacked``
        ``[K/G, N]`` in ``dtype``, laid out as in the module docstring.
    """
    sb = storage_bits(bits)
    n = qweight.shape[0]
    k = qweight.shape[1] * 32 // sb
    _check_supported(n, k, bits, group_size)
    if scales.shape != (n, k // group_size):
        raise ValueError(f"scales shape {tuple(scales.shape)} != {(n, k // group_size)}")
    dtype = dtype or (scales.dtype if scales.dtype in MAGIC else torch.float16)
    # int64 temporaries are ~16x the packed size: repack a few million weights at a time
    rows = max(TILE_N, (REPACK_CHUNK_WEIGHTS // k) // TILE_N * TILE_N)
    if n > rows:
        parts = [repack(qweight[i : i + rows], scales[i : i + rows], bits, group_size, dtype) for i in range(0, n, rows)]
        return torch.cat([b for b, _ in parts], 0), torch.cat([s for _, s in parts], 1)
    device = qweight.device

    u = (unpack_codes(qweight, bits).to(torch.int64) + code_offset(bits))  # [N, K] in [0, 2^sb)
    nt, kt = n // TILE_N, k // TILE_K
    # tiles[nb, kb, kk, nn] = u[64nb + nn, 64kb + kk]  (B = W.T, tiled)
    tiles = u.view(nt, TILE_N, kt, TILE_K).permute(0, 2, 3, 1)
    k_idx, n_idx = (x.to(device) for x in _fragment_index())
    frag = tiles[:, :, k_idx, n_idx]  # [nt, kt, 4, 32, 2(h), 8(p), 2(half)]
    bitpos = (2 * torch.arange(8, device=device)).view(8, 1) + torch.tensor([0, 16], device=device)
    lo = ((frag & 3) << bitpos).sum((-1, -2))  # [nt, kt, 4, 32, 2]
    words = [lo]
    if sb == 3:
        hipos = (8 * torch.arange(2, device=device)).view(2, 1, 1) + torch.arange(8, device=device).view(
            8, 1
        ) + torch.tensor([0, 16], device=device)
        hi = ((frag >> 2) << hipos).sum((-1, -2, -3))  # [nt, kt, 4, 32]
        words.append(hi.unsqueeze(-1))
    w = torch.cat(words, -1)  # [nt, kt, 4, 32, sb]
    w = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)
    b_repacked = w.reshape(nt, kt * WARPS * LANES * sb).contiguous()

    perm = torch.arange(TILE_N, device=device).view(8, 8).t().reshape(-1)  # 8g + j -> 8j + g
    s_t = scales.to(dtype).t()  # [K/G, N]
    s_repacked = s_t.reshape(k // group_size, nt, TILE_N)[:, :, perm].reshape(k // group_size, n).contiguous()
    return b_repacked, s_repacked


# --------------------------------------------------------------------------
# the fallback (no kernel): dequantise + matmul
# --------------------------------------------------------------------------


def dequant_matmul(
    a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits, group_size: int
) -> torch.Tensor:
    """Fallback from the checkpoint layout: ``a [M, K] @ dequant(qweight, scales).T``
    -> ``[M, N]`` in ``a.dtype`` (any device, any shape the format allows)."""
    codes = unpack_codes(qweight, bits)
    w = codes.to(a.dtype).view(codes.shape[0], -1, group_size) * scales.to(a.dtype).unsqueeze(-1)
    return a @ w.view(codes.shape).t()


def dequant_repacked(
    b_repacked: torch.Tensor, s_repacked: torch.Tensor, bits, group_size: int, n: int, k: int
) -> torch.Tensor:
    """Vectorised inverse of :func:`repack` (kernel layout -> ``W [N, K]`` in
    ``s_repacked.dtype``), used by the fallback of :func:`gsq_gemm`."""
    sb = storage_bits(bits)
    nt, kt = n // TILE_N, k // TILE_K
    device = b_repacked.device
    words = b_repacked.to(torch.int64).reshape(nt, kt, WARPS, LANES, sb) & 0xFFFFFFFF
    bitpos = (2 * torch.arange(8, device=device)).view(8, 1) + torch.tensor([0, 16], device=device)
    u = (words[..., :2, None, None] >> bitpos) & 3  # [nt, kt, 4, 32, 2, 8, 2]
    if sb == 3:
        hipos = (8 * torch.arange(2, device=device)).view(2, 1, 1) + torch.arange(8, device=device).view(
            8, 1
        ) + torch.tensor([0, 16], device=device)
        u = u | (((words[..., 2, None, None, None] >> hipos) & 1) << 2)
    k_idx, n_idx = (x.to(device) for x in _fragment_index())
    tiles = torch.empty(nt, kt, TILE_K, TILE_N, dtype=torch.int64, device=device)
    tiles[:, :, k_idx, n_idx] = u
    q = (tiles - code_offset(bits)).permute(0, 3, 1, 2).reshape(n, k)
    inv = torch.arange(TILE_N, device=device).view(8, 8).t().reshape(-1)  # 8j + g -> 8g + j
    s = s_repacked.reshape(-1, nt, TILE_N)[:, :, inv].reshape(-1, n).t()  # [N, K/G]
    return (q.to(s.dtype).view(n, -1, group_size) * s.unsqueeze(-1)).view(n, k)


def check_gemm_args(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, n: int,
                    k: int) -> None:
    """The argument checks of ``torch.ops.gsq.gemm`` (and its emulated twin): ``bits`` is
    the storage width (2 or 3). Raises ValueError naming what is wrong."""
    if bits not in (2, 3):
        raise ValueError(f"bits (storage) must be 2 or 3, got {bits}")
    _check_supported(n, k, bits, group_size)
    if a.dim() != 2 or a.shape[1] != k:
        raise ValueError(f"a must be [M, {k}], got {tuple(a.shape)}")
    if a.dtype not in MAGIC or s.dtype != a.dtype:
        raise ValueError(f"a ({a.dtype}) and s_repacked ({s.dtype}) must both be fp16 or bf16")
    if b.dtype != torch.int32 or b.shape != (n // TILE_N, k // TILE_K * WARPS * LANES * bits):
        raise ValueError(f"b_repacked ({b.dtype}, {tuple(b.shape)}) does not match N={n}, K={k}, bits={bits}")
    if s.shape != (k // group_size, n):
        raise ValueError(f"s_repacked shape {tuple(s.shape)} != {(k // group_size, n)}")


def gsq_gemm(
    a: torch.Tensor,
    b_repacked: torch.Tensor,
    s_repacked: torch.Tensor,
    bits,
    group_size: int,
    n: int,
    k: int,
) -> torch.Tensor:
    """``c = a @ dequant(B).T`` with B in the kernel layout (from :func:`repack`).

    Args:
        a: fp16/bf16 ``[M, K]`` row-major (the dtype must match ``s_repacked``).
        b_repacked: int32 ``[N/64, (K/64)*128*b]``; s_repacked: ``[K/G, N]``.
    Returns:
        ``c`` ``[M, N]``, dtype of ``a``, fp32 accumulation. Runs
        ``torch.ops.gsq.gemm`` on CUDA when available, else dequantise +
        matmul (CPU tensors, or no extension). Raises ValueError for shapes the kernel
        layout cannot describe.
    """
    check_gemm_args(a, b_repacked, s_repacked, storage_bits(bits), group_size, n, k)
    sb = storage_bits(bits)
    use_kernel = (
        a.is_cuda
        and a.shape[0] >= 1
        and (_C is not None or _load_extension() is not None)  # plain global read under torch.compile
    )
    if use_kernel:
        a = a.contiguous()
        # cp.async needs 16-byte aligned rows; a sliced view may start mid-block
        # (under torch.compile data pointers are unknown; the op itself checks)
        if not torch.compiler.is_compiling() and a.data_ptr() % 16 != 0:
            a = a.clone()
        return torch.ops.gsq.gemm(a, b_repacked, s_repacked, sb, group_size, n, k)
    w = dequant_repacked(b_repacked, s_repacked, bits, group_size, n, k)
    return a @ w.t()

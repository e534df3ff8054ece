"""Python face of the CUDA W2A16/W3A16 GEMM: ``C = A @ dequant(B).T``.

This module imports cleanly on CPU-only torch. The compiled op
``torch.ops.gsq.gemm`` comes from the extension ``gsq_vllm._C`` (csrc/) and is
used only when it is importable and the inputs are on a CUDA device; anything
else goes through :func:`dequant_repacked` + matmul. ``torch.ops.gsq.gemm_emulated``
(gsq_vllm/cuda_emu.py) runs the same kernel source on the CPU.

Checkpoint layout (docs/FORMAT.md): ``qweight`` int32 ``[N, K*b/32]`` (offset
codes ``u = q + 2**(b-1)`` packed little-endian along K), ``scales`` fp16/bf16
``[N, K/G]``, ``W[n, k] = scales[n, k//G] * q[n, k]``.

Kernel layout (what :func:`repack` produces; also docs/FORMAT.md)
--------------------------------------------------------------------
The weights are the A operand of mma.m16n8k16 (16 output rows x 16 k), so
one mma takes 256 weights. A *tile* is 16 rows x CK k, CK = 128 or 64
(:func:`chunk_k`, the kernel's rule); a *row block* is 4 tiles (64 rows);
an *item* is one row block x one chunk, stored contiguously, items in
(row block, chunk) order: ``b_repacked`` is int32 ``[N/64, (K/CK) * 4 * 32 * W]``
with ``W = CK * b / 64`` words per lane per tile.

Inside a tile, lane ``l = 4g + t`` holds for k step ``s`` and fragment
register ``r`` the code pair ``p = 4s + r``: rows ``g`` (r even) or ``g + 8``
(r odd), k ``= 16s + 2t + 8 (r // 2) + {0, 1}``. The first code of a pair
sits in the low half of a word, the second 16 bits higher:

* 2-bit: pair ``p`` in word ``p // 8`` at bits ``2 (p % 8)``;
* 3-bit: in runs of 16 pairs (4 k steps) over 3 words, five 3-bit fields per
  word at bits ``3f`` plus a spare pair in bit 15 (and 31) of the 3 words (one
  code bit per word); the run's pairs of rows ``g`` and of rows ``g + 8`` take
  the slots ``SLOTS3_ROWS_LO`` / ``SLOTS3_ROWS_HI`` in (k step, r) order.

A lane's W words are stored in planes of 4, 2 and 1 words (``[lane][4]``,
then ``[lane][2]``, ``[lane][1]``), so every load is aligned and coalesced.
The kernel masks each pair in place next to a magic number that puts the
code at weight 1; the magic and the offset come off exactly (an extra mma of
a constant at decode, an HSUB2 at prefill), so the tensor cores see the
signed codes ``q``; the group scale is applied to the fp32 partial sums.

``s_repacked`` is ``[N/64, (K/G) * 64]`` in the activation dtype: for row
block ``rb`` and group ``j``, 64 values ordered ``[g][tile][half]`` =
``scales[64 rb + 16 tile + g + 8 half, j]`` (lane group ``g`` reads its 8
scales, rows ``g`` and ``g + 8`` of the 4 tiles, as one 16-byte load).

The layout has exactly the checkpoint's bytes (no padding), for any M >= 1.

Which weights the kernel takes (group sizes, storage bits, N and K multiples)
and the chunk of K are stated once, in ``csrc/gsq_rules.h``; this module reads
them from the extension (:func:`shape_rules`, :func:`chunk_k`): ``gsq_vllm._C``
where it is built, else the CPU extension ``gsq_vllm._C_cpu``, which compiles
the same header, so the repack and the emulator work on CPU machines.
"""

from __future__ import annotations

import torch

from gsq_format.format import FormatError, code_offset, storage_bits, unpack_codes

ROW_BLOCK = 64  # 4 tiles of 16 rows (the layout's; the rules require N to be a multiple)
TILES = 4
LANES = 32
REPACK_CHUNK_WEIGHTS = 1 << 24  # weights repacked per step (bounds load-time memory)
MAGIC = {torch.float16: 0x6400, torch.bfloat16: 0x4300}  # the dtypes the kernel takes

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


_rules_ext = None  # (module, prefix of its rule functions), found once


def _rules_module():
    """The extension the kernel's rules (csrc/gsq_rules.h) are read from, and the prefix of their
    names there: gsq_vllm._C, else gsq_vllm._C_cpu ("cuda_..."). None when neither is built."""
    global _rules_ext
    if _rules_ext is None:
        if _load_extension() is not None:
            _rules_ext = (_C, "")
        else:
            from gsq_vllm import cpu_gemm

            cpp = cpu_gemm._cpp
            _rules_ext = (cpp, "cuda_") if cpp is not None and hasattr(cpp, "cuda_shape_rules") else (None, "")
    return _rules_ext


def _rule(name: str):
    ext, prefix = _rules_module()
    if ext is None:
        raise RuntimeError("the CUDA kernel's shape rules (csrc/gsq_rules.h) are read from gsq_vllm._C or "
                           "gsq_vllm._C_cpu, and neither is built here (or _C_cpu is older than the rules): "
                           "pip install --no-build-isolation -e .")
    return getattr(ext, prefix + name)


def shape_rules() -> dict:
    """The kernel's shape rules: ``group_sizes``, ``storage_bits``, and ``n_multiple`` /
    ``k_multiple`` (what N and K must be multiples of), from the extension."""
    return _rule("shape_rules")()


def shape_problem(n: int, k: int, bits, group_size: int) -> str | None:
    """None when the kernel takes a weight ``[N=n, K=k]`` (for any M >= 1), else why not."""
    try:
        sb = storage_bits(bits)
        ok = _rule("shape_ok")(n, k, sb, group_size)
    except (FormatError, RuntimeError, TypeError) as e:  # TypeError: a size past the C++ int
        return f"N={n}, K={k}, bits={bits}, G={group_size}: {e}"
    if ok:
        return None
    r = shape_rules()
    return (f"N={n}, K={k}, bits={bits}, G={group_size}: needs storage bits in {r['storage_bits']}, "
            f"G in {r['group_sizes']}, N % {r['n_multiple']} == 0, K % {r['k_multiple']} == 0 and K % G == 0")


def cuda_supports(n: int, k: int, bits, group_size: int) -> bool:
    """True when the kernel handles a weight ``[N=n, K=k]`` (for any M >= 1)."""
    return shape_problem(n, k, bits, group_size) is None


def _check_supported(n: int, k: int, bits, group_size: int) -> None:
    why = shape_problem(n, k, bits, group_size)
    if why is not None:
        raise ValueError(f"GSQ CUDA kernel does not support {why} (use dequant_matmul for other shapes)")


# --------------------------------------------------------------------------
# repack: checkpoint layout -> kernel layout (pure torch, any device)
# --------------------------------------------------------------------------


def chunk_k(k: int, group_size: int) -> int:
    """The kernel's chunk of K (CK, 64 or 128), as csrc/gsq_rules.h states it."""
    return _rule("chunk_k")(k, group_size)


def words_per_lane(ck: int, sb: int) -> int:
    return ck * sb // 64


def _planes(words: int) -> list[int]:
    """A lane's words are stored as planes of these widths (4, 2, 1)."""
    return [v for v in (4, 2, 1) if words & v]


def _pair_index(ck: int):
    """(row, k) of code pair p inside a tile, per lane: int64 ``rows, ks`` of shape
    ``[32, 4 * ck // 16, 2]`` (lane, pair, first/second code)."""
    lane = torch.arange(LANES).view(32, 1, 1)
    p = torch.arange(4 * ck // 16).view(1, -1, 1)
    half = torch.arange(2).view(1, 1, 2)
    g, t = lane // 4, lane % 4
    step, r = p // 4, p % 4
    rows = g + 8 * (r % 2) + 0 * half
    ks = 16 * step + 2 * t + 8 * (r // 2) + half
    return torch.broadcast_tensors(rows, ks)


# 3-bit: in each run of 16 pairs (4 k steps) the 8 pairs of rows g (r even) and the 8 of rows
# g + 8 (r odd), in (k step, r) order, take these (word in the run, field) slots; field f sits at
# bits 3f, field 5 is the spare pair (bit 15 of words 0, 1, 2 = code bits 0, 1, 2).
SLOTS3_ROWS_LO = [(0, 0), (0, 2), (0, 4), (1, 0), (1, 2), (2, 0), (2, 2), (0, 5)]
SLOTS3_ROWS_HI = [(0, 1), (0, 3), (1, 1), (1, 3), (1, 4), (2, 1), (2, 3), (2, 4)]


def _code_slots(sb: int, pairs: int):
    """For each pair and code bit, the (word, bit) holding the pair's first code's bit (the
    second code is 16 bits higher): int64 ``word[pairs, sb]``, ``bit[pairs, sb]``."""
    word = torch.empty(pairs, sb, dtype=torch.int64)
    bit = torch.empty(pairs, sb, dtype=torch.int64)
    for p in range(pairs):
        for cb in range(sb):
            if sb == 2:
                word[p, cb], bit[p, cb] = p // 8, 2 * (p % 8) + cb
                continue
            run, i, r = p // 16, p % 16, p % 4
            w, f = (SLOTS3_ROWS_HI if r % 2 else SLOTS3_ROWS_LO)[i // 4 * 2 + r // 2]
            word[p, cb], bit[p, cb] = (3 * run + cb, 15) if f == 5 else (3 * run + w, 3 * f + cb)
    return word, bit


def _plane_order(words: int) -> torch.Tensor:
    """Permutation: position in the stored tile ([plane][lane][v]) -> (lane, word) index
    ``lane * words + word``."""
    order = []
    start = 0
    for v in _planes(words):
        for lane in range(LANES):
            order += [lane * words + start + j for j in range(v)]
        start += v
    return torch.tensor(order)


def repack(
    qweight: torch.Tensor, scales: torch.Tensor, bits, group_size: int, dtype: torch.dtype | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint layout -> kernel layout. Run once at load; pure torch, any device.

    Args:
        qweight: int32 ``[N, K*b/32]``, checkpoint packing (b = storage bits).
        scales: fp16/bf16/fp32 ``[N, K/G]``.
        bits: 2, 3 or 1.58 (ternary, stored as 2-bit).
        group_size: G (the kernel's group sizes: :func:`shape_rules`).
        dtype: dtype of the repacked scales (= the activation dtype the kernel
            runs with); default ``scales.dtype`` (fp32 scales become fp16).
        check: False where the caller has checked the shape against the rules
            (the plugin's kernel, whose ``supports`` did at load).
    Returns:
        ``b_repacked`` int32 ``[N/64, (K/CK)*128*W]`` and ``s_repacked``
        ``[N/64, (K/G)*64]`` in ``dtype``, laid out as in the module docstring.
    """
    sb = storage_bits(bits)
    n = qweight.shape[0]
    k = qweight.shape[1] * 32 // sb
    if check:
        _check_supported(n, k, bits, group_size)
    if scales.shape != (n, k // group_size):
        raise ValueError(f"scales shape {tuple(scales.shape)} != {(n, k // group_size)}")
    dtype = dtype or (scales.dtype if scales.dtype in MAGIC else torch.float16)
    ck = chunk_k(k, group_size)
    # int64 temporaries are ~16x the packed size: repack a few million weights at a time
    rows_per = max(ROW_BLOCK, (REPACK_CHUNK_WEIGHTS // k) // ROW_BLOCK * ROW_BLOCK)
    parts = [_repack_rows(qweight[i : i + rows_per], scales[i : i + rows_per], bits, group_size, dtype, ck)
             for i in range(0, n, rows_per)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([b for b, _ in parts], 0), torch.cat([s for _, s in parts], 0)


def _repack_rows(qweight, scales, bits, group_size: int, dtype: torch.dtype, ck: int):
    """:func:`repack` of some whole row blocks, checked by the caller."""
    sb = storage_bits(bits)
    n = qweight.shape[0]
    k = qweight.shape[1] * 32 // sb
    device = qweight.device
    nb, nc = n // ROW_BLOCK, k // ck
    words = words_per_lane(ck, sb)
    u = unpack_codes(qweight, bits).to(torch.int64) + code_offset(bits)  # [N, K] in [0, 2^sb)
    # tiles[rb, c, tile, row, kk] = u[64 rb + 16 tile + row, ck c + kk]
    tiles = u.view(nb, TILES, 16, nc, ck).permute(0, 3, 1, 2, 4)
    rows, ks = (x.to(device) for x in _pair_index(ck))
    codes = tiles[:, :, :, rows, ks]  # [nb, nc, 4, 32, pairs, 2]
    wi, bi = (x.to(device) for x in _code_slots(sb, codes.shape[-2]))
    halves = torch.tensor([0, 16], device=device)
    acc = torch.zeros(nb, nc, TILES, LANES, words, dtype=torch.int64, device=device)
    for cb in range(sb):  # scatter each code bit into its (word, bit)
        bitv = (codes >> cb) & 1  # [..., pairs, 2]
        shifted = bitv << (bi[:, cb].view(-1, 1) + halves)  # [..., pairs, 2]
        acc.index_add_(-1, wi[:, cb], shifted.sum(-1))
    flat = acc.view(nb, nc, TILES, LANES * words)[..., _plane_order(words).to(device)]
    flat = torch.where(flat >= 2**31, flat - 2**32, flat).to(torch.int32)
    b_repacked = flat.reshape(nb, nc * TILES * LANES * words).contiguous()
    # scales: [rb][group][g][tile][half] = scales[64 rb + 16 tile + g + 8 half, group]
    sv = scales.to(dtype).view(nb, TILES, 2, 8, k // group_size)  # [rb, tile, half, g, group]
    s_repacked = sv.permute(0, 4, 3, 1, 2).reshape(nb, (k // group_size) * 64).contiguous()
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
    """Inverse of :func:`repack` (kernel layout -> ``W [N, K]`` in ``s_repacked.dtype``,
    each weight ``q * s`` rounded once), for the no-kernel fallback of :func:`gsq_gemm`."""
    sb = storage_bits(bits)
    device = b_repacked.device
    ck = chunk_k(k, group_size)
    nb, nc = n // ROW_BLOCK, k // ck
    words = words_per_lane(ck, sb)
    stored = b_repacked.to(torch.int64).reshape(nb, nc, TILES, LANES * words) & 0xFFFFFFFF
    acc = torch.empty_like(stored)
    acc[..., _plane_order(words).to(device)] = stored
    acc = acc.view(nb, nc, TILES, LANES, words)
    wi, bi = (x.to(device) for x in _code_slots(sb, 4 * ck // 16))
    halves = torch.tensor([0, 16], device=device)
    codes = torch.zeros(nb, nc, TILES, LANES, 4 * ck // 16, 2, dtype=torch.int64, device=device)
    for cb in range(sb):
        w = acc[..., wi[:, cb]]  # [..., pairs]
        codes |= ((w.unsqueeze(-1) >> (bi[:, cb].view(-1, 1) + halves)) & 1) << cb
    rows, ks = (x.to(device) for x in _pair_index(ck))
    tiles = torch.empty(nb, nc, TILES, 16, ck, dtype=torch.int64, device=device)
    tiles[:, :, :, rows, ks] = codes
    q = (tiles - code_offset(bits)).permute(0, 2, 3, 1, 4).reshape(n, k)
    s = s_repacked.view(nb, k // group_size, 8, TILES, 2).permute(0, 3, 4, 2, 1).reshape(n, k // group_size)
    return (q.to(s.dtype).view(n, -1, group_size) * s.unsqueeze(-1)).view(n, k)


def check_gemm_args(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, n: int,
                    k: int) -> None:
    """The argument checks of ``torch.ops.gsq.gemm`` (and its emulated twin): ``bits`` is
    the storage width. Raises ValueError naming what is wrong."""
    if bits not in shape_rules()["storage_bits"]:
        raise ValueError(f"bits (storage) must be one of {shape_rules()['storage_bits']}, got {bits}")
    _check_supported(n, k, bits, group_size)
    if a.dim() != 2 or a.shape[1] != k:
        raise ValueError(f"a must be [M, {k}], got {tuple(a.shape)}")
    if a.dtype not in MAGIC or s.dtype != a.dtype:
        raise ValueError(f"a ({a.dtype}) and s_repacked ({s.dtype}) must both be fp16 or bf16")
    if b.dtype != torch.int32 or b.shape != (n // ROW_BLOCK, k * 64 * bits // 32):
        raise ValueError(f"b_repacked ({b.dtype}, {tuple(b.shape)}) does not match N={n}, K={k}, bits={bits}")
    if s.shape != (n // ROW_BLOCK, k // group_size * 64):
        raise ValueError(f"s_repacked shape {tuple(s.shape)} != {(n // ROW_BLOCK, k // group_size * 64)}")


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
        b_repacked: int32 ``[N/64, K*2*b]``; s_repacked: ``[N/64, (K/G)*64]``.
    Returns:
        ``c`` ``[M, N]``, dtype of ``a``, fp32 accumulation. Runs
        ``torch.ops.gsq.gemm`` on CUDA when available, else dequantise +
        matmul (CPU tensors, or no extension). Raises ValueError for shapes the kernel
        layout cannot describe.
    """
    check_gemm_args(a, b_repacked, s_repacked, storage_bits(bits), group_size, n, k)
    use_kernel = (
        a.is_cuda
        and a.shape[0] >= 1
        and (_C is not None or _load_extension() is not None)  # plain global read under torch.compile
    )
    if use_kernel:
        return launch(a, b_repacked, s_repacked, storage_bits(bits), group_size, n, k)
    w = dequant_repacked(b_repacked, s_repacked, bits, group_size, n, k)
    return a @ w.t()


def launch(a: torch.Tensor, b_repacked: torch.Tensor, s_repacked: torch.Tensor, sb: int, group_size: int, n: int,
           k: int) -> torch.Tensor:
    """``torch.ops.gsq.gemm`` on CUDA tensors without :func:`gsq_gemm`'s Python checks (the op checks
    its arguments itself): what a layer whose weight was checked at load runs on every call. ``sb``
    is the storage width."""
    a = a.contiguous()
    # cp.async needs 16-byte aligned rows; a sliced view may start mid-block
    # (under torch.compile data pointers are unknown; the op itself checks)
    if not torch.compiler.is_compiling() and a.data_ptr() % 16 != 0:
        a = a.clone()
    return torch.ops.gsq.gemm(a, b_repacked, s_repacked, sb, group_size, n, k)

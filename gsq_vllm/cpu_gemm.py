"""CPU path of the GSQ linear: ``y = x @ W.T`` from packed 2/3-bit codes.

No dequantized weight is kept: :func:`repack_for_cpu` turns the checkpoint's
int32 ``qweight`` into *bit planes* laid out per K-block, and every call
dequantizes one K-block at a time (``[N, block_k]`` transient) and
accumulates ``x[:, block] @ W_block.T``. Peak extra memory per call is one
block, never the whole layer or model.

CPU layout (per linear, ``B = K // block_k`` blocks):

* ``lo``  uint8 ``[N, B, block_k // 4]``: bits 0-1 of the offset code ``u``.
  Byte ``j`` of block ``b`` holds codes ``j + i * block_k/4`` (i = 0..3) at
  bits ``2i``; planar so unpacking is 4 shifts of one contiguous tensor.
* ``hi``  uint8 ``[N, B, block_k // 8]`` (3-bit only, else ``[0]``): bit 2
  of ``u``; byte ``j`` holds codes ``j + i * block_k/8`` (i = 0..7) at bit ``i``.
* ``scales`` ``[N, K // G]`` in the checkpoint's scale dtype, unchanged.

Memory: exactly ``storage_bits`` bits per weight plus scales, as on disk.
The GEMM is a ``torch.library`` custom op (``gsq::cpu_gemm``) with a fake
impl so torch.compile can trace through it.
"""

from __future__ import annotations

import torch

from gsq_vllm.format import code_offset, storage_bits, unpack_codes

MAX_BLOCK_K = 1024


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


def repack_for_cpu(
    qweight: torch.Tensor, bits: float | int, block_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint ``qweight`` int32 ``[N, K*b/32]`` -> (``lo``, ``hi``) bit planes (see module doc)."""
    sb = storage_bits(bits)
    u = (unpack_codes(qweight, bits).to(torch.int16) + code_offset(bits)).to(torch.uint8)  # [N, K]
    n, k = u.shape
    nb = k // block_k
    u = u.reshape(n, nb, block_k)
    low = (u & 0x3).reshape(n, nb, 4, block_k // 4)
    lo = torch.zeros(n, nb, block_k // 4, dtype=torch.uint8)
    for i in range(4):
        lo |= low[:, :, i, :] << (2 * i)
    if sb == 2:
        return lo.contiguous(), torch.zeros(0, dtype=torch.uint8)
    high = (u >> 2).reshape(n, nb, 8, block_k // 8)
    hi = torch.zeros(n, nb, block_k // 8, dtype=torch.uint8)
    for i in range(8):
        hi |= high[:, :, i, :] << i
    return lo.contiguous(), hi.contiguous()


def _unpack_block(lo_b: torch.Tensor, hi_b: torch.Tensor, offset: int) -> torch.Tensor:
    """One block's planes (``[N, bk/4]``, ``[N, bk/8]`` or empty) -> signed codes int8 ``[N, bk]``."""
    n = lo_b.shape[0]
    shifts2 = torch.arange(0, 8, 2, dtype=torch.uint8)
    u = (lo_b.unsqueeze(1) >> shifts2.view(1, 4, 1)) & 0x3  # [N, 4, bk/4]
    u = u.reshape(n, -1)
    if hi_b.numel():
        shifts1 = torch.arange(8, dtype=torch.uint8)
        h = (hi_b.unsqueeze(1) >> shifts1.view(1, 8, 1)) & 0x1  # [N, 8, bk/8]
        u = u | (h.reshape(n, -1) << 2)
    return u.to(torch.int8) - offset


@torch.library.custom_op("gsq::cpu_gemm", mutates_args=())
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
    ternary is passed as 2, its codes share the 2-bit storage).
    """
    n, nb, quarter = lo.shape
    block_k = quarter * 4
    offset = 2 ** (bits - 1)
    groups_per_block = block_k // group_size
    # Products of small integer codes and scales are exact in float32, so
    # dequantizing in float32 then casting matches a float32 reference exactly.
    wdtype = x.dtype if scales.dtype == x.dtype else torch.float32
    s = scales.to(wdtype)
    y = None
    for b in range(nb):
        codes = _unpack_block(lo[:, b], hi[:, b] if hi.numel() else hi, offset)  # [N, bk]
        sb = s[:, b * groups_per_block : (b + 1) * groups_per_block]  # [N, bk/G]
        w = (codes.to(wdtype).view(n, groups_per_block, group_size) * sb.unsqueeze(-1)).view(n, block_k)
        w = w.to(x.dtype)
        part = x[:, b * block_k : (b + 1) * block_k] @ w.t()
        y = part if y is None else y.add_(part)
    return y


@cpu_gemm.register_fake
def _(x, lo, hi, scales, bits, group_size):
    return x.new_empty(x.shape[0], lo.shape[0])

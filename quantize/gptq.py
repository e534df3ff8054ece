"""GPTQ (Frantar et al. 2022) with group-wise symmetric scales fixed per group.

Columns are quantized left to right (act-order off by default, because the
kernels need groups in column order); the error of each quantized column is
spread onto the not-yet-quantized columns through the inverse Hessian's
Cholesky factor, applied lazily in blocks of columns.
"""

from __future__ import annotations

import torch

from gsq_vllm.format import check_group_size
from quantize.qtypes import QuantizedWeight
from quantize.rtn import mse_scales, round_to_grid


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_search: str = "gptq-ref",
) -> QuantizedWeight:
    """Quantize weight ``[N, K]`` given the layer-input Hessian float32 ``[K, K]`` (sum of x x^T).

    ``damp``: fraction of the mean Hessian diagonal added to the diagonal.
    ``block_size``: columns per lazy update (rounded up to a multiple of G so
    each group's scale is chosen on fully updated columns).
    ``act_order``: quantize columns by decreasing Hessian diagonal; scales
    are then fixed up front per group from the original weights (static groups).
    """
    n, k = w.shape
    check_group_size(k, group_size)
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    ngroups = k // group_size
    scales = torch.zeros(n, ngroups, device=W.device)
    if act_order:
        for g in range(ngroups):
            cols = slice(g * group_size, (g + 1) * group_size)
            scales[:, g] = mse_scales(W[:, cols], bits, search=scale_search).squeeze(1)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(k, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    perm_host = perm.tolist()  # one device sync, not one per column
    block_size = max(group_size, (block_size // group_size) * group_size)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = perm_host[col]
            g = orig // group_size
            if not act_order and col % group_size == 0:
                scales[:, g] = mse_scales(W1[:, i : i + group_size], bits, search=scale_search).squeeze(1)
            s = scales[:, g]
            q = round_to_grid(W1[:, i], s, bits)
            Q1[:, i] = q
            err = (W1[:, i] - s * q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return QuantizedWeight(codes.to(torch.int8), scales, bits, group_size)

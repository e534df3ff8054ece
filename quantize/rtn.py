"""Round-to-nearest group quantization with a per-group MSE-optimal clipping search."""

from __future__ import annotations

import torch

from gsq_vllm.format import check_group_size, grid_range
from quantize.qtypes import QuantizedWeight

# Candidate scales are ``absmax * c / qmax`` for c on this grid: c = 1 never
# clips the positive side, smaller c trades clipping for finer steps.
CLIP_GRID = torch.linspace(0.2, 1.0, 41)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, bits) -> torch.Tensor:
    """Signed codes (float, same shape as ``w``) = clamp(round(w / scale)) on the grid of ``bits``."""
    qmin, qmax = grid_range(bits)
    return torch.clamp(torch.round(w / scale), qmin, qmax)


def mse_scales(w: torch.Tensor, bits, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row scale of ``w`` [R, G] (float32) minimizing the (optionally column-weighted) squared error.

    ``weight``: optional float32 ``[G]`` importance per column (e.g. Hessian diagonal).
    Returns float32 ``[R, 1]``, strictly positive (rows of zeros get scale 1).
    """
    _, qmax = grid_range(bits)
    absmax = w.abs().amax(dim=1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax / qmax
    for c in CLIP_GRID.tolist():
        s = absmax * (c / qmax)
        err = (w - s * round_to_grid(w, s, bits)).pow(2)
        if weight is not None:
            err = err * weight
        err = err.sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def rtn_quantize(w: torch.Tensor, bits, group_size: int) -> QuantizedWeight:
    """Quantize weight float ``[N, K]`` group-wise along K with MSE-optimal clipping per group."""
    n, k = w.shape
    check_group_size(k, group_size)
    wg = w.float().reshape(n * (k // group_size), group_size)
    s = mse_scales(wg, bits)
    codes = round_to_grid(wg, s, bits).to(torch.int8).reshape(n, k)
    return QuantizedWeight(codes, s.reshape(n, k // group_size), bits, group_size)

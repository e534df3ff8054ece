"""Round-to-nearest group quantization with a per-group MSE-optimal clipping search."""

from __future__ import annotations

import torch

from gsq_vllm.format import check_group_size, grid_range
from quantize.qtypes import QuantizedWeight

# Candidate scales are ``absmax * c / qmax`` for c on this grid: c = 1 never
# clips the positive side, smaller c trades clipping for finer steps.
CLIP_GRID = torch.linspace(0.2, 1.0, 41, device="cpu").tolist()
SCALE_SEARCHES = ("mse", "gptq-ref")


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, bits) -> torch.Tensor:
    """Signed codes (float, same shape as ``w``) = clamp(round(w / scale)) on the grid of ``bits``."""
    qmin, qmax = grid_range(bits)
    return torch.clamp(torch.round(w / scale), qmin, qmax)


def _candidates(bits, search: str) -> list[float]:
    """Scale candidates as multiples of a row's absmax.

    * ``mse``: ``c / qmax`` for c in CLIP_GRID (41 points, 0.2 .. 1);
    * ``gptq-ref`` (the GSQ reference's GPTQ init): 80 shrink factors p = 1, 0.99, .. 0.21 of
      two natural scales, ``absmax / qmax`` and the range-centred ``2 absmax / (2^b - 1)``, and at
      2 bits the same negated: a negative scale mirrors the asymmetric grid {-2, -1, 0, 1} to
      {-1, 0, 1, 2}, which a row whose large weights are positive needs (Lion's small scale steps
      in GSQ can never flip a sign later).
    """
    qmin, qmax = grid_range(bits)
    if search == "mse":
        return [c / qmax for c in CLIP_GRID]
    if search != "gptq-ref":
        raise ValueError(f"scale search must be one of {SCALE_SEARCHES}, got {search!r}")
    bases = [1 / qmax, 2 / (qmax - qmin)]
    out = [b * (1 - i / 100) for b in bases for i in range(80)]
    if bits == 2:  # the reference mirrors only the 2-bit grid
        out += [-x for x in out]
    return out


def mse_scales(w: torch.Tensor, bits, weight: torch.Tensor | None = None, search: str = "mse") -> torch.Tensor:
    """Per-row scale of ``w`` [R, G] (float32) minimizing the group's rounding error.

    ``search``: ``mse`` -- squared error over 41 positive clip factors; ``gptq-ref`` -- |error|^2.4
    over 80 clip factors of two base scales, and negative scales at 2 bits (see _candidates).
    ``weight``: optional float32 ``[G]`` importance per column (e.g. Hessian diagonal).
    Returns float32 ``[R, 1]``, never zero (rows of zeros get scale 1).
    """
    power = 2.0 if search == "mse" else 2.4
    absmax = w.abs().amax(dim=1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax / grid_range(bits)[1]
    for c in _candidates(bits, search):
        s = absmax * c
        err = (w - s * round_to_grid(w, s, bits)).abs().pow(power)
        if weight is not None:
            err = err * weight
        err = err.sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def rtn_quantize(w: torch.Tensor, bits, group_size: int, search: str = "gptq-ref") -> QuantizedWeight:
    """Quantize weight float ``[N, K]`` group-wise along K with an error-optimal scale per group."""
    n, k = w.shape
    check_group_size(k, group_size)
    wg = w.float().reshape(n * (k // group_size), group_size)
    s = mse_scales(wg, bits, search=search)
    codes = round_to_grid(wg, s, bits).to(torch.int8).reshape(n, k)
    return QuantizedWeight(codes, s.reshape(n, k // group_size), bits, group_size)

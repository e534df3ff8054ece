"""Types shared by the quantizers (RTN, GPTQ, GSQ) and the block pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gsq_format.format import dequantize, grid_range


@dataclass
class QuantizedWeight:
    """One quantized linear, before packing.

    codes:  int8 ``[N, K]``, signed, on the grid of ``bits`` (see grid_range).
    scales: float32 ``[N, K // group_size]``, one per output row and input group.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    bits: float | int
    group_size: int

    def __post_init__(self) -> None:
        qmin, qmax = grid_range(self.bits)
        n, k = self.codes.shape
        assert self.codes.dtype == torch.int8, self.codes.dtype
        assert self.scales.shape == (n, k // self.group_size), (self.scales.shape, self.codes.shape)
        assert int(self.codes.min()) >= qmin and int(self.codes.max()) <= qmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weight ``[N, K]`` = scales (broadcast over each group) * codes."""
        return dequantize(self.codes, self.scales, self.group_size, dtype)

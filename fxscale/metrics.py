"""Accuracy measures for comparing a low-precision result with its reference."""

from __future__ import annotations

import math

import torch

__all__ = ["sqnr_db"]


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio ``10 log10(sum ref^2 / sum (ref - y)^2)``, in dB.

    Computed in float64; ``inf`` when ``y == ref`` exactly, NaN if either holds NaN.

    >>> sqnr_db(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.1]))  # doctest: +ELLIPSIS
    26.98...
    """
    ref, y = ref.detach().double(), y.detach().double()
    err = float((ref - y).pow(2).sum())
    sig = float(ref.pow(2).sum())
    if math.isnan(err) or math.isnan(sig):
        return math.nan
    if err == 0:
        return math.inf
    return 10 * math.log10(sig / err) if sig > 0 else -math.inf

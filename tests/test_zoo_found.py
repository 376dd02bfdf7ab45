"""Bugs the external model zoo (tests/test_zoo.py) found, each pinned on a small model here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxscale


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_conv1d__lowered_to_scaled_conv2d_and_accurate(fmt):
    """nn.Conv1d (Whisper's and Wav2Vec2's front ends) ran in float32: 22% of Whisper's weight
    FLOPs. Now lowered through scaled_conv2d over a height of 1; stride, padding, dilation,
    groups and bias carry over."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv1d(16, 32, 3, padding=1), nn.GELU(),
        nn.Conv1d(32, 32, 5, stride=2, padding=4, dilation=2, groups=4), nn.GELU(),
    ).eval()
    x = torch.randn(2, 16, 40)
    sm = fxscale.transform(m, (x,), format=fmt)
    quantised = [r["node"] for r in sm.report.rows if r["kind"] == "quantised"]
    assert quantised == ["conv1d", "conv1d_1"]
    y, ref = sm(x), m(x)
    assert y.shape == ref.shape == (2, 32, 20)
    dyn = fxscale.dynamic_baseline(m, (x,), format=fmt)(x)
    assert fxscale.sqnr_db(ref, y) >= fxscale.sqnr_db(ref, dyn) - 1.0
    assert fxscale.sqnr_db(ref, y) >= (20 if fmt == "e4m3" else 25)
    x5 = torch.randn(5, 16, 40)  # another batch size
    assert fxscale.sqnr_db(m(x5), sm(x5)) >= (20 if fmt == "e4m3" else 25)

"""A matmul-like op fed directly by another (issue 14, item 2): lowering the first renamed the
node the second reads, and transform crashed with ``KeyError: 'scaled_linear_default'``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxscale


class Twice(nn.Module):
    """``a(a(x))``: the same weights, read by two chained matmuls."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x):
        return self.a(self.a(x))


class QK(nn.Module):
    """Single-head scores ``q(x) @ k(x).T``: both operands of a matmul are matmul outputs."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):  # (B, S, 16)
        return self.q(x) @ self.k(x).transpose(-1, -2)


def _cases():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 16, 16)
    return {
        "linear->linear": (nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8)), torch.randn(4, 16), 2),
        "conv->conv": (nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)), img, 2),
        "conv->depthwise": (nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=16)), img, 2),
        "a(a(x))": (Twice(), torch.randn(4, 16), 2),
        "q(x) @ k(x).T": (QK(), torch.randn(2, 8, 16), 3),
    }


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
@pytest.mark.parametrize("name", list(_cases()))
def test__chained_matmuls__transform_and_stay_accurate(name, fmt):
    model, x, n_matmuls = _cases()[name]
    model.eval()
    sm = fxscale.transform(model, (x,), format=fmt)
    quantised = [r for r in sm.report.rows if r["kind"] == "quantised"]
    assert len(quantised) == n_matmuls, [(r["node"], r["kind"], r["note"]) for r in sm.report.rows]
    xt = torch.randn_like(x)
    assert fxscale.sqnr_db(model(xt), sm(xt)) > (20.0 if fmt == "e4m3" else 25.0)
    dyn = fxscale.dynamic_baseline(model, (x,), format=fmt)(xt)
    assert fxscale.sqnr_db(model(xt), sm(xt)) >= fxscale.sqnr_db(model(xt), dyn) - 1.0


@torch.no_grad()
def test__transformers_convnext__transforms():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32, num_labels=10
    )
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    sm = fxscale.transform(model, (x,))
    ref, y = model(x).logits, sm(x).logits
    assert torch.isfinite(y).all()
    assert fxscale.sqnr_db(ref, y) > 15.0
    assert sum(r["kind"] == "quantised" for r in sm.report.rows) >= 4

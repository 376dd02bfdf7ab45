"""Requantise placement: where projected wasted bits pass the threshold."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxscale
from fxscale.api import transform
from passes.requantise import projected_waste


def deep_mlp(seed=0):
    torch.manual_seed(seed)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 8)).eval()


def test_projected_waste__is_log2_of_bound_over_observed():
    from fxscale.bound import Bound

    assert projected_waste(Bound(8.0), (1.0, 1.0)) == 3.0
    assert projected_waste(Bound(0.0), (0.0, 0.0)) == 0.0
    assert projected_waste(Bound(1.0), (0.0, 0.0)) == math.inf
    assert projected_waste(None, (1.0, 1.0)) is None


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8"])
def test_any_threshold__places_requantises_that_run_and_keep_accuracy(fmt):
    """Sweeping the threshold mixes static, run-time-derived and measured scales in every
    combination: each must run (run-time scales computed only from their own sources)."""
    model = deep_mlp()
    x = torch.randn(16, 64)
    counts = []
    for thr in [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 10.0]:
        sm = transform(model, (x,), format=fmt, threshold=thr)
        y = sm(torch.randn(16, 64) * 2)
        assert torch.isfinite(y).all()
        xt = torch.randn(16, 64)
        if thr <= fxscale.get_format(fmt).threshold:  # above it, int8 pays a bit per wasted bit
            assert fxscale.sqnr_db(model(xt), sm(xt)) > 15.0, thr
        counts.append(sum(r["requantise"] for r in sm.report.rows))
    assert counts == sorted(counts, reverse=True)  # a higher threshold never adds requantises
    assert counts[0] >= 4 and counts[-1] == 0


@torch.no_grad()
def test_requantise_point__restarts_the_bound_downstream():
    model = deep_mlp()
    x = torch.randn(16, 64)
    sm = transform(model, (x,), format="int8")
    rows = {r["node"]: r for r in sm.report.rows}
    rq = [n for n, r in rows.items() if r["requantise"]]
    assert rq, "int8 needs requantise points in a 4-layer MLP"
    for n in rq:
        r = rows[n]
        assert r["wasted_bits"] > 1.0  # int8's threshold
        assert r["bound"] == pytest.approx(r["observed"])  # restarted from the measurement
    assert "scaled_linear_requantise" in sm.code  # fused into the producing matmul


@pytest.mark.parametrize(("fmt", "threshold", "flat_to", "gone_at"), [("e4m3", 6.0, 8, 14), ("e5m2", 16.0, 20, 30)])
@pytest.mark.parametrize("dist", ["gaussian", "student-t(3)"])
def test_float8_default_threshold__wasted_binades_cost_nothing_within_it(fmt, threshold, flat_to, gone_at, dist):
    """Why e4m3's default threshold is 6 binades and e5m2's 16: the SQNR (vs float64) of a ReLU'd
    activation stored with up to threshold + 2 wasted binades stays within 0.2 dB of a tight
    scale; far past it small values flush (>5 dB lost), which is what requantise prevents."""
    from fxscale.formats import get_format
    from fxscale.metrics import sqnr_db

    from .models import relu_activation

    f = get_format(fmt)
    assert f.threshold == threshold
    h = relu_activation(dist)
    amax = float(h.abs().max())

    def stored(waste):
        s = f.scale_for(amax * 2.0**waste)
        return f.cast((h / s).float()).double() * s

    tight = sqnr_db(h, stored(0))
    for waste in range(flat_to + 1):
        assert sqnr_db(h, stored(waste)) >= tight - 0.2, waste
    assert sqnr_db(h, stored(gone_at)) < tight - 5.0


@torch.no_grad()
def test_e4m3_default_threshold__llama_all_static_same_sqnr_as_threshold_4():
    """The SiLU-gate products of a Llama MLP waste ~5 binades: at the default threshold they keep
    static scales (no run-time amax anywhere) at the SQNR that 2 requantise points gave at 4."""
    from fxscale.metrics import sqnr_db

    from .models import llama

    model, args = llama()
    ref = model(*args).last_hidden_state
    sm, sm4 = transform(model, args), transform(model, args, threshold=4.0)
    assert not any(r.get("runtime_amax") for r in sm.report.rows)
    assert sum(bool(r["requantise"]) for r in sm4.report.rows) >= 1
    s, s4 = sqnr_db(ref, sm(*args).last_hidden_state), sqnr_db(ref, sm4(*args).last_hidden_state)
    assert abs(s - s4) < 0.1, (s, s4)

"""The bounds pass: proven bounds per node, including what quantising operands does."""

from __future__ import annotations

import math

import torch
from torch import nn

from fxscale.api import transform
from fxscale.formats import get_format
from passes.bounds import quantise_const
from passes.calibrate import calibrate
from passes.capture import capture
from passes.requantise import analyse, weights_needing_spectral


def _row(sm, name):
    return next(r for r in sm.report.rows if r["node"] == name)


@torch.no_grad()
def test_linear__bound_covers_weights_that_round_up():
    """1.07 rounds up to 1.125 in e4m3 (5%): the bound must be of the stored weight."""
    lin = nn.Linear(64, 8, bias=False)
    lin.weight.fill_(1.07)
    sm = transform(lin, (torch.ones(2, 64),), input_bounds=1.0)
    y = sm(torch.ones(2, 64))  # every product at its maximum, signs aligned
    assert float(y.abs().max()) == 64 * 1.125
    assert _row(sm, "linear")["bound"] >= float(y.abs().max())


def test_quantise_const__bound_is_of_the_dequantised_data():
    w = torch.randn(16, 32)
    data, scale, b = quantise_const(w, get_format("e4m3"), spectral=True)
    deq = (data.float() * scale).double()
    # Norms are exact up to float rounding (1e-7 relative; the rules add a 2^-7 margin).
    assert b.absmax >= float(deq.abs().max())
    assert b.rownorm >= float(deq.norm(dim=-1).max()) * (1 - 1e-6)
    assert b.spectral >= float(torch.linalg.matrix_norm(deq.double(), 2)) * (1 - 1e-6)


def test_spectral_norms__only_where_they_can_change_a_low_precision_bound():
    # fc1 -> relu -> fc2 -> relu -> fc3: fc1's spectral norm bounds fc2's output row norm,
    # which bounds fc3's operand... through fc2's Cauchy-Schwarz term: needed. fc3's is not.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    args = (torch.randn(2, 8),)
    gm = capture(model, args)
    calibrate(gm, [args])
    from passes.bounds import build_steps

    steps = {s.name: s for s in build_steps(gm)}
    operand_of = {}
    for s in steps.values():
        for p in s.quantised:
            operand_of.setdefault(s.args[p].name, []).append(s.name)
    need = weights_needing_spectral(gm, steps, operand_of)
    assert any("0_weight" in n for n in need)
    assert not any("4_weight" in n for n in need)
    an = analyse(gm, fmt=get_format("e4m3"))
    assert an.bounds["relu_1"].absmax >= 0


def test_layer_norm__resets_bounds_after_a_declared_input():
    """LayerNorm (the two-pass fxscale.layer_norm) is bounded by sqrt(D) up to rounding, whatever
    max |x| (issue 11 case 3): with a declared input bound the scale is static, and without
    one it follows the input's run-time measurement (the row norm no longer matters)."""
    model = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32))
    sm = transform(model, (torch.randn(4, 32) * 100,), input_bounds=1000.0)
    assert "stats" not in sm.code
    assert _row(sm, "layer_norm")["scale"] is not None
    assert _row(sm, "layer_norm")["bound"] <= math.sqrt(32) * 1.03
    dyn = transform(model, (torch.randn(4, 32) * 100,))
    assert _row(dyn, "layer_norm")["bound"] <= math.sqrt(32) * 1.03


class _SumOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):  # (B, 8)
        return self.fc(x.sum(0, keepdim=True))  # (1, 8): grows with B


@torch.no_grad()
def test_sum_over_the_dynamic_batch__is_measured_not_proven_for_the_example_size():
    model = _SumOverBatch()
    sm = transform(model, (torch.randn(4, 8),), input_bounds=1.0)
    assert "stats" in sm.code  # the sum's bound is not proven: its consumer measures it
    x = torch.ones(64, 8)  # 16x the example batch: a bound for B=4 would saturate
    from fxscale import audit, sqnr_db

    assert all(r["ratio"] <= 1.0 for r in audit(sm, x))
    assert sqnr_db(model(x), sm(x)) > 20


@torch.no_grad()
def test_rms_norm_written_out__is_bounded_like_rms_norm():
    """HF Llama's RMSNorm (x * rsqrt(mean(x^2) + eps)) gets a static bound: no run-time amax."""
    from fxscale import sqnr_db

    from .models import llama

    model, args = llama()
    sm = transform(model, args)
    measured = [r["node"] for r in sm.report.rows if r.get("runtime_amax")]
    normed = [r for r in sm.report.rows if r["op"] == "aten.mul" and r["scale"] is not None]
    assert normed, "the normalised activations should have static scales"
    assert len(measured) <= 2, measured  # only requantise points, no RMSNorm output
    assert sqnr_db(model(*args).last_hidden_state, sm(*args).last_hidden_state) >= 24.0
    rsqrt = [r for r in sm.report.rows if r["op"] == "aten.rsqrt"]
    assert rsqrt and all(r["kind"] == "high" for r in rsqrt)  # a statistic, not a fallback
    assert sm.report.summary["fallbacks"] == 0


class _RMS(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.fc = nn.Linear(d, d)

    def forward(self, x):  # (B, D)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.fc(self.w * x)


@torch.no_grad()
def test_rms_norm_idiom__holds_for_one_hot_rows():
    """A one-hot row normalises to sqrt(D) at the spike: the bound's worst case, met exactly."""
    from fxscale import audit

    model = _RMS(64)
    sm = transform(model, (torch.randn(4, 64),))
    spikes = torch.zeros(3, 64)
    spikes[torch.arange(3), torch.tensor([0, 7, 63])] = torch.tensor([1e-3, -5.0, 1e4])
    assert all(r["ratio"] <= 1.0 for r in audit(sm, spikes))
    assert torch.isfinite(sm(spikes)).all()


class _GramOverBatch(nn.Module):
    def forward(self, x):  # (B, 8)
        return torch.relu(x.t() @ x) @ torch.ones(8, 4)  # (8, 4): sums over B


@torch.no_grad()
def test_matmul_over_the_dynamic_batch__is_measured_not_proven_for_the_example_size():
    model = _GramOverBatch()
    sm = transform(model, (torch.randn(4, 8),), input_bounds=1.0)
    x = torch.ones(256, 8)  # 64x the example batch
    from fxscale import audit, sqnr_db

    assert all(r["ratio"] <= 1.0 for r in audit(sm, x))
    assert sqnr_db(model(x), sm(x)) > 20


class _LayerNormBySqrt(nn.Module):
    """DeBERTa v1's LayerNorm: ``(x - mean) / sqrt(var + eps)``, d computed twice."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return self.fc((x - mean) / torch.sqrt(var + 1e-7))


@torch.no_grad()
def test_layer_norm_written_with_sqrt__static_bound_that_holds_at_its_worst_case():
    """``x / sqrt(...)`` was a division by a run-time value: each such LayerNorm's output needed a
    run-time amax (4 in DebertaModel; found by a user trial). A one-hot-like row (one spike) meets
    the bound sqrt(D) up to the eps."""
    from fxscale import audit, sqnr_db

    model = _LayerNormBySqrt(64).eval()
    sm = transform(model, (torch.randn(4, 64),))
    assert sm.report.summary["runtime_amax"] <= 1, sm.report  # the input's own amax only
    spikes = torch.zeros(3, 64)
    spikes[torch.arange(3), torch.tensor([0, 7, 63])] = torch.tensor([1e-1, -5.0, 1e4])
    assert all(r["ratio"] <= 1.0 for r in audit(sm, spikes))
    x = torch.randn(5, 64) * 3
    assert sqnr_db(model(x), sm(x)) > 20

"""Precision demand (passes/precision.py): a matmul is quantised only where its output
tolerates what low-precision operands do to it, and where it pays (DESIGN decision 9)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxscale
from fxscale.formats import get_format
from fxscale.nodeinfo import info
from passes.calibrate import calibrate
from passes.capture import capture
from passes.precision import SLACK, decide
from tests.rotary_models import RotaryBlock


def _rows(sm, op_part: str) -> list[dict]:
    return [r for r in sm.report.rows if op_part in r["op"]]


@torch.no_grad()
def test__rotary_matmul__stays_high_precision_and_keeps_accuracy():
    """transformers 5.17's rotary form: ``inv_freq[None, :, None] @ position_ids[:, None, :].float()``.
    Quantised, positions up to 511 are stored with an e4m3 step of 32: every angle is wrong
    (the attention branch fell to 16.7 dB)."""
    torch.manual_seed(0)
    m = RotaryBlock().eval()
    x = torch.randn(2, 512, 64)
    sm = fxscale.transform(m, (x,))
    (rot,) = _rows(sm, "aten.matmul")
    assert rot["kind"] == "high" and rot["format"] is None
    assert "K=1" in rot["note"]
    lin = _rows(sm, "aten.linear")
    assert len(lin) == 4 and all(r["kind"] == "quantised" for r in lin)
    xt = torch.randn(2, 512, 64)
    ref, y = m(xt), sm(xt)
    dyn = fxscale.dynamic_baseline(m, (x,))(xt)
    branch = fxscale.sqnr_db(ref - xt, y - xt)  # the attention branch, without the residual
    assert branch > 22.0, branch  # e4m3 on q/k/v/o alone: ~26 dB
    assert abs(branch - fxscale.sqnr_db(ref - xt, dyn - xt)) < 1.0  # the baseline makes the same choice
    lin = fxscale.linear_only_baseline(m, (x,))(xt)  # q/k/v/o quantised, nothing else
    assert abs(branch - fxscale.sqnr_db(ref - xt, lin - xt)) < 1.0


class Fourier(nn.Module):
    """``sin(x @ B)``, ``cos(x @ B)``: angles up to ~50 rad, K = 8 (a real reduction)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("B", torch.randn(8, 64) * 10)
        self.out = nn.Linear(128, 16)

    def forward(self, x):
        f = x @ self.B
        return self.out(torch.cat([f.sin(), f.cos()], -1))


@torch.no_grad()
def test__sin_cos_argument__demands_relative_error_below_one_over_its_bound():
    torch.manual_seed(0)
    m = Fourier().eval()
    x = torch.rand(32, 8)
    sm = fxscale.transform(m, (x,))
    (mm,) = _rows(sm, "aten.matmul")
    assert mm["kind"] == "high"
    assert "periodic" in mm["note"] and "tolerates an error of 0.0625" in mm["note"], mm["note"]
    assert fxscale.sqnr_db(m(x), sm(x)) > 20.0  # quantised: 6.6 dB
    (lin,) = _rows(sm, "aten.linear")
    assert lin["kind"] == "quantised"  # sin/cos outputs (bounded by 1) feed a matmul freely


def _demands(model, args, fmt="e4m3"):
    gm = capture(model, args)
    calibrate(gm, [args])
    high = decide(gm, get_format(fmt))
    return gm, high, {n.name: info(n).demand for n in gm.graph.nodes}


class Exp(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x).mul(self.scale).exp()


@pytest.mark.parametrize("scale", [0.05, 4.0])
def test__exp_argument__tolerates_the_step_over_its_bound(scale):
    """exp(y + d) = exp(y)(1 + d): the output tolerates relative s, so y tolerates absolute s,
    relative s / max|y|; the linear before it is high precision exactly where max|y| > SLACK."""
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    gm, high, d = _demands(Exp(scale), (x,))
    s = get_format("e4m3").rel_rounding
    mul = next(n for n in gm.graph.nodes if n.name == "mul")
    amax = info(mul).observed[0]
    assert d["mul"] == pytest.approx(s / amax, rel=1e-6)
    assert d["linear"] == pytest.approx(s / amax, rel=1e-6)  # x * c: the error divides by c
    assert ("linear" in high) == (amax > SLACK)


class Router(nn.Module):
    """A mixture-of-experts router: softmax over gate logits, then top-k selection."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 8, bias=False)
        self.up = nn.Linear(16, 32)

    def forward(self, x):
        w, idx = torch.topk(self.gate(x).softmax(-1), 2, dim=-1)
        return self.up(x), w, idx


def test__selection__tolerates_no_error():
    _, high, d = _demands(Router(), (torch.randn(8, 16),))
    assert d["softmax"] == 0.0 and d["linear"] == 0.0
    assert "linear" in high and "topk" in high["linear"]
    assert "linear_1" not in high  # the expert's own projection is quantised


class Scores(nn.Module):
    def __init__(self, gain: float):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))
        self.gain = gain

    def forward(self, x):  # (B, S, 32)
        s = self.q(x) @ self.k(x).transpose(-1, -2) * self.gain
        return s.softmax(-1) @ self.v(x)


@pytest.mark.parametrize("gain", [1e-3, 1.0])
def test__attention_scores_into_softmax__high_precision_where_large(gain):
    """softmax(s + d) changes relatively by ~2|d|: scores bounded by B tolerate absolute
    error step / 2, relative step / (2B): quantised (within SLACK = 2) where B <= 1."""
    torch.manual_seed(0)
    m = Scores(gain).eval()
    x = torch.randn(2, 16, 32)
    gm, high, _ = _demands(m, (x,))
    scores = next(n for n in gm.graph.nodes if n.name == "matmul")
    amax = info(scores).observed[0] * gain
    assert ("matmul" in high) == (amax > 1.0), amax
    assert "softmax" in high.get("matmul", "softmax")
    assert not {"linear", "linear_1", "linear_2", "matmul_1"} & set(high)
    sm = fxscale.transform(m, (x,))
    assert fxscale.sqnr_db(m(x), sm(x)) > 20.0


def test__graph_output_and_matmul_operands__tolerate_the_step():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    gm, high, d = _demands(m, (torch.randn(4, 16),), fmt="int8")
    s = get_format("int8").rel_rounding
    assert not high
    for name in ("linear", "relu", "linear_1"):
        assert d[name] == pytest.approx(s, rel=1e-6)
    assert all(info(n).precision == "low" for n in gm.graph.nodes if n.name.startswith("linear"))


def test__positions_through_floor__tolerate_no_error():
    class Bucket(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 4)

        def forward(self, x):
            return torch.floor(self.lin(x) * 4)

    _, high, d = _demands(Bucket(), (torch.randn(4, 16),))
    assert d["linear"] == 0.0 and "integer" in high["linear"]
    assert math.isinf(d.get("floor") or math.inf) or d["floor"] > 0


def test__nothing_quantised__warns_with_the_reason():
    class Outer(nn.Module):
        def forward(self, a, b):  # (B, M), (B, N) -> (B, M, N): an outer product, K = 1
            return a[:, :, None] @ b[:, None, :]

    with pytest.warns(UserWarning, match=r"quantised nothing in Outer.*K=1"):
        fxscale.transform(Outer(), (torch.randn(2, 8), torch.randn(2, 4)))


class GatedMLP(nn.Module):
    """Llama's MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test__gated_product__asks_its_factors_for_the_relative_step(fmt):
    """A product adds its factors' relative errors: ``up`` is asked for what the product is
    asked (relative), not that divided by max |silu(gate)| (which kept up_proj in float32:
    28% of a Llama's weight FLOPs)."""
    torch.manual_seed(0)
    m = GatedMLP()
    x = torch.randn(8, 32) * 3
    _, high, d = _demands(m, (x,), fmt)
    assert not high
    assert d["linear_1"] == pytest.approx(get_format(fmt).rel_rounding, rel=1e-6)


class _MaskedAttention(nn.Module):
    """Scores masked by masked_fill (DeBERTa's form) or by a -inf bias inside baddbmm (WavLM's)."""

    def __init__(self, how):
        super().__init__()
        self.q, self.k, self.v, self.how = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64), how

    def forward(self, x, mask):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.how == "baddbmm":
            bias = torch.zeros(mask.shape[0], 1, mask.shape[1]).masked_fill(mask[:, None, :] == 0, -math.inf)
            s = torch.baddbmm(bias.expand(-1, x.shape[1], -1), q, k.transpose(1, 2), alpha=0.125)
        else:
            s = (torch.bmm(q, k.transpose(1, 2)) / 8.0).masked_fill(mask[:, None, :] == 0, torch.finfo(torch.float32).min)
        return torch.bmm(s.softmax(-1), v)


@pytest.mark.parametrize("how", ["masked_fill", "baddbmm"])
def test_decide__scores_masked_by_a_huge_fill_or_minus_inf_are_quantised_and_stay_accurate(how):
    """The relative-error rule divided by the masked output's max |x| (the fill, 3.4e38, or inf):
    the scores matmul 'tolerated' 1e-41 and stayed float32 in every DeBERTa layer (user trial)."""
    from fxscale.metrics import sqnr_db

    torch.manual_seed(0)
    m = _MaskedAttention(how).eval()
    x, mask = 0.3 * torch.randn(2, 16, 64), torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    sm = fxscale.transform(m, (x, mask))
    scores = next(r for r in sm.report.rows if r["node"] == ("baddbmm" if how == "baddbmm" else "bmm"))
    assert scores["computes"] == "float8_e4m3fn", scores["note"]
    x2 = 0.3 * torch.randn(2, 16, 64)
    with torch.no_grad():
        assert sqnr_db(m(x2, mask), sm(x2, mask)) > 20

"""In-place ops and shape ops on weights (issue 14, item 5): ``relu_``/``add_``/``mul_``/``silu_``
become out-of-place where safe (passes/functionalise.py), and ``weight.T`` becomes a
constant (passes/fold.py), so nothing after them needs a run-time amax and weights are
quantised once, at transform time."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fxscale
from passes.capture import capture
from passes.fold import fold
from passes.functionalise import functionalise

fxops = torch.ops.fxscale


class InPlaceBlock(nn.Module):
    """A torchvision-style residual block: ReLU(inplace=True), ``+=``, ``silu_``, ``mul_``, and the
    elementwise ops that had no rule (hardsigmoid, pad, type_as, cumsum)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):  # (B, 8, H, W)
        y = self.relu(self.bn(self.c1(x)))
        y = self.c2(y)
        y += x
        y = F.silu(y, inplace=True)
        y.mul_(0.5)
        z = F.pad(F.hardsigmoid(y) * y, (1, 1, 1, 1))
        h = self.head(z.mean((2, 3)).type_as(x))  # (B, 16)
        return self.out(h.cumsum(-1))


def _fallbacks(sm) -> list[str]:
    return [r["node"] for r in sm.report.rows if r["kind"] == "fallback"]


def _runtime_amax(sm) -> list[str]:
    return [n.args[0].name for n in sm.graph.nodes if n.target is fxops.stats.default]


def _unbounded(sm) -> list[str]:
    """Nodes measured at run time because no rule bounded them (not requantise points)."""
    return [r["node"] for r in sm.report.rows if "no proven bound" in (r["note"] or "")]


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test__in_place_block__no_fallbacks_and_no_amax_but_the_input(fmt):
    torch.manual_seed(0)
    m = InPlaceBlock().eval()
    x = torch.randn(2, 8, 8, 8)
    sm = fxscale.transform(m, (x,), format=fmt)
    assert _fallbacks(sm) == []
    assert _unbounded(sm) == []  # before: relu_, type_as (and a fallback for each in-place op)
    assert sum(r["kind"] == "quantised" for r in sm.report.rows) == 4
    xt = torch.randn(2, 8, 8, 8)
    ref = m(xt)
    dyn = fxscale.dynamic_baseline(m, (x,), format=fmt)(xt)
    assert fxscale.sqnr_db(ref, sm(xt)) >= fxscale.sqnr_db(ref, dyn) - 1.0
    assert fxscale.sqnr_db(ref, sm(xt)) > 15.0


def test__functionalise__leaves_mutations_others_can_see():
    class Visible(nn.Module):
        def forward(self, x, b):
            v = (x * 2)[:, :2]       # a view of fresh storage, taken before the mutation
            base = x * 2
            w = base.view(-1)
            base.add_(1.0)           # w sees it
            b.mul_(3.0)              # an input: the caller sees it
            v.relu_()                # a view: mutates x * 2's storage
            return base, w, b, v

    m = Visible()
    args = (torch.randn(2, 4), torch.randn(2, 4))
    gm = capture(m, args)
    assert functionalise(gm) == []
    a1, a2 = (t.clone() for t in args)
    ref = m(*(t.clone() for t in args))
    for r, y in zip(ref, gm(a1, a2)):
        torch.testing.assert_close(r, y)


def test__functionalise__keeps_the_mutated_dtype():
    class Half(nn.Module):
        def forward(self, x):
            y = x.to(torch.bfloat16) * 1
            y.add_(x)                # in place: stays bfloat16; out of place it would promote
            return y

    x = torch.randn(3, 4)
    # capture() now functionalises graphs with in-place ops itself (run_decompositions: issue 11
    # cases 5, 6), so the pass is tested on torch.export's graph as it comes.
    gm = torch.export.export(Half(), (x,), strict=False).module()
    assert functionalise(gm) == ["add_"]
    out = gm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, Half()(x))
    captured = capture(Half(), (x,))
    assert captured(x).dtype == torch.bfloat16
    torch.testing.assert_close(captured(x), Half()(x))


class Transposed(nn.Module):
    """``x @ self.w.T`` (Falcon; hand-written projections) and ``F.linear`` of a transposed weight."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 16) / 4)
        self.v = nn.Parameter(torch.randn(32, 8) / 6)

    def forward(self, x):  # (B, 16)
        return F.linear(x @ self.w.T, self.v.t())


@torch.no_grad()
def test__transposed_weights__quantised_once_at_transform_time():
    torch.manual_seed(0)
    m = Transposed()
    x = torch.randn(4, 16)
    gm = capture(m, (x,))
    assert fold(gm) == ["numpy_t", "t"]
    sm = fxscale.transform(m, (x,))
    assert _runtime_amax(sm) == ["x"]
    quants = [n for n in sm.graph.nodes if n.target is fxops.quantise.default]
    assert [q.args[0].name for q in quants] == ["x"]  # weights arrive quantised: no cast per call
    weights = [r for r in sm.report.rows if r["kind"] == "weight" and r["stores"] is not None]
    assert len(weights) >= 2
    xt = torch.randn(4, 16)
    assert fxscale.sqnr_db(m(xt), sm(xt)) > 20.0


def test__fold__leaves_buffers_the_graph_mutates():
    class Cache(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k", torch.zeros(4, 8))

        def forward(self, x):
            self.k.add_(1.0)
            return x @ self.k.t()

    m = Cache()
    gm = capture(m, (torch.randn(2, 8),))
    assert fold(gm) == []


@torch.no_grad()
def test_fold__weight_norm_of_constants_is_computed_once_and_its_conv_quantised():
    """A weight-normalised conv (Wav2Vec2's positional conv): ``_weight_norm(v, g)`` of two
    parameters is folded into one constant, so the conv reads a weight quantised once (it stayed
    float32 before: 19% of Wav2Vec2's weight FLOPs), with the same output as the model."""
    from torch.nn.utils.parametrizations import weight_norm

    import fxscale

    torch.manual_seed(0)
    conv = weight_norm(torch.nn.Conv1d(16, 16, 5, padding=2, groups=4), name="weight", dim=2)
    m = torch.nn.Sequential(torch.nn.Conv1d(4, 16, 3, padding=1), conv, torch.nn.GELU()).eval()
    x = torch.randn(2, 4, 32)
    from passes.capture import capture
    from passes.fold import fold

    gm = capture(m, (x,))
    assert any("weight_norm" in name for name in fold(gm))
    assert not any(n.target is torch.ops.aten._weight_norm.default for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), m(x))
    sm = fxscale.transform(m, (x,))
    rows = [r for r in sm.report.rows if r["op"] == "aten.conv1d"]
    assert len(rows) == 2 and all(r["kind"] == "quantised" for r in rows), rows
    assert fxscale.sqnr_db(m(x), sm(x)) > 20

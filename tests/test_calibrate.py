"""passes.calibrate: observed max |x| and row norms match a direct computation."""

import math

import pytest
import torch
from torch import nn

from fxscale.nodeinfo import info
from passes.calibrate import CalibrationError, calibrate, tensor_stats
from passes.capture import capture
from tests import models


def _stats(t):
    return float(t.abs().max()), float(torch.linalg.vector_norm(t, dim=-1).max())


def _maxpair(*ps):
    return max(p[0] for p in ps), max(p[1] for p in ps)


def test__calibrate__mlp_matches_direct_computation_over_batches():
    model, args = models.mlp()
    gm = capture(model, args)
    b2 = (3.0 * torch.randn(5, 16),)
    calibrate(gm, [args, b2])
    l1, l2 = model[0], model[2]

    def direct(x):
        h = l1(x)
        r = torch.relu(h)
        return {"x": _stats(x), "linear": _stats(h), "relu": _stats(r), "linear_1": _stats(l2(r))}

    with torch.no_grad():
        d1, d2 = direct(args[0]), direct(b2[0])
    nodes = {n.name: n for n in gm.graph.nodes if n.op == "call_function"}
    nodes["x"] = next(n for n in gm.graph.nodes if n.op == "placeholder")
    nodes["output"] = next(n for n in gm.graph.nodes if n.op == "output")
    assert list(nodes)[:3] == ["linear", "relu", "linear_1"]
    for name in ["x", "linear", "relu", "linear_1"]:
        got = info(nodes[name]).observed
        want = _maxpair(d1[name], d2[name])
        assert got == pytest.approx(want, rel=1e-6), name
    # Constants are left to the bounds pass, which measures them exactly, once.
    weights = [n for n in gm.graph.nodes if n.op == "get_attr"]
    assert weights
    assert all(info(n).observed is None for n in weights)
    assert info(nodes["output"]).observed is None


class _Split(nn.Module):
    def forward(self, x):
        a, b = x.split(2, dim=-1)
        return a * 2 + b


def test__calibrate__multi_output_records_per_element_and_max():
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 1.0, -6.0, 8.0]])
    gm = capture(_Split(), (x,))
    calibrate(gm, [(x,)])
    split = next(n for n in gm.graph.nodes if n.op == "call_function" and "split" in str(n.target))
    ol = info(split).observed_list
    assert ol[0] == pytest.approx(_stats(x[:, :2]))
    assert ol[1] == pytest.approx(_stats(x[:, 2:]))
    assert info(split).observed == pytest.approx(_maxpair(ol[0], ol[1]))
    getitems = [n for n in gm.graph.nodes if n.args and n.args[0] is split]
    assert [info(g).observed for g in getitems] == [pytest.approx(o) for o in ol]


def test__calibrate__nan_in_input_names_the_input():
    model, args = models.mlp()
    gm = capture(model, args)
    bad = args[0].clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN in calibration at input .*placeholder"):
        calibrate(gm, [args, (bad,)])


class _Log(nn.Module):
    def forward(self, x):
        return torch.log(x) + 1


def test__calibrate__nan_produced_by_a_node_names_that_node():
    gm = capture(_Log(), (torch.rand(2, 3) + 0.5,))
    with pytest.raises(ValueError, match=r"NaN in calibration at node .*log") as ei:
        calibrate(gm, [(-torch.ones(2, 3),)])
    assert "aten.log" in str(ei.value)


def test__calibrate__infinity_is_recorded_not_raised():
    gm = capture(_Log(), (torch.rand(2, 3) + 0.5,))
    calibrate(gm, [(torch.zeros(2, 3),)])
    log = next(n for n in gm.graph.nodes if n.name == "log")
    assert info(log).observed == (math.inf, math.inf)


def test__calibrate__failure_reraises_with_the_node():
    model, args = models.mlp()
    gm = capture(model, args, method="symbolic_trace")
    with pytest.raises(CalibrationError, match=r"calibration failed at node %_0 .*call_module") as ei:
        calibrate(gm, [(torch.randn(4, 7),)])  # wrong feature size
    assert "cannot be multiplied" in str(ei.value)
    gm = capture(model, args)  # export's input guard is a node too
    with pytest.raises(CalibrationError, match=r"at node %_guards_fn .*Guard failed"):
        calibrate(gm, [(torch.randn(4, 7),)])


def test__calibrate__integer_inputs_record_nothing_and_reset_accumulate():
    model, args = models.bert()
    gm = capture(model, args)
    calibrate(gm, [args])
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert info(ids).observed is None
    out_node = [n for n in gm.graph.nodes if n.op == "call_function" and info(n).observed is not None][-1]
    first = info(out_node).observed
    assert all(math.isfinite(v) for v in first)
    calibrate(gm, [models.with_batch("bert", 3)], reset=False)
    assert info(out_node).observed[0] >= first[0]
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate(gm, [])


def test__tensor_stats__edge_cases():
    assert tensor_stats(torch.tensor(-3.0)) == (3.0, 3.0)
    assert tensor_stats(torch.empty(0, 4)) == (0.0, 0.0)
    big = torch.full((2, 4), 1e38)
    a, r = tensor_stats(big)  # float32 row norm overflows: recomputed in float64
    assert a == pytest.approx(1e38, rel=1e-6) and r == pytest.approx(2e38, rel=1e-6)
    assert tensor_stats(torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16)) == pytest.approx((2.0, math.sqrt(5)))

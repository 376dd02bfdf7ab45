"""fxscale.report: rows, table, HTML and plot from a hand-built graph's NodeInfo, and the report of
a transformed model read from its final graph."""

import sys

import pytest
import torch
from torch import fx

from fxscale.bound import Bound
from fxscale.nodeinfo import META_KEY, info
from fxscale.report import Report, fmt_value

ROW_KEYS = {"node", "op", "kind", "format", "scale", "bound", "observed", "wasted_bits", "requantise", "note"}


def _graph() -> fx.GraphModule:
    """x @ w -> relu -> exp (fallback) -> output, with NodeInfo filled in by hand."""
    root = torch.nn.Module()
    root.w = torch.nn.Parameter(torch.randn(4, 4))
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("w")
    mm = g.create_node("call_function", torch.ops.aten.mm.default, (x, w), name="mm")
    relu = g.create_node("call_function", torch.ops.aten.relu.default, (mm,), name="relu")
    ex = g.create_node("call_function", torch.ops.aten.exp.default, (relu,), name="exp")
    g.output(ex)
    gm = fx.GraphModule(root, g)
    e4m3 = "float8_e4m3fn"
    ni = info(x)
    ni.kind, ni.stores, ni.observed, ni.measured, ni.scale_from = "input", e4m3, (3.0, 5.0), True, "amax"
    ni.reasons.append("input without a declared bound: run-time amax")
    ni = info(w)
    ni.kind, ni.stores, ni.scale, ni.bound, ni.observed = "weight", e4m3, 2.0**-9, Bound(0.75), (0.75, 1.0)
    ni = info(mm)
    ni.kind, ni.computes, ni.stores, ni.scale, ni.bound, ni.observed, ni.wasted_bits = (
        "quantised", e4m3, e4m3, 2.0**-5, Bound(8.0, 12.0), (2.0, 3.0), 2.0)
    ni = info(relu)
    ni.kind, ni.bound, ni.observed, ni.requantise, ni.wasted_bits = "high", Bound(8.0), (1.5, 2.5), True, 2.4
    ni.measured, ni.scale_from = True, "amax"
    ni = info(ex)
    ni.kind = "fallback"
    ni.reasons.append("no rule for aten.exp: runs in high precision")
    return gm


def test__report__rows_carry_nodeinfo():
    gm = _graph()
    r = Report.from_graph(gm, "e4m3")
    assert r.fmt_name == "float8_e4m3fn"
    assert [row["node"] for row in r.rows] == ["x", "w", "mm", "relu", "exp", "output"]
    for row in r.rows:
        assert ROW_KEYS <= set(row)
    x, w, mm, relu, ex, out = r.rows
    assert x == pytest.approx(x | {"kind": "input", "stores": "float8_e4m3fn", "format": None, "scale": None,
                                   "bound": None, "observed": 3.0, "requantise": False})
    assert w["scale"] == 2.0**-9 and w["bound"] == 0.75 and w["op"] == "get_attr"
    assert mm["op"] == "aten.mm" and mm["bound"] == 8.0 and mm["observed"] == 2.0 and mm["wasted_bits"] == 2.0
    assert mm["bound_rownorm"] == 12.0 and mm["observed_rownorm"] == 3.0
    assert relu["requantise"] is True and relu["format"] is None
    assert mm["format"] == mm["computes"] == "float8_e4m3fn" and mm["unit"] == "binades"
    assert ex["kind"] == "fallback" and ex["bound"] is None and "no rule" in ex["note"]
    assert out["kind"] == "output" and out["observed"] is None
    # the report does not add NodeInfo to nodes that had none
    assert META_KEY not in next(n for n in gm.graph.nodes if n.op == "output").meta


def test__report__summary_counts_vs_dynamic_baseline():
    r = Report.from_graph(_graph(), torch.float8_e4m3fn)
    assert r.summary == {
        "nodes": 6, "quantised": 1, "low_precision": 3, "fallbacks": 1, "requantise": 1,
        "costly_fallbacks": 0, "harmless_fallbacks": 1,  # exp's result is not quantised again
        "runtime_amax": 2,  # the input (no declared bound) and the requantise point
        # per-tensor dynamic scaling: the one activation operand of the one matmul (the weight's
        # scale is static in every scheme; issue 10 stopped counting it)
        "baseline_amax": 1,
        "hidden": 0,
    }


def test__report__str_is_a_table_with_powers_of_two_and_summary():
    s = str(Report.from_graph(_graph(), "e4m3"))
    lines = s.splitlines()
    # issue 10's columns: what a node computes on and stores, headroom with its unit, why
    assert lines[0].split() == ["node", "source", "computes", "stores", "scale", "bound", "observed", "headroom",
                                "requantise", "why"]
    mm = next(ln for ln in lines if ln.startswith("mm "))
    assert "2^-5" in mm and "2^3" in mm and "float8_e4m3fn" in mm and "2.0 binades" in mm
    assert "2^-9" in next(ln for ln in lines if ln.startswith("w "))
    assert "yes" in next(ln for ln in lines if ln.startswith("relu "))
    assert "0.75" in s
    assert lines[-1].startswith("float8_e4m3fn: 1 of 6 nodes quantised")
    assert "1 fallback" in lines[-1] and "1 requantise" in lines[-1]
    assert "run-time amax reductions: 2 (per-tensor dynamic scaling: 1)" in lines[-1]
    assert "run-time amax" in next(ln for ln in lines if ln.startswith("x "))  # where the scale comes from


def test__report__html_has_table_and_escaped_summary():
    h = Report.from_graph(_graph(), "e4m3")._repr_html_()
    assert "<table>" in h and h.count("<tr>") == 7
    assert "2^-5" in h and "<p>float8_e4m3fn: 1 of 6" in h


def test__report__from_rows_matches_from_graph():
    gm = _graph()
    pairs = [(n.name, info(n)) for n in gm.graph.nodes]
    assert Report.from_rows(pairs, "e4m3").rows == Report.from_graph(gm, "e4m3").rows


def test__fmt_value__compact():
    assert fmt_value(2.0**-5) == "2^-5"
    assert fmt_value(8.0) == "2^3"
    assert fmt_value(0.1) == "0.1"
    assert fmt_value(12345.678) == "1.23e+04"
    assert fmt_value(None) == "-"
    assert fmt_value(float("inf")) == "inf"
    assert fmt_value(0.0) == "0"
    assert fmt_value(8.0, pow2=False) == "8"


def test__report__plot_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install fxscale\[plot\]"):
        Report.from_graph(_graph(), "e4m3").plot()


def test__report__plot_draws_bound_observed_and_scaled_range():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = Report.from_graph(_graph(), "e4m3").plot()
    bound, observed = ax.collections[-2], ax.collections[-1]
    assert bound.get_offsets()[:, 1].tolist() == pytest.approx([-0.415, 3.0, 3.0], abs=1e-3)
    assert len(observed.get_offsets()) == 4  # x, w, mm, relu
    ranges = ax.collections[:-2]  # one bar per static-scale low-precision node: w, mm
    assert len(ranges) == 2
    segs = ranges[1].get_segments()[0]
    assert segs[:, 1].tolist() == pytest.approx([-5 - 6, -5 + 8.807], abs=1e-3)  # 2^-5 * [2^-6, 448]
    plt.close(ax.figure)


@torch.no_grad()
def test_note__fp8_linear_with_dims_not_multiple_of_16__says_what_runs_on_the_gpu():
    from torch import nn

    import fxscale

    odd = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 32)).eval()
    even = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    # The first linear's ReLU and cast run in its epilogue: the fused node keeps the ReLU's name
    # (it computes the ReLU's value), and the linear's reasons.
    notes = {r["node"]: r["note"] for r in fxscale.transform(odd, (torch.randn(8, 40),)).report.rows}
    assert "K=40, N=24 not multiples of 16" in notes["relu"] and "masked Triton" in notes["relu"]
    assert "K=24, N=32" in notes["linear_1"]
    rows = fxscale.transform(even, (torch.randn(8, 64),)).report.rows
    assert not any("multiples of 16" in r["note"] for r in rows)
    rows = fxscale.transform(odd, (torch.randn(8, 40),), format="int8").report.rows
    assert not any("multiples of 16" in r["note"] for r in rows)  # fp8 GEMM rule only


@torch.no_grad()
def test_report__reads_the_final_graph__names_are_sm_graphs():
    """sm.report is Report.from_graph(sm): one row per node of sm.graph, by its name; the matmul
    rows say which format they compute on; shape-only rows are left out of the printed table."""
    from torch import nn

    import fxscale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.Flatten(0)).eval()
    sm = fxscale.transform(model, (torch.randn(8, 32),), format="int8")
    names = [n.name for n in sm.graph.nodes if not (n.op == "call_module" and "guards" in str(n.target))]
    assert [r["node"] for r in sm.report.rows] == names
    assert sm.report.rows == Report.from_graph(sm, "int8").rows
    by_name = {r["node"]: r for r in sm.report.rows}
    matmuls = [n for n in sm.graph.nodes if "scaled_linear" in str(n.target)]
    assert len(matmuls) == 2 and all(by_name[n.name]["format"] == "int8" for n in matmuls)
    assert all(by_name[n.name]["kind"] == "quantised" for n in matmuls)
    text = str(sm.report)
    shape_rows = [r["node"] for r in sm.report.rows if r["kind"] == "shape"]
    assert shape_rows, "Flatten is a shape-only row"
    for name in shape_rows:
        assert not any(ln.split()[:1] == [name] for ln in text.splitlines())
        assert any(ln.split()[:1] == [name] for ln in sm.report.table(show_all=True).splitlines())
    assert "bits" in text and sm.report.rows[0]["unit"] == "bits"

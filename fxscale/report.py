"""``Report``: one row per node of the final (transformed) graph: what fxscale decided and why.

:meth:`Report.from_graph` reads each node's :class:`fxscale.nodeinfo.NodeInfo`
(``node.meta["fxscale"]``) from a GraphModule, so row names are the graph's (``sm.report`` is
``Report.from_graph(sm)``); :meth:`Report.from_rows` takes ``(name, NodeInfo)`` pairs.
``str(report)`` is a tabulate table (shape-only and plumbing rows and constants kept in high
precision left out, long names cut in the middle:
``report.table(show_all=True)`` has every row) plus a summary line, ``report._repr_html_()``
the same for notebooks, ``report.rows`` the raw dicts, and ``report.plot()`` a log2 chart
(needs matplotlib: ``pip install fxscale[plot]``).

>>> from fxscale.nodeinfo import NodeInfo
>>> from fxscale.bound import Bound
>>> r = Report.from_rows([
...     ("x", NodeInfo(op="placeholder", kind="input", stores="float8_e4m3fn", scale_from="amax",
...                    observed=(3.0, 5.0))),
...     ("mm", NodeInfo(op="aten.mm", kind="quantised", computes="float8_e4m3fn", stores="float8_e4m3fn",
...                     scale=2.0**-5, bound=Bound(8.0), observed=(2.0, 3.0), wasted_bits=2.0)),
... ], "e4m3")
>>> r.rows[1]["bound"], r.rows[1]["scale"], r.rows[1]["format"], r.rows[1]["headroom"], r.rows[1]["unit"]
(8.0, 0.03125, 'float8_e4m3fn', 2.0, 'binades')
>>> r.summary["runtime_amax"], r.summary["baseline_amax"]
(1, 1)
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .formats import Format, get_format
from .nodeinfo import META_KEY, NodeInfo, op_name

__all__ = ["Report", "fmt_value"]

#: Columns of ``str(report)`` (row keys, in order) and their headers.
COLUMNS = (
    ("node", "node"),
    ("source", "source"),
    ("computes", "computes"),
    ("stores", "stores"),
    ("scale", "scale"),
    ("bound", "bound"),
    ("observed", "observed"),
    ("headroom", "headroom"),
    ("requantise", "requantise"),
    ("note", "why"),
)

#: Run-time sources of a scale (``NodeInfo.scale_from``) as the table names them.
_SCALE_FROM = {"amax": "run-time amax", "rules": "rules at run time"}

#: Data operands (argument positions) of fxscale's matmul-like ops: what dynamic scaling measures.
_FX_OPERANDS = {
    "fxscale.scaled_linear": (0, 2), "fxscale.scaled_linear_requantise": (0, 2),
    "fxscale.scaled_matmul": (0, 2), "fxscale.scaled_conv2d": (0, 2),
    "fxscale.scaled_conv_transpose2d": (0, 2),
}


def fmt_value(v: float | None, *, pow2: bool = True) -> str:
    """A float for the table: ``-`` for None, ``2^k`` for exact powers of two (if ``pow2``),
    else 3 significant digits.

    >>> fmt_value(0.03125), fmt_value(3.0), fmt_value(1e-7), fmt_value(None), fmt_value(1.0)
    ('2^-5', '3', '1e-07', '-', '2^0')
    """
    if v is None:
        return "-"
    v = float(v)
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if pow2 and v > 0:
        m, e = math.frexp(v)
        if m == 0.5:
            return f"2^{e - 1}"
    return f"{v:.3g}"


def _absmax(b: Any) -> float | None:
    """Absmax of a Bound, a list of Bounds (max), a float, or an (absmax, rownorm) pair."""
    if b is None:
        return None
    if hasattr(b, "absmax"):
        return float(b.absmax)
    if isinstance(b, (list, tuple)):
        if len(b) == 2 and all(isinstance(x, (int, float)) for x in b):
            return float(b[0])
        vals = [v for v in (_absmax(x) for x in b) if v is not None]
        return max(vals) if vals else None
    return float(b)


def _rownorm(b: Any) -> float | None:
    if b is None:
        return None
    if hasattr(b, "rownorm"):
        return float(b.rownorm)
    if isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, (int, float)) for x in b):
        return float(b[1])
    return None


#: The widest the text table prints a node name or a source (the rows keep them whole).
_WIDTH = {"node": 48, "source": 56}


def _abbreviate(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters (its start and end say the most).

    >>> _abbreviate("text_model_encoder_layers_0_self_attn_q_proj_weight_and_2_siblings_float8_e4m3fn", 48)
    'text_model_encoder_lay..._siblings_float8_e4m3fn'
    """
    if len(text) <= width:
        return text
    head = (width - 3) // 2
    return text[:head] + "..." + text[len(text) - (width - 3 - head):]


def _kind(rec: NodeInfo | None, node_op: str) -> str:
    """How the node runs in the graph the report reads (see :data:`fxscale.nodeinfo.KINDS`)."""
    if node_op == "placeholder":
        return "input"
    if node_op == "output":
        return "output"
    if node_op == "get_attr":
        return rec.kind if rec is not None and rec.kind in ("weight", "plumbing") else "weight"
    if rec is None:  # inserted by the lowering: quantise, measurements, run-time scales
        return "plumbing"
    if rec.computes is not None:
        return "quantised"
    if rec.kind == "quantised":  # planned low precision, but the lowering kept it high (reasons say why)
        return "high"
    return rec.kind


def _source(node) -> str:
    """``module path (Type) file:line`` of the model code that made ``node`` (empty if unknown)."""
    if node is None:
        return ""
    out = ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, typ = list(stack.values())[-1]
        typ = typ.rsplit(".", 1)[-1] if isinstance(typ, str) else getattr(typ, "__name__", "")
        out = f"{path} ({typ})" if path else f"({typ})"
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    user = [f for f in frames if "/torch/" not in f[0] and "site-packages" not in f[0]]
    if user:
        f, line = user[-1]
        out = f"{out} {f.rsplit('/', 1)[-1]}:{line}".strip()
    return out


def _row(name: str, rec: NodeInfo | None, node, unit: str) -> dict[str, Any]:
    node_op = node.op if node is not None else {"placeholder": "placeholder", "get_attr": "get_attr",
                                                  "output": "output"}.get(rec.op, "call_function")
    r = rec if rec is not None else NodeInfo()
    kind = _kind(rec, node_op)
    waste = None if r.wasted_bits is None else float(r.wasted_bits)
    runtime_amax = r.scale_from == "amax"
    row = {
        "node": name,
        "op": r.op if rec is not None else op_name(node),  # what the model's graph had here
        "target": op_name(node) if node is not None else r.op,  # what the final graph runs
        "kind": kind,
        "source": _source(node),
        "format": r.computes,  # DESIGN's contract: the format the node computes on
        "computes": r.computes,
        "stores": r.stores,
        "scale": None if r.scale is None else float(r.scale),
        "scale_from": r.scale_from,
        "bound": _absmax(r.bound),
        "bound_measured": bool(r.measured),
        "observed": _absmax(r.observed),
        "wasted_bits": waste,
        "headroom": waste,
        "unit": unit,
        "requantise": bool(r.requantise),
        "note": r.note,
        "dynamic": bool(r.dynamic),
        "runtime_amax": runtime_amax,
        "bound_rownorm": _rownorm(r.bound),
        "observed_rownorm": _rownorm(r.observed),
        "grows_with_max": r.bound_at_example is not None,
        "bound_at_example": r.bound_at_example,
    }
    hidden = kind in ("shape", "plumbing") and r.stores is None and not r.requantise and not runtime_amax
    # a constant kept in high precision (a bias, a norm's weight): nothing to read in the table
    hidden = hidden or (kind == "weight" and r.stores is None)
    row["shown"] = not hidden
    return row


def _activation_operands(node) -> int:
    """How many operands of a matmul-like node are activations (not constants): the amaxes
    per-tensor dynamic scaling would compute for it (weights are static in every scheme)."""
    if node is None:
        return 0
    pos = _FX_OPERANDS.get(op_name(node))
    ins = [node.args[i] for i in pos if i < len(node.args)] if pos else node.all_input_nodes[:2]
    return sum(1 for a in ins if getattr(a, "op", "get_attr") != "get_attr")


@dataclass
class Report:
    """Per-node rows, a summary dict, and the format's name (see the module docstring).

    ``summary`` keys: ``nodes``, ``quantised`` (matmul-like ops on low-precision operands),
    ``low_precision`` (values stored in the format), ``fallbacks`` (ops without a rule), of them
    ``costly_fallbacks`` (whose result needs a run-time amax: it feeds a low-precision operand)
    and ``harmless_fallbacks`` (the rest: they stay in high precision), ``requantise``,
    ``runtime_amax`` (run-time amax reductions: requantise points and inputs / values without
    a static scale), ``baseline_amax`` (what per-tensor dynamic scaling needs: one reduction
    per *activation* operand of each quantised op; weights are static in every scheme) and
    ``hidden`` (rows the default table leaves out). Rows whose bound grows with a declared
    maximum size (``dynamic_shapes=``) have ``grows_with_max`` set (and ``bound_at_example``);
    the summary line counts them.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    fmt_name: str = ""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_rows(cls, rows: list[tuple[str, NodeInfo]], fmt: str | Format | Any) -> Report:
        """From ``(node name, NodeInfo)`` pairs, in graph order. Without the graph, the dynamic
        baseline counts one activation operand per quantised op (use :meth:`from_graph`)."""
        f = get_format(fmt)
        unit = _unit(f)
        out = [_row(name, ni, None, unit) for name, ni in rows]
        return cls(out, _summarise(out, sum(r["kind"] == "quantised" for r in out)), f.name)

    @classmethod
    def from_graph(cls, gm, fmt: str | Format | Any) -> Report:
        """From every node of ``gm`` (a GraphModule or Graph), in graph order; nodes without a
        record get an empty one for their row (the graph is not modified)."""
        f = get_format(fmt)
        unit = _unit(f)
        graph = getattr(gm, "graph", gm)
        out, baseline = [], 0
        for n in graph.nodes:
            if n.op == "call_module" and "guards" in str(n.target):
                continue  # torch.export's input-shape guard: not a value
            row = _row(n.name, n.meta.get(META_KEY), n, unit)
            if row["kind"] == "quantised":
                baseline += _activation_operands(n)
            out.append(row)
        return cls(out, _summarise(out, baseline), f.name)

    # ------------------------------------------------------------------ rendering
    def _table_rows(self, show_all: bool = False) -> list[list[str]]:
        table = []
        for r in self.rows:
            if not (show_all or r["shown"]):
                continue
            cells = []
            for key, _ in COLUMNS:
                v = r.get(key)
                if key == "scale":
                    cells.append(fmt_value(v) if v is not None else _SCALE_FROM.get(r["scale_from"], "-"))
                elif key == "bound":
                    cells.append(f"{fmt_value(v)} (run time)" if r["bound_measured"] and v is not None else fmt_value(v))
                elif key == "observed":
                    cells.append(fmt_value(v, pow2=False))
                elif key == "headroom":
                    cells.append("-" if v is None else f"{v:.1f} {r['unit']}")
                elif key == "requantise":
                    cells.append("yes" if v else "")
                elif key in ("computes", "stores"):
                    cells.append("-" if v is None else str(v))
                elif key in ("node", "source"):
                    cells.append(_abbreviate("" if v is None else str(v), _WIDTH[key]))
                else:
                    cells.append("" if v is None else str(v))
            table.append(cells)
        return table

    def summary_line(self) -> str:
        """One line: what was quantised, fallbacks, requantises, run-time amax vs baseline."""
        s = self.summary
        grows = sum(bool(r.get("grows_with_max")) for r in self.rows)
        return (
            f"{self.fmt_name}: {s['quantised']} of {s['nodes']} nodes quantised "
            f"({s['low_precision']} values stored in {self.fmt_name}), {s['fallbacks']} fallback(s) "
            f"({s['costly_fallbacks']} needing a run-time amax), "
            f"{s['requantise']} requantise point(s); run-time amax reductions: {s['runtime_amax']} "
            f"(per-tensor dynamic scaling: {s['baseline_amax']})"
            + (f"; {grows} bound(s) grow with the declared maximum size" if grows else "")
        )

    def table(self, *, show_all: bool = False, tablefmt: str = "simple") -> str:
        """The table as text; ``show_all`` also lists shape-only and plumbing rows."""
        from tabulate import tabulate

        headers = [h for _, h in COLUMNS]
        return tabulate(self._table_rows(show_all), headers=headers, tablefmt=tablefmt, disable_numparse=True)

    def _legend(self, show_all: bool) -> str:
        unit = self.rows[0]["unit"] if self.rows else "bits"
        hidden = "" if show_all or not self.summary["hidden"] else (
            f"{self.summary['hidden']} shape-only / plumbing / high-precision constant rows not shown (report.table(show_all=True)); ")
        return (f"{hidden}headroom: {unit} the proven scale leaves unused (wasted) on the calibration data; "
                "bound (run time): restarted from a run-time measurement, calibration value shown")

    def __str__(self) -> str:
        return self.table() + "\n" + self._legend(False) + "\n" + self.summary_line()

    def __repr__(self) -> str:
        return f"<Report {self.fmt_name}: {len(self.rows)} rows; {self.summary_line()}>"

    def _repr_html_(self) -> str:
        table = self.table(tablefmt="html")
        return f"{table}\n<p>{html.escape(self.summary_line())}</p>\n<p>{html.escape(self._legend(False))}</p>"

    # ------------------------------------------------------------------ plot
    def plot(self, ax=None, *, max_labels: int = 60):
        """Draw each node's proven bound and observed max |x| on a log2 axis; returns the axes.

        The format's range is drawn **relative to each node's own scale**: for a value stored
        low-precision with a static scale, a vertical bar spans
        ``[log2(scale * smallest_normal), log2(scale * max)]`` (what it can hold at normal
        precision). A fixed pair of horizontal lines at the format's max and smallest normal
        would only be meaningful at scale 1, so none is drawn. A bound above its bar would
        overflow; an observed value below it falls into subnormals. Needs matplotlib.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError(
                "Report.plot needs matplotlib: pip install fxscale[plot] (or pip install matplotlib)"
            ) from e
        fmt = get_format(self.fmt_name)
        if ax is None:
            _, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(self.rows)), 4.0))
        xs, names = [], []
        bx, by, ox, oy = [], [], [], []
        range_label = f"{fmt.name} normal range at the node's scale"
        for i, r in enumerate(self.rows):
            xs.append(i)
            names.append(r["node"])
            b, o = r["bound"], r["observed"]
            if b is not None and b > 0 and math.isfinite(b):
                bx.append(i)
                by.append(math.log2(b))
            if o is not None and o > 0 and math.isfinite(o):
                ox.append(i)
                oy.append(math.log2(o))
            s = r["scale"]
            if r["stores"] is not None and s is not None and s > 0:
                ax.vlines(
                    i, math.log2(s * fmt.smallest_normal), math.log2(s * fmt.max),
                    colors="0.8", linewidth=4, zorder=0, label=range_label,
                )
                range_label = None
        ax.scatter(bx, by, marker="v", color="C3", label="proven bound", zorder=2)
        ax.scatter(ox, oy, marker="o", color="C0", label="observed max |x|", zorder=3)
        ax.set_ylabel("log2 max |x|")
        ax.set_title(f"fxscale: bound vs observed ({fmt.name})")
        if len(names) <= max_labels:
            ax.set_xticks(xs)
            ax.set_xticklabels(names, rotation=90, fontsize=7)
        else:
            ax.set_xlabel("node (graph order)")
        handles, labels = ax.get_legend_handles_labels()
        uniq = {lab: h for h, lab in zip(handles, labels) if lab and not lab.startswith("_")}
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        return ax


def _unit(f: Format) -> str:
    return "binades" if f.is_float else "bits"


def _summarise(rows: list[dict[str, Any]], baseline: int) -> dict[str, Any]:
    fallbacks = [r for r in rows if r["kind"] == "fallback"]
    costly = sum(r["runtime_amax"] for r in fallbacks)
    return {
        "nodes": len(rows),
        "quantised": sum(r["kind"] == "quantised" for r in rows),
        "low_precision": sum(r["stores"] is not None for r in rows),
        "fallbacks": len(fallbacks),
        "costly_fallbacks": costly,
        "harmless_fallbacks": len(fallbacks) - costly,
        "requantise": sum(r["requantise"] for r in rows),
        "runtime_amax": sum(r["runtime_amax"] for r in rows),
        "baseline_amax": baseline,
        "hidden": sum(not r["shown"] for r in rows),
    }

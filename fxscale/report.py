"""``Report``: one row per graph node of what fxscale decided and why.

Built from each node's :class:`fxscale.nodeinfo.NodeInfo` (``node.meta["fxscale"]``), by
:meth:`Report.from_graph` (a GraphModule) or :meth:`Report.from_rows` (``(name, NodeInfo)``
pairs kept before a rewrite). ``str(report)`` is a tabulate table plus a summary line,
``report._repr_html_()`` the same for notebooks, ``report.rows`` the raw dicts, and
``report.plot()`` a log2 chart (needs matplotlib: ``pip install fxscale[plot]``).

>>> from fxscale.nodeinfo import NodeInfo
>>> from fxscale.bound import Bound
>>> r = Report.from_rows([
...     ("x", NodeInfo(op="placeholder", kind="input", format="float8_e4m3fn", observed=(3.0, 5.0))),
...     ("mm", NodeInfo(op="aten.mm", kind="quantised", format="float8_e4m3fn", scale=2.0**-5,
...                     bound=Bound(8.0), observed=(2.0, 3.0), wasted_bits=2.0)),
... ], "e4m3")
>>> r.rows[1]["bound"], r.rows[1]["scale"], r.rows[1]["requantise"]
(8.0, 0.03125, False)
>>> r.summary["runtime_amax"], r.summary["baseline_amax"]
(1, 2)
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

from .formats import Format, get_format
from .nodeinfo import META_KEY, NodeInfo

__all__ = ["Report", "fmt_value"]

#: Columns of ``str(report)`` (row keys, in order) and their headers.
COLUMNS = (
    ("node", "node"),
    ("op", "op"),
    ("kind", "kind"),
    ("format", "format"),
    ("scale", "scale"),
    ("bound", "bound"),
    ("observed", "observed"),
    ("wasted_bits", "wasted"),
    ("requantise", "requant"),
    ("note", "note"),
)

_DEFAULT_KIND = {"placeholder": "input", "get_attr": "weight", "output": "output"}


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


def _runtime_amax(ni: NodeInfo, kind: str) -> bool:
    """Whether this node's scale comes from a run-time amax reduction.

    ``extra["runtime_amax"]`` decides where a pass set it. Otherwise: a requantise point, a
    node whose note says it is measured at run time (inputs without declared bounds, values
    without a proven bound), or an input / fallback stored low-precision without a static scale.
    """
    if "runtime_amax" in ni.extra:
        return bool(ni.extra["runtime_amax"])
    if ni.requantise or "run-time amax" in (ni.note or ""):
        return True
    return kind in ("input", "fallback") and ni.format is not None and ni.scale is None


def _row(name: str, ni: NodeInfo) -> dict[str, Any]:
    op = ni.op or ""
    kind = ni.kind
    if kind == "high" and op in _DEFAULT_KIND:  # NodeInfo's default: say what the node is
        kind = _DEFAULT_KIND[op]
    return {
        "node": name,
        "op": op,
        "kind": kind,
        "format": ni.format,
        "scale": None if ni.scale is None else float(ni.scale),
        "bound": _absmax(ni.bound),
        "observed": _absmax(ni.observed),
        "wasted_bits": None if ni.wasted_bits is None else float(ni.wasted_bits),
        "requantise": bool(ni.requantise),
        "note": ni.note or "",
        "dynamic": bool(ni.dynamic),
        "runtime_amax": _runtime_amax(ni, kind),
        "bound_rownorm": _rownorm(ni.bound),
        "observed_rownorm": _rownorm(ni.observed),
    }


@dataclass
class Report:
    """Per-node rows, a summary dict, and the format's name (see the module docstring).

    ``summary`` keys: ``nodes``, ``quantised`` (matmul-like ops on low-precision operands),
    ``low_precision`` (values stored in the format), ``fallbacks``, ``requantise``,
    ``runtime_amax`` (run-time amax reductions: requantise points and inputs / values
    without a static scale) and ``baseline_amax`` (what per-tensor dynamic scaling needs:
    one reduction per matmul operand, two per quantised op).
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    fmt_name: str = ""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_rows(cls, rows: list[tuple[str, NodeInfo]], fmt: str | Format | Any) -> Report:
        """From ``(node name, NodeInfo)`` pairs, in graph order."""
        f = get_format(fmt)
        out = [_row(name, ni) for name, ni in rows]
        return cls(out, _summarise(out), f.name)

    @classmethod
    def from_graph(cls, gm, fmt: str | Format | Any) -> Report:
        """From every node of ``gm`` (a GraphModule or Graph); nodes without NodeInfo get an
        empty one (the graph is not modified)."""
        graph = getattr(gm, "graph", gm)
        pairs = []
        for n in graph.nodes:
            ni = n.meta.get(META_KEY)
            if ni is None:
                from .nodeinfo import _op_name

                ni = NodeInfo(op=_op_name(n))
            pairs.append((n.name, ni))
        return cls.from_rows(pairs, fmt)

    # ------------------------------------------------------------------ rendering
    def _table_rows(self) -> list[list[str]]:
        table = []
        for r in self.rows:
            cells = []
            for key, _ in COLUMNS:
                v = r.get(key)
                if key in ("scale", "bound"):
                    cells.append(fmt_value(v))
                elif key == "observed":
                    cells.append(fmt_value(v, pow2=False))
                elif key == "wasted_bits":
                    cells.append("-" if v is None else f"{v:.1f}")
                elif key == "requantise":
                    cells.append("yes" if v else "")
                elif key == "format":
                    cells.append("-" if v is None else str(v))
                else:
                    cells.append("" if v is None else str(v))
            table.append(cells)
        return table

    def summary_line(self) -> str:
        """One line: what was quantised, fallbacks, requantises, run-time amax vs baseline."""
        s = self.summary
        return (
            f"{self.fmt_name}: {s['quantised']} of {s['nodes']} nodes quantised "
            f"({s['low_precision']} values stored in {self.fmt_name}), {s['fallbacks']} fallback(s), "
            f"{s['requantise']} requantise point(s); run-time amax reductions: {s['runtime_amax']} "
            f"(per-tensor dynamic scaling: {s['baseline_amax']})"
        )

    def __str__(self) -> str:
        from tabulate import tabulate

        headers = [h for _, h in COLUMNS]
        return tabulate(self._table_rows(), headers=headers, disable_numparse=True) + "\n" + self.summary_line()

    def __repr__(self) -> str:
        return f"<Report {self.fmt_name}: {len(self.rows)} rows; {self.summary_line()}>"

    def _repr_html_(self) -> str:
        from tabulate import tabulate

        headers = [h for _, h in COLUMNS]
        table = tabulate(self._table_rows(), headers=headers, tablefmt="html", disable_numparse=True)
        return f"{table}\n<p>{html.escape(self.summary_line())}</p>"

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
            if r["format"] is not None and s is not None and s > 0:
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


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    quantised = sum(r["kind"] == "quantised" for r in rows)
    return {
        "nodes": len(rows),
        "quantised": quantised,
        "low_precision": sum(r["format"] is not None for r in rows),
        "fallbacks": sum(r["kind"] == "fallback" for r in rows),
        "requantise": sum(r["requantise"] for r in rows),
        "runtime_amax": sum(r["runtime_amax"] for r in rows),
        "baseline_amax": 2 * quantised,
    }

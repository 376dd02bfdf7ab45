"""``NodeInfo``: everything fxscale learns about one graph node, in ``node.meta["fxscale"]``.

The passes fill it in (calibrate: ``observed``; precision: ``demand``, ``precision``, ``precision_why``; bounds: ``bound``; requantise: ``requantise``,
``wasted_bits``; lower: ``format``, ``scale``, ``kind``, ``note``) and :class:`fxscale.report.Report`
turns it into one table row per node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

META_KEY = "fxscale"

#: How a node runs in the transformed graph.
KINDS = (
    "input",        # a graph input
    "weight",       # a constant (parameter / buffer), quantised once where a matmul reads it
    "quantised",    # a matmul-like op on low-precision operands
    "high",         # runs in the model's precision (bounds still tracked)
    "shape",        # moves data without arithmetic
    "fallback",     # no rule: runs in high precision, bound unknown (consumers measure at run time)
    "output",
)


@dataclass
class NodeInfo:
    """Per-node results of the fxscale passes (all optional until the pass that sets them ran)."""

    op: str = ""                      # short op name, e.g. "aten.linear"
    kind: str = "high"
    format: str | None = None         # storage format where the value is stored low-precision
    scale: float | None = None        # static scale; None where it is decided at run time
    dynamic: bool = False             # scale / bound depends on run-time measurements
    bound: Any = None                 # fxscale.bound.Bound (floats) proven on the calibration stats
    observed: Any = None              # fxscale.bound.Bound-like: observed absmax / rownorm (floats)
    wasted_bits: float | None = None  # projected log2(bound / observed) for the absmax
    requantise: bool = False          # a run-time amax restarts the bound here
    demand: float | None = None       # precision: error its consumers tolerate, relative to observed max |x|
    precision: str | None = None      # precision, matmul-like nodes: "low" (quantised) or "high"
    precision_why: str = ""           # precision: why a matmul stays in high precision
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bound_absmax(self) -> float | None:
        return None if self.bound is None else float(self.bound.absmax)

    @property
    def observed_absmax(self) -> float | None:
        return None if self.observed is None else float(self.observed[0])


def info(node) -> NodeInfo:
    """The node's :class:`NodeInfo`, created empty on first access."""
    if META_KEY not in node.meta:
        node.meta[META_KEY] = NodeInfo(op=_op_name(node))
    return node.meta[META_KEY]


def _op_name(node) -> str:
    if node.op == "call_function":
        t = node.target
        name = getattr(t, "__name__", str(t))
        if hasattr(t, "_schema"):
            pk = t._schema.name.replace("::", ".")
            return pk
        return name
    if node.op == "call_module":
        return f"module:{node.target}"
    return node.op

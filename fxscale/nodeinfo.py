"""``NodeInfo``: the one typed record of what fxscale learns about a graph node, in
``node.meta["fxscale"]``.

Each field is written by one pass (named beside it) and read by later passes and by
:class:`fxscale.report.Report`; ``reasons`` is the one list every pass may append to (short
strings, for people: nothing parses them). The record has slots, so a misspelt or retired
field name raises instead of being stored silently.

>>> ni = NodeInfo(op="aten.linear")
>>> ni.reasons.append("K=40 not a multiple of 16")
>>> ni.note
'K=40 not a multiple of 16'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

META_KEY = "fxscale"

#: How a node runs (``NodeInfo.kind``, written by the analyse pass; the report adds "output"
#: and "plumbing" for the scale / quantise / measurement nodes the lowering inserts).
KINDS = (
    "input",        # a graph input
    "weight",       # a constant (parameter / buffer), quantised once where a matmul reads it
    "quantised",    # a matmul-like op planned on low-precision operands
    "high",         # runs in the model's precision (bounds still tracked)
    "shape",        # moves data without arithmetic, or computes sizes / indices
    "fallback",     # no rule: runs in high precision, bound unknown (consumers measure at run time)
    "output",
    "plumbing",     # inserted by the lowering: quantise, scale buffers, run-time measurements
)


@dataclass(slots=True)
class NodeInfo:
    """Per-node results of the fxscale passes (each None / empty until its pass ran)."""

    op: str = ""                                # the node's op when the record was made, e.g. "aten.linear"
    # calibrate
    observed: tuple[float, float] | None = None  # (max |x|, max row norm) seen on the calibration inputs
    observed_list: list | None = None           # per output element, for nodes with several outputs
    # precision (what may be low precision: DESIGN decision 9)
    demand: float | None = None                 # error its consumers tolerate, relative to observed max |x|
    precision: str | None = None                # matmul-like nodes: "low" (quantised) or "high"
    precision_why: str = ""                     # why a matmul stays in high precision
    # analyse (bounds dataflow, weight quantisation, requantise placement)
    kind: str = "high"                          # one of KINDS
    bound: Any = None                           # fxscale.bound.Bound (floats): the proven bound
    dynamic: bool = False                       # the bound depends on run-time measurements
    measured: bool = False                      # planned: its scale comes from a run-time amax
    wasted_bits: float | None = None            # projected log2(bound / observed): before the requantise, if any
    requantise: bool = False                    # a run-time amax restarts the bound here
    bound_at_example: float | None = None       # max |x| bound at the example's sizes, where the bound
                                                # grows with a declared maximum size (dynamic_shapes)
    # lower
    computes: str | None = None                 # operand format of a matmul-like op (None: high precision)
    stores: str | None = None                   # format the value is stored in for its consumers, or None
    scale: float | None = None                  # static scale of the stored value; None where set at run time
    scale_from: str | None = None               # "static", "amax" (run-time amax), "rules" (ScaleFn at run time)
    # every pass
    reasons: list[str] = field(default_factory=list)

    @property
    def note(self) -> str:
        """The reasons, joined for display."""
        return "; ".join(self.reasons)

    @property
    def bound_absmax(self) -> float | None:
        return None if self.bound is None else float(self.bound.absmax)

    @property
    def observed_absmax(self) -> float | None:
        return None if self.observed is None else float(self.observed[0])


def info(node) -> NodeInfo:
    """The node's :class:`NodeInfo`, created empty on first access."""
    if META_KEY not in node.meta:
        node.meta[META_KEY] = NodeInfo(op=op_name(node))
    return node.meta[META_KEY]


def op_name(node) -> str:
    """Short name of what ``node`` runs: ``"aten.linear"``, ``"fxscale.scaled_linear"``, ``"placeholder"``."""
    if node.op == "call_function":
        t = node.target
        if hasattr(t, "_schema"):
            return t._schema.name.replace("::", ".")
        return getattr(t, "__name__", str(t))
    if node.op == "call_module":
        return f"module:{node.target}"
    return node.op

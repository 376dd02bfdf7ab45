"""The compiler checks itself (DESIGN decision 11): at transform time every node with a proven
bound is compared with what calibration observed on it. Observed above the bound is a compiler
bug (a rule that does not bound what its op computes), and transform raises
:class:`SelfCheckError` naming the node, the op and the rule.
"""

from __future__ import annotations

import math

from torch import fx

from fxscale.bound import Bound
from fxscale.nodeinfo import info
from fxscale.runtime import Analysis

__all__ = ["SELF_CHECK_SLACK", "SelfCheckError", "beyond_declared", "self_check"]


class SelfCheckError(RuntimeError):
    """A proven bound is below what calibration observed: a compiler bug (DESIGN decision 11)."""


#: Slack of the self-check: the bounds are of what the transformed graph computes (quantised
#: weights and operands, which round by up to 1/16 in e4m3), the observations of the float
#: model: a bound may sit that much below an observation without being wrong.
SELF_CHECK_SLACK = 1 + 2.0**-3


def self_check(n: fx.Node, step, an: Analysis, skip: set[str]) -> None:
    """Raise :class:`SelfCheckError` if ``n``'s proven bound (max |x| or row norm) is below what
    calibration observed on it, naming the node, the op and the rule. Nodes in ``skip`` (they
    depend on an example input beyond its declared bound, which the proof assumes) are not checked."""
    b, ni = an.bounds.get(n.name), info(n)
    if not isinstance(b, Bound) or ni.observed is None or n.name in skip:
        return
    for what, bound, seen in (("max |x|", b.absmax, ni.observed[0]), ("row norm", b.rownorm, ni.observed[1])):
        bound, seen = float(bound), float(seen)
        if math.isfinite(seen) and seen > bound * SELF_CHECK_SLACK + 1e-30:
            from fxscale.rules import lookup

            rule = lookup(step.op)
            name = f"{rule.fn.__module__}.{rule.fn.__qualname__}" if rule is not None else "none"
            raise SelfCheckError(
                f"fxscale self-check failed at node {n.format_node()}: op {ni.op}, rule {name}: "
                f"calibration observed {what} = {seen:.6g}, above the proven bound {bound:.6g}. The rule "
                "does not bound what the op computes here: a compiler bug, please report it with the "
                "model; until it is fixed, transform without this op (or with rules='absmax')."
            )


def beyond_declared(gm: fx.GraphModule, input_bounds: dict) -> set[str]:
    """Nodes that depend on an example input beyond its declared bound (whose proofs assume it),
    or on a bounded input calibration does not measure (an integer input: position ids)."""
    tainted: set[str] = set()
    for m in gm.graph.nodes:
        if m.op == "placeholder" and m.name in input_bounds:
            d = input_bounds[m.name]
            a, r = d if isinstance(d, tuple) else (d, None)
            o = info(m).observed
            if o is None or o[0] > a or (r is not None and o[1] > r):
                tainted.add(m.name)
        elif any(i.name in tainted for i in m.all_input_nodes):
            tainted.add(m.name)
    return tainted

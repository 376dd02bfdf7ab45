"""The lowering's fusions, as (pattern, replacement) pairs matched by argument name.

A :class:`LinearCall` is ``fxscale::scaled_linear``'s arguments by schema name: patterns read
``call.out_fmt``, ``call.activation``, ..., never ``node.args[7]``, and replacements build the
new call with :func:`dataclasses.replace`, so a new argument of the op (with a default) breaks
no fusion. Each :class:`Fusion` is a ``match(lowering, node) -> dict | None`` (the pattern:
the named pieces it found, or None) and a ``rewrite(lowering, pieces)`` (the replacement).
Rewrites happen in place: the node whose value the fused op computes keeps its name, meta and
record, so the report (read from the final graph) names it as the model did.

Epilogue fusions (:data:`EPILOGUE`), where a linear (and its activation) feeds only a quantise:

* ``requantise epilogue``: the value is a requantise point (scale from its run-time amax):
  ``scaled_linear_requantise`` (amax in the epilogue) returns data, scale and stats;
* ``cast epilogue``: a static or rule-computed scale: ``scaled_linear(..., out_scale, out_fmt)``
  writes the low-precision data itself;
* ``gated requantise``: ``act(gate) * up`` (a SwiGLU / GeGLU MLP's product) that is a
  requantise point: ``gated_requantise`` computes the product, its amax and the cast in one op.

:data:`RESIDUAL` (``fuse_residual=True``): ``add(scaled_linear(...), r)`` ->
``scaled_linear(..., residual=r)`` where the linear's plain output feeds only that add and ``r``
has the same shape and dtype.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx

from fxscale.nodeinfo import info
from fxscale.rules import normalise

aten = torch.ops.aten
fxops = torch.ops.fxscale

__all__ = ["EPILOGUE", "RESIDUAL", "Fusion", "LinearCall", "apply"]

#: Activations a linear's epilogue computes, by ATen op -> the op's ``activation`` name.
ACTIVATIONS: dict[Any, Callable[[fx.Node], str]] = {
    aten.relu.default: lambda n: "relu",
    aten.silu.default: lambda n: "silu",
    aten.gelu.default: lambda n: "gelu_tanh" if normalise(n.target, n.args, n.kwargs)["approximate"] == "tanh" else "gelu",
}


@dataclass(frozen=True)
class LinearCall:
    """``fxscale::scaled_linear``'s arguments, by the op's schema names."""

    x: Any
    x_scale: Any
    w: Any
    w_scale: Any
    bias: Any = None
    activation: str = "none"
    out_scale: Any = None
    out_fmt: str | None = None
    out_dtype: torch.dtype = torch.float32
    residual: Any = None

    @classmethod
    def of(cls, node: fx.Node) -> LinearCall | None:
        """The call ``node`` makes, or None if it is not a ``scaled_linear``."""
        if node.op != "call_function" or node.target is not fxops.scaled_linear.default:
            return None
        return cls(**normalise(node.target, node.args, node.kwargs))

    def args(self) -> tuple:
        """Positional arguments in the schema's order (``residual`` only when given)."""
        names = [f.name for f in dataclasses.fields(self)]
        if self.residual is None:
            names.remove("residual")
        return tuple(getattr(self, k) for k in names)

    def emit(self, node: fx.Node) -> None:
        """Make ``node`` this call, in place."""
        node.target, node.args, node.kwargs = fxops.scaled_linear.default, self.args(), {}


@dataclass(frozen=True)
class Fusion:
    """A pattern (``match``: the named pieces found at a node, or None) and its replacement."""

    name: str
    match: Callable[[Any, fx.Node], dict | None]
    rewrite: Callable[[Any, dict], None]


def apply(lw: Any, fusions: tuple[Fusion, ...]) -> None:
    """Try each fusion at each node of ``lw.g`` (graph order); the first that matches rewrites."""
    # A rewrite erases only nodes already visited (the matched linear) or nodes no pattern
    # starts at (quantise, scale and measurement plumbing), so the snapshot stays valid.
    for node in list(lw.g.nodes):
        for f in fusions:
            pieces = f.match(lw, node)
            if pieces is not None:
                f.rewrite(lw, pieces)
                break


# ============================================================================ epilogue
def _epilogue(lw: Any, lin: fx.Node) -> dict | None:
    """A plain linear (then maybe its activation ``y``) whose value only a quantise reads."""
    call = LinearCall.of(lin)
    if call is None or call.out_fmt is not None or call.activation != "none" or call.residual is not None:
        return None
    y, act = lin, "none"
    if len(lin.users) == 1:
        u = next(iter(lin.users))
        if u.op == "call_function" and u.target in ACTIVATIONS and u.args[0] is lin:
            y, act = u, ACTIVATIONS[u.target](u)
    if y.name not in lw.lowp or not any(u.target is fxops.quantise.default for u in y.users):
        return None
    q, sc = lw.lowp[y.name]
    stats = lw.stats_nodes.get(y.name)
    if any(u is not q and u is not stats for u in y.users):
        return None
    return {"lin": lin, "call": call, "y": y, "act": act, "q": q, "sc": sc, "stats": stats}


def _match_requantise(lw: Any, node: fx.Node) -> dict | None:
    p = _epilogue(lw, node)
    return p if p is not None and p["y"].name in lw.an.measured and p["stats"] is not None else None


def _match_cast(lw: Any, node: fx.Node) -> dict | None:
    p = _epilogue(lw, node)
    if p is None or p["y"].name in lw.an.measured:
        return None
    sc, lin = p["sc"], p["lin"]
    if not _defined_before(sc, lin, lw.g) and not (
            sc.op == "get_attr" or all(_defined_before(i, lin, lw.g) for i in sc.all_input_nodes)):
        return None  # the scale needs values computed after the linear
    return p


def _take_requantise(lw: Any, p: dict) -> None:
    """``p["y"]`` now returns ``(data, scale, stats)``: its getitems replace the requantise's
    quantise, scale and measurement nodes (``q``, ``sc``, ``stats``), whose chains go."""
    y, q, sc, stats = p["y"], p["q"], p["sc"], p["stats"]
    y.meta.pop("val", None)  # a (data, scale, stats) tuple now
    with lw.g.inserting_after(y):
        data = lw.g.call_function(operator.getitem, (y, 0))
    with lw.g.inserting_after(data):
        scale = lw.g.call_function(operator.getitem, (y, 1))
    with lw.g.inserting_after(scale):
        st = lw.g.call_function(operator.getitem, (y, 2))
    q.replace_all_uses_with(data)
    sc.replace_all_uses_with(scale)
    stats.replace_all_uses_with(st)
    for dead in (q, sc, stats):
        lw.erase_chain(dead)


def _rewrite_requantise(lw: Any, p: dict) -> None:
    y, c = p["y"], p["call"]
    y.target, y.kwargs = fxops.scaled_linear_requantise.default, {}
    y.args = (c.x, c.x_scale, c.w, c.w_scale, c.bias, p["act"], lw.fmt.name)
    _take_requantise(lw, p)
    _merge(lw, p, "amax + cast fused into the epilogue")


def _rewrite_cast(lw: Any, p: dict) -> None:
    y, lin, q, sc = p["y"], p["lin"], p["q"], p["sc"]
    if not _defined_before(sc, lin, lw.g):
        lin.prepend(sc)
    dataclasses.replace(p["call"], activation=p["act"], out_scale=sc, out_fmt=lw.fmt.name).emit(y)
    y.meta.pop("val", None)  # low-precision data now
    q.replace_all_uses_with(y)
    lw.g.erase_node(q)
    _merge(lw, p, "cast fused into the epilogue")


def _merge(lw: Any, p: dict, what: str) -> None:
    """``y`` computes the fused value: it takes the linear's decisions and reasons; the linear goes."""
    y, lin, act = p["y"], p["lin"], p["act"]
    rec = info(y)
    if act != "none":
        what = f"{act} + {what}"
    if y is not lin:
        lrec = info(lin)
        rec.computes = lrec.computes
        rec.reasons[:0] = lrec.reasons
        what = f"{lin.name} with {what}"
        lw.g.erase_node(lin)
    rec.reasons.append(what)


# ============================================================================ gated
def _match_gated(lw: Any, y: fx.Node) -> dict | None:
    """``y = act(gate) * up`` (either order) that is a requantise point and read only by its
    quantise and measurement, ``act``'s value read only by ``y``, gate and up of y's shape."""
    if y.op != "call_function" or y.target is not aten.mul.Tensor or y.kwargs or len(y.args) != 2:
        return None
    if y.name not in lw.lowp or y.name not in lw.an.measured or lw.stats_nodes.get(y.name) is None:
        return None
    q, sc = lw.lowp[y.name]
    stats = lw.stats_nodes[y.name]
    if any(u is not q and u is not stats for u in y.users):
        return None
    for a, up in (y.args, y.args[::-1]):
        if not (isinstance(a, fx.Node) and isinstance(up, fx.Node) and a is not up and a.op == "call_function"
                and a.target in ACTIVATIONS and len(a.users) == 1 and isinstance(a.args[0], fx.Node)):
            continue
        gate = a.args[0]
        vals = [n.meta.get("val") for n in (gate, up, y)]
        # shapes compared as text: symbolic batch sizes compare without guards
        if (all(isinstance(v, Tensor) for v in vals) and vals[0].dtype.is_floating_point
                and len({(str(v.shape), v.dtype) for v in vals}) == 1):
            return {"y": y, "act_node": a, "act": ACTIVATIONS[a.target](a), "gate": gate, "up": up,
                    "q": q, "sc": sc, "stats": stats}
    return None


def _rewrite_gated(lw: Any, p: dict) -> None:
    y, a = p["y"], p["act_node"]
    y.target, y.kwargs = fxops.gated_requantise.default, {}
    y.args = (p["gate"], p["up"], p["act"], lw.fmt.name)
    _take_requantise(lw, p)
    lw.g.erase_node(a)
    info(y).reasons.append(f"{a.name} ({p['act']}) * {p['up'].name}, amax + cast fused: one gated requantise "
                           "(h never written)")


#: Epilogue fusions, tried in this order at every node.
EPILOGUE = (
    Fusion("requantise epilogue", _match_requantise, _rewrite_requantise),
    Fusion("cast epilogue", _match_cast, _rewrite_cast),
    Fusion("gated requantise", _match_gated, _rewrite_gated),
)


# ============================================================================ residual
def _match_residual(lw: Any, lin: fx.Node) -> dict | None:
    call = LinearCall.of(lin)
    if call is None or call.out_fmt is not None or call.residual is not None or len(lin.users) != 1:
        return None
    add = next(iter(lin.users))
    if add.op != "call_function" or add.target is not aten.add.Tensor or add.kwargs or len(add.args) != 2:
        return None
    r = add.args[1] if add.args[0] is lin else add.args[0]
    if not isinstance(r, fx.Node) or r is lin:
        return None
    vals = [n.meta.get("val") for n in (lin, r, add)]
    # shapes compared as text: symbolic batch sizes compare without guards
    if not all(isinstance(v, Tensor) for v in vals) or len({(str(v.shape), v.dtype) for v in vals}) != 1:
        return None
    return {"lin": lin, "call": call, "add": add, "residual": r}


def _rewrite_residual(lw: Any, p: dict) -> None:
    lin, add = p["lin"], p["add"]
    # ``add`` keeps its name, value and record; it becomes the linear with the add fused.
    dataclasses.replace(p["call"], residual=p["residual"]).emit(add)
    rec, lrec = info(add), info(lin)
    rec.computes = lrec.computes
    rec.reasons[:0] = lrec.reasons
    rec.reasons.append(f"{lin.name} with the residual add fused into the matmul epilogue")
    lw.g.erase_node(lin)


RESIDUAL = (Fusion("residual add", _match_residual, _rewrite_residual),)


def _defined_before(a: fx.Node, b: fx.Node, g: fx.Graph) -> bool:
    for n in g.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False

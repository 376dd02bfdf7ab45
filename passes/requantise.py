"""Requantise placement: where projected wasted bits pass the threshold, measure at run time.

The projected waste of a low-precision value ``v`` is ``log2(bound(v) / observed(v))``: how
many bits (integers) or binades (floats) the proven scale leaves unused on the calibration
data. Where it passes the format's threshold, a *requantise* goes in: ``v``'s scale comes
from a run-time amax of its high-precision value (fused into ``v``'s producer when that is
a matmul), and ``v``'s bound restarts from that measurement, tightening everything after it.

Placement is greedy in topological order: walk the graph computing bounds; at the first
low-precision value over the threshold, requantise *that value* and go on. On a chain this
is optimal: any placement must requantise at or before the first violation, and moving that
requantise down to the violation itself only tightens the bounds after it (the measured
bound is the tightest there is). On a DAG it is a heuristic: an earlier requantise at a
common ancestor could serve two branches at once.

>>> # see tests/test_requantise.py for worked examples
"""

from __future__ import annotations

import math
import warnings

import networkx as nx
import torch
from torch import fx

from fxscale.bound import Bound
from fxscale.formats import Format
from fxscale.nodeinfo import info
from fxscale.rules import lookup

from .bounds import (
    Analysis,
    build_steps,
    concrete_shape,
    declared_bound,
    evaluate_step,
    is_float_value,
    is_grouped,
    measured_bound,
    quantise_const,
    quantise_const_grouped,
)
from .self_check import SelfCheckError, beyond_declared, self_check  # noqa: F401  (SelfCheckError re-exported)

aten = torch.ops.aten

__all__ = ["analyse", "dependency_graph", "projected_waste"]


def projected_waste(bound: Bound | None, observed) -> float | None:
    """``log2(bound.absmax / observed absmax)``; None if either is unknown, inf if observed is 0."""
    if bound is None or observed is None:
        return None
    b, o = float(bound.absmax), float(observed[0])
    if not (math.isfinite(o) and math.isfinite(b)):
        return None  # an Inf example value: nothing to project
    if b == 0:
        return 0.0
    if o == 0:
        return math.inf
    return max(0.0, math.log2(b / o))


def dependency_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The dataflow graph: an edge ``a -> b`` where node ``b`` reads node ``a``."""
    g = nx.DiGraph()
    for i, n in enumerate(gm.graph.nodes):
        g.add_node(n.name, order=i)
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


#: Ops whose output bound does not depend on their input's bound: paths through them carry
#: no bound information, so a weight's spectral norm upstream of them cannot matter.
RESETS = ("aten.layer_norm", "fxscale.layer_norm", "aten.rms_norm", "aten.softmax", "aten._softmax", "aten.sigmoid", "aten.embedding")


def weights_needing_spectral(gm: fx.GraphModule, steps: dict, operand_of: dict[str, list[str]]) -> set[str]:
    """Constant matmul operands whose spectral norm can change a low-precision value's bound.

    A weight's spectral norm bounds the *row norm* of its matmul's output ``m``; a row norm
    changes an absmax only through a later matmul ``m2`` (Cauchy-Schwarz). So the spectral
    norm matters only if some ``m2`` is reachable from ``m`` and ``m2``'s output reaches a
    low-precision value, both without passing an op that resets bounds (LayerNorm, softmax,
    ...). Computing it costs an eigen-decomposition, so we skip it everywhere else.
    """
    g = dependency_graph(gm)
    g.remove_nodes_from([n.name for n in gm.graph.nodes if info(n).op in RESETS or n.op == "get_attr"])
    matmuls = [name for name, st in steps.items() if st.quantised and name in g]
    operands = set(operand_of)
    feeds_operand = {m for m in matmuls if (nx.descendants(g, m) | {m}) & operands}
    need: set[str] = set()
    for m in matmuls:
        if (nx.descendants(g, m) - {m}) & feeds_operand:
            st = steps[m]
            need |= {st.args[p].name for p in st.quantised}
    return need


#: How far past the requantise threshold a declared input bound may sit above what calibration
#: saw before transform warns: the input's static scale then leaves it few of the format's bits.
LOOSE_MARGIN = 3.0


def _warn_if_loose(n: fx.Node, declared: float, observed, fmt: Format, threshold: float) -> None:
    """A declared bound far above the inputs calibration saw: the static scale it implies rounds
    them away (int8 with a bound of 1000 for unit data: every value 0, SQNR 0.7 dB; found by an
    adversarial trial). Said, not changed: the declaration is the user's."""
    waste = projected_waste(Bound(declared), observed)
    if waste is None or not waste > threshold + LOOSE_MARGIN:
        return
    name = n.meta.get("shown_name", n.name)
    warnings.warn(
        f"input {name!r}: its declared bound {declared:g} is 2^{waste:.1f} above the largest |x| the example and "
        f"calibration inputs reached ({float(observed[0]):.3g}); its static {fmt.name} scale, chosen for the "
        "bound, rounds such inputs to few or no bits (outputs lose their precision). Declare a bound close to "
        "the inputs' real range, or none (measured per call)",
        stacklevel=2,
    )


def analyse(
    gm: fx.GraphModule,
    *,
    fmt: Format,
    mode: str = "rownorm",
    threshold: float | None = None,
    input_bounds: dict[str, float | None] | None = None,
    requantise: bool = True,
) -> Analysis:
    """Bounds for every node, with requantise points placed greedily (see module docstring).

    ``input_bounds`` maps placeholder names to a declared max |x| (None: measured at run time).
    Writes each node's ``NodeInfo`` fields of this pass: kind, bound, dynamic, measured,
    wasted_bits, requantise (and appends reasons).
    """
    threshold = fmt.threshold if threshold is None else float(threshold)
    input_bounds = input_bounds or {}
    an = Analysis(fmt, mode)
    steps = an.steps = {s.name: s for s in build_steps(gm)}
    operand_of: dict[str, list[str]] = {}
    for s in steps.values():
        for pos in s.quantised:
            operand_of.setdefault(s.args[pos].name, []).append(s.name)
    spectral = weights_needing_spectral(gm, steps, operand_of) if mode == "rownorm" else set()
    mutated = mutated_attrs(gm)
    _constants(gm, an, steps, operand_of, spectral, mutated)
    unchecked = beyond_declared(gm, input_bounds)

    for n in gm.graph.nodes:
        ni = info(n)
        shape = concrete_shape(n.meta.get("val"))
        if shape is not None:
            an.shapes[n.name] = shape
        if n.op == "placeholder":
            ni.kind = "input"
            declared = input_bounds.get(n.name)
            if not is_float_value(n):
                if declared is not None and shape is not None:  # an integer input used as a number
                    an.bounds[n.name] = declared_bound(declared, shape)
                    an.deps[n.name] = frozenset()
                    a = declared[0] if isinstance(declared, tuple) else declared
                    ni.reasons.append(f"not floating point: declared max|x| <= {a:g}")
                else:
                    ni.reasons.append("not floating point: passed through")
                continue
            if declared is not None:
                an.bounds[n.name] = declared_bound(declared, shape)
                an.deps[n.name] = frozenset()
                a, r = declared if isinstance(declared, tuple) else (declared, None)
                ni.reasons.append(f"declared max|x| <= {a:g}" + ("" if r is None else f", row norm <= {r:g}"))
                if n.name in operand_of:
                    _warn_if_loose(n, a, ni.observed, fmt, threshold)
            else:
                _measure(an, n, "input without a declared bound: run-time amax")
        elif n.op == "get_attr":
            if n.name in mutated:  # state the forward updates (a counter): not a constant
                ni.reasons.append("updated by the forward: no constant bound")
                continue
            if n.name not in an.consts:
                continue
            b = an.bounds[n.name]
            an.deps[n.name] = frozenset()
            ni.observed = (float(b.absmax), float(b.rownorm))  # exact for a constant
            ni.kind = "weight"
        elif n.op == "call_function":
            step = steps[n.name]
            evaluate_step(step, an)
            self_check(n, step, an, unchecked)
            if step.quantised:
                ni.kind = "quantised"
            elif ni.precision == "high":
                ni.kind = "high"
                ni.reasons.append(ni.precision_why)
            elif n.name in an.failures and is_float_value(n) and an.failures[n.name] == "no rule":
                if n.users and all(u.name in steps and steps[u.name].op is torch.ops.aten.rms_norm.default
                                   for u in n.users):  # the rsqrt of a written-out RMSNorm
                    ni.kind = "high"
                    ni.reasons.append(f"{ni.op}: the statistic of an RMSNorm (its product is bounded as "
                                      "rms_norm is): high precision, nothing measured")
                else:
                    ni.kind = "fallback"
                    ni.reasons.append(f"no rule for {ni.op}: runs in high precision")
            elif _shape_only(n, step):
                ni.kind = "shape"
            if n.name in operand_of and is_float_value(n):
                b = an.bounds.get(n.name)
                if not isinstance(b, Bound) or not b.is_finite():
                    _measure(an, n, f"no proven bound ({an.failures.get(n.name, 'unbounded')}): run-time amax")
                elif requantise:
                    waste = projected_waste(b, ni.observed)
                    if waste is not None and waste > threshold:
                        ni.wasted_bits = waste
                        _measure(an, n, f"requantise: projected {waste:.1f} wasted bits > {threshold:g}")
                        ni.requantise = True
        b = an.bounds.get(n.name)
        if isinstance(b, Bound) and b.is_finite():
            ni.bound = b.as_floats()
            ni.dynamic = bool(an.deps.get(n.name))
            if ni.wasted_bits is None:
                ni.wasted_bits = projected_waste(ni.bound, ni.observed)
    return an


def _constants(gm: fx.GraphModule, an: Analysis, steps: dict, operand_of: dict, spectral: set[str],
               mutated: set[str]) -> None:
    """Bounds of the floating-point constants; matmul operands quantised once. Attributes the
    forward writes (``mutated``) are state, not constants: they get no constant bound.

    In a tensor-parallel graph (one with collectives) every rank's constants are combined
    across ranks (``passes.distributed``), so that all ranks derive the same bounds and scales.
    """
    from .distributed import agree_amax, agree_bounds, process_group

    group = process_group(gm)
    consts = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            value = _attr(gm, n.target)
            if hasattr(value, "dtype") and value.dtype.is_floating_point and n.name not in mutated:
                consts[n.name] = (n, value)
    amax = {k: float(v.detach().abs().max()) if v.numel() else 0.0 for k, (_, v) in consts.items() if k in operand_of}
    if group is not None:
        amax = agree_amax(group, amax)
    for name, (n, value) in consts.items():
        an.consts[name] = value
        if name in operand_of:
            if not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"weight {n.target!r} (node {n.format_node()}) holds NaN or Inf: it cannot be "
                    "quantised with a finite scale. Check the checkpoint (torch.isfinite(w).all())."
                )
            grouped = value.dim() == 3 and all(is_grouped(steps[u].op) for u in operand_of[name])
            q = an.quantised_consts[name] = (
                quantise_const_grouped(value, an.fmt) if grouped and group is None  # one static scale per expert
                else quantise_const(value, an.fmt, spectral=name in spectral, amax=amax[name])
            )
            if all(name in _operand_names(steps[u.name]) for u in n.users if u.name in steps):
                an.bounds[name] = q[2]  # only matmuls read it: the stored weight is the value
        if name not in an.bounds:
            rows_only = all(u.target is aten.embedding.default for u in n.users)  # a lookup table
            an.bounds[name] = Bound.of_tensor(value, spectral=False, columns=not rows_only)
    if group is not None:
        agree_bounds(group, an)


def _shape_only(n: fx.Node, step) -> bool:
    """Moves or indexes data without arithmetic (a shape rule), or computes no float value."""
    if step.getitem is not None or not is_float_value(n):
        return True
    rule = lookup(step.op)
    return rule is not None and rule.exact


def mutated_attrs(gm: fx.GraphModule) -> set[str]:
    """``get_attr`` nodes that an op of the graph writes to (``copy_(buffer, ...)``, directly or
    through a view): their values change between calls, so they are no constants."""
    out: set[str] = set()
    for n in gm.graph.nodes:
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        if schema is None or not schema.is_mutable:
            continue
        for a, arg in zip(schema.arguments, n.args):
            if a.alias_info is None or not a.alias_info.is_write or not isinstance(arg, fx.Node):
                continue
            while arg.op == "call_function" and arg.args and isinstance(arg.args[0], fx.Node) and \
                    getattr(arg.target, "_schema", None) is not None and arg.target._schema.returns and \
                    arg.target._schema.returns[0].alias_info is not None:
                arg = arg.args[0]  # a view: the write reaches its base
            if arg.op == "get_attr":
                out.add(arg.name)
    return out


def _operand_names(step) -> set[str]:
    return {step.args[p].name for p in step.quantised}


def _measure(an: Analysis, n: fx.Node, why: str) -> None:
    ni = info(n)
    if ni.observed is None:
        raise ValueError(
            f"node {n.format_node()} needs a run-time scale but calibration recorded no value for it; "
            "run calibrate() first"
        )
    an.bounds[n.name] = measured_bound(ni.observed, an.shapes[n.name])
    an.deps[n.name] = frozenset([n.name])
    an.measured[n.name] = why
    ni.measured = True
    ni.reasons.append(why)


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

"""Bounds pass: a proven :class:`~fxscale.bound.Bound` for every node, from ``fxscale.rules``.

A dataflow over the ATen graph in topological order. Sources of bounds:

* constants (parameters, buffers): their exact norms (``Bound.of_tensor``), computed once;
* inputs with a declared bound: ``max|x| <= bound`` (row norms follow from the shape);
* *measured* nodes, whose bound is known only at run time: inputs without a declared bound,
  ops without a rule that feed a low-precision value, and requantise points. At compile time
  their calibration stats stand in; the transformed graph measures them on every call
  (one fused amax + row-norm reduction) and re-evaluates the same rules on the measurements.

Every other node's bound comes from its op's rule. Operands of matmul-like ops are stored in
the low-precision format, so the rule sees the bound of the *quantised* operand
(:func:`fxscale.bound.quantised_bound`): rounding can push a value up by half a step.

The pass's state is an :class:`~fxscale.runtime.Analysis`; the same
:func:`~fxscale.runtime.evaluate_step` runs inside :class:`~fxscale.runtime.ScaleFn` modules
of the transformed graph with 0-d tensors instead of floats.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor, fx

from fxscale.bound import INF, Bound
from fxscale.formats import Format

# The step evaluation runs at transform time (here) and at run time (inside ScaleFn), so it
# lives in the runtime; these names are re-exported for the passes.
from fxscale.runtime import Analysis, Ref, Step, evaluate_step, measured_bound, operand_scale, refs

from .sizes import (
    _reads_size_as_number,
    _sums_over_symbolic_dim,
    _unbounded,
    check_maxima,
    concrete_shape,
    has_declared_max,
    size_upper,
    symbolic_upper,
)

__all__ = [
    "GROUPED",
    "QUANTISED_OPERANDS",
    "QUANTISED_OPERANDS_BY_NAME",
    "Analysis",
    "Ref",
    "Step",
    "bounds_at_example",
    "build_steps",
    "check_maxima",
    "concrete_shape",
    "declared_bound",
    "evaluate_step",
    "input_bounds_by_name",
    "is_float_value",
    "is_grouped",
    "mark_growing",
    "measured_bound",
    "operand_names",
    "operand_positions",
    "operand_scale",
    "quantise_const",
    "quantise_const_grouped",
    "refs",
    "size_upper",
    "symbolic_upper",
]

aten = torch.ops.aten

#: Matmul-like ops whose tensor operands are stored low-precision, by schema argument name.
QUANTISED_OPERANDS: dict[Any, tuple[str, ...]] = {
    aten.linear.default: ("input", "weight"),
    aten.addmm.default: ("mat1", "mat2"),
    aten.mm.default: ("self", "mat2"),
    aten.bmm.default: ("self", "mat2"),
    aten.matmul.default: ("self", "other"),
    aten.baddbmm.default: ("batch1", "batch2"),
    aten.conv2d.default: ("input", "weight"),
    aten.conv1d.default: ("input", "weight"),
    aten.conv2d.padding: ("input", "weight"),  # padding="same" / "valid"
    aten.conv1d.padding: ("input", "weight"),
    aten.conv_transpose2d.input: ("input", "weight"),
    aten.conv_transpose1d.default: ("input", "weight"),
    aten._grouped_mm.default: ("self", "mat2"),
}

#: The convolutions among them (their contraction is over channels and taps, never a dynamic dim).
CONVS = (aten.conv2d.default, aten.conv1d.default, aten.conv2d.padding, aten.conv1d.padding,
         aten.conv_transpose2d.input, aten.conv_transpose1d.default)

#: Matmul-like ops of other libraries, by schema name (fxscale does not import them):
#: transformers' MoE experts (``grouped_mm_fallback``: x (S, K) @ w[e] (K, N) per group of rows).
QUANTISED_OPERANDS_BY_NAME: dict[str, tuple[str, ...]] = {
    "transformers::grouped_mm_fallback": ("input", "weight"),
}

#: Grouped (MoE expert) matmuls, by schema name: one weight (E, K, N) per group of rows.
GROUPED = ("aten::_grouped_mm", "transformers::grouped_mm_fallback")


def operand_names(target: Any) -> tuple[str, ...] | None:
    """Schema names of ``target``'s low-precision operands, if it is matmul-like."""
    names = QUANTISED_OPERANDS.get(target)
    if names is None and hasattr(target, "_schema"):
        names = QUANTISED_OPERANDS_BY_NAME.get(target._schema.name)
    return names


def is_grouped(target: Any) -> bool:
    return hasattr(target, "_schema") and target._schema.name in GROUPED


def is_float_value(node: fx.Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, Tensor) and v.dtype.is_floating_point


def _to_ref(a: Any, sizes: str = "max") -> Any:
    """Node arguments as a :class:`Step` holds them: nodes by name, sizes as numbers (at their
    declared maximum, or the example's size; see :func:`concrete_shape`)."""
    if isinstance(a, fx.Node):
        val = a.meta.get("val")
        if isinstance(val, torch.SymInt):  # a size computed in the graph
            return int(val.node.hint) if sizes == "example" else size_upper(val)
        if isinstance(val, (int, float, bool)):
            return val
        return Ref(a.name)
    if isinstance(a, (list, tuple)):
        return type(a)(_to_ref(x, sizes) for x in a)
    if isinstance(a, torch.SymInt):
        return int(a.node.hint) if sizes == "example" else size_upper(a)
    return a


def operand_positions(node: fx.Node) -> tuple[int, ...]:
    """Positions in ``node.args`` of its low-precision matmul operands (empty if none)."""
    names = operand_names(node.target)
    scaled_sum = node.target in (aten.addmm.default, aten.baddbmm.default) and set(node.kwargs) <= {"alpha", "beta"}
    if (names is None or (node.kwargs and not scaled_sum)
            or node.meta.get("fxscale") is not None and node.meta["fxscale"].precision == "high"):
        return ()  # (the precision pass keeps it in high precision)
    schema = node.target._schema
    pos = tuple(i for i, a in enumerate(schema.arguments) if a.name in names and i < len(node.args))
    if len(pos) != 2:
        return ()
    if not all(isinstance(node.args[i], fx.Node) and is_float_value(node.args[i]) for i in pos):
        return ()
    if node.target is aten.linear.default and node.args[pos[1]].meta["val"].dim() != 2:
        return ()  # F.linear with a 1-D weight: a matrix-vector product, left in high precision
    return pos


def build_steps(gm: fx.GraphModule, sizes: str = "max") -> list[Step]:
    """One :class:`Step` per call node; symbolic sizes at their declared maximum (``"max"``,
    what the proof uses) or at the example's size (``"example"``, to tell which bounds grow
    with the maximum)."""
    steps = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        val = n.meta.get("val")
        vals = val if isinstance(val, (list, tuple)) else [val]
        shapes = [concrete_shape(v, sizes) for v in vals]
        if n.target is operator.getitem:
            steps.append(Step(n.name, n.target, (Ref(n.args[0].name),), {}, shapes, getitem=int(n.args[1])))
            continue
        idiom = _rms_norm_idiom(n, shapes) or _l2_normalise_idiom(n, shapes)
        if idiom is not None:
            steps.append(idiom)
            continue
        op = n.target
        if _sums_over_symbolic_dim(n) or _contracts_over_symbolic_dim(n) or _reads_size_as_number(n):
            op = _SUM_OVER_DYNAMIC_DIM  # its bound would hold for the example's size only
        args, kwargs = _to_ref(tuple(n.args), sizes), _to_ref(dict(n.kwargs), sizes)
        steps.append(Step(n.name, op, args, kwargs, shapes, operand_positions(n)))
    return steps


def _rms_norm_idiom(n: fx.Node, shapes) -> Step | None:
    """``x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps)``, RMSNorm written out (HF Llama, T5,
    Mistral...): bounded as ``aten.rms_norm`` is, by ``sqrt(D)`` per row, instead of leaving a
    product with an unbounded ``rsqrt`` to be measured at run time. The graph is not changed.
    The rule's conditions apply (``eps >= MIN_EPS``; a last dim of a known maximum).
    A LayerNorm written out (Cohere: ``d = x - mean(x)``, then the RMSNorm of ``d``) is one too,
    with ``d`` computed once or twice (:func:`_same_value`). ``x / sqrt(...)`` (DeBERTa's) is one
    too: a correctly rounded sqrt and division err less than the rsqrt the rule allows for.
    """
    if n.target not in (aten.mul.Tensor, aten.div.Tensor) or len(n.args) != 2 or n.kwargs:
        return None
    if not all(isinstance(a, fx.Node) for a in n.args):
        return None
    pairs = (n.args, n.args[::-1]) if n.target is aten.mul.Tensor else (n.args,)
    root = aten.rsqrt.default if n.target is aten.mul.Tensor else aten.sqrt.default
    for x, r in pairs:
        if r.target is not root or not isinstance(r.args[0], fx.Node):
            continue
        add = r.args[0]
        if add.target not in (aten.add.Tensor, aten.add.Scalar) or len(add.args) != 2 or float(add.kwargs.get("alpha", 1)) != 1:
            continue  # add(mean, eps, alpha=-1) is mean - eps: not an RMSNorm
        mean, eps = (add.args if isinstance(add.args[0], fx.Node) else add.args[::-1])
        if not isinstance(mean, fx.Node) or isinstance(eps, fx.Node) or not (float(eps) >= 0):
            continue
        if mean.target is not aten.mean.dim or not isinstance(mean.args[0], fx.Node):
            continue
        dims, keep = mean.args[1], (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
        pw = mean.args[0]
        xv = x.meta.get("val")
        if not (keep and isinstance(xv, Tensor) and list(dims) in ([-1], [xv.dim() - 1])):
            continue
        if pw.target is not aten.pow.Tensor_Scalar or not _same_value(pw.args[0], x) or float(pw.args[1]) != 2.0:
            continue
        if _unbounded(xv.shape[-1]):
            return None  # sqrt(D) over the dynamic batch (an RMSNorm of x.T) grows with it: measured
        d = concrete_shape(xv)[-1]
        return Step(n.name, aten.rms_norm.default, (Ref(x.name), [d], None, float(eps)), {}, shapes)
    return None


def _l2_normalise_idiom(n: fx.Node, shapes) -> Step | None:
    """``x / x.norm(dim=-1, keepdim=True)``, a row scaled to unit L2 norm (CLIP's embeddings):
    ``div(x, linalg_vector_norm(x, 2, [-1], True))`` (``aten.norm`` too), the norm possibly
    clamped below by an ``eps >= 0`` and expanded to ``x``'s shape (``F.normalize``): each
    element is then at most 1 in magnitude, up to the norm kernel's rounding
    (:data:`fxscale.rules.reductions.L2_NORMALISED`'s rule says how much), instead of a division by
    a run-time tensor, which has no rule and would be measured at run time. The numerator must
    be the norm's input (:func:`_same_value`). The graph is not changed.
    """
    from fxscale.rules import normalise
    from fxscale.rules.reductions import L2_NORMALISED

    if n.target is not aten.div.Tensor or len(n.args) != 2 or n.kwargs or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    x, d = n.args
    xv = x.meta.get("val")
    if not (isinstance(xv, Tensor) and xv.dtype.is_floating_point and xv.dim() >= 1):
        return None
    while isinstance(d, fx.Node) and d.op == "call_function":
        if d.target in (aten.expand_as.default, aten.expand.default):
            d = d.args[0]  # (the same values, broadcast as the division would)
        elif d.target is aten.clamp_min.default and not isinstance(d.args[1], fx.Node) and float(d.args[1]) >= 0:
            d = d.args[0]  # max(norm, eps): the quotient only shrinks
        else:
            break
    if not (isinstance(d, fx.Node) and d.target in (aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim)):
        return None
    a = normalise(d.target, d.args, d.kwargs)
    p = a.get("ord", a.get("p"))
    if isinstance(p, fx.Node) or float(2 if p is None else p) != 2.0 or a.get("dtype") is not None:
        return None
    dims = a.get("dim")
    dims = [dims] if isinstance(dims, int) else (list(dims) if dims is not None else None)
    nd = xv.dim()
    if nd == 1:
        ok = dims in (None, [], [0], [-1])  # one row: a 0-d or (1,) norm broadcasts over it
    else:
        ok = bool(a.get("keepdim")) and dims in ([-1], [nd - 1])
    if not ok or not _same_value(a["self"], x):
        return None
    return Step(n.name, L2_NORMALISED, (Ref(x.name),), {}, shapes)


#: Elementwise ops whose result is the same bits whenever their inputs are (no reduction order).
_DETERMINISTIC = {aten.sub.Tensor, aten.add.Tensor, aten.mul.Tensor, aten._to_copy.default, aten.to.dtype}


def _same_value(a, b) -> bool:
    """``a`` and ``b`` are one value: one node, or one deterministic elementwise op on the same
    inputs (Cohere's LayerNorm computes ``x - mean`` twice: once squared, once scaled)."""
    if a is b:
        return True
    return (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == "call_function"
            and a.target is b.target and a.target in _DETERMINISTIC and a.args == b.args and a.kwargs == b.kwargs)


def _SUM_OVER_DYNAMIC_DIM(*args, **kwargs):  # a marker with no rule: the node's bound is unknown
    raise NotImplementedError


def _contracts_over_symbolic_dim(n: fx.Node) -> bool:
    """A matmul whose contraction length changes between calls without a declared maximum
    (``x.T @ x`` over the batch); with a maximum, the bound at the maximum holds."""
    names = operand_names(n.target)
    if names is None or n.target in CONVS:
        return False
    schema = [a.name for a in n.target._schema.arguments]
    first = n.args[schema.index(names[0])] if schema.index(names[0]) < len(n.args) else None
    v = first.meta.get("val") if isinstance(first, fx.Node) else None
    return isinstance(v, Tensor) and v.dim() >= 1 and _unbounded(v.shape[-1])


def quantise_const(value: Tensor, fmt: Format, *, spectral: bool, amax: float | None = None) -> tuple[Tensor, float, Bound]:
    """Quantise a constant once: ``(data, scale, exact bound of the dequantised data)``.

    The bound is of what the matmul really reads, rounding included (a weight can round up
    by half a step: 6% in e4m3). ``amax``: the max |w| the scale is chosen for, when it is
    not the constant's own (a shard of a tensor-parallel weight takes the whole weight's).
    """
    w = value.detach().to(torch.float32)
    if amax is None:
        amax = float(w.abs().max()) if w.numel() else 0.0
    scale = fmt.scale_for(amax)
    data = fmt.store(w, scale, in_range=math.isfinite(amax))  # in range by construction: a plain cast
    # Norms of data * scale: the data's norms times the scale (exact for a power of two;
    # otherwise within float rounding, which the rules' margin covers).
    bound = Bound.of_tensor(data.to(torch.float32), spectral=spectral).scaled(scale)
    return data, scale, bound


def quantise_const_grouped(value: Tensor, fmt: Format) -> tuple[Tensor, Tensor, Bound]:
    """A grouped matmul's weight (E, K, N), one static scale per expert (group):
    ``(data, scales (E,) float32, exact bound of the dequantised data)``."""
    parts = [quantise_const(w, fmt, spectral=False) for w in value.detach()]
    data = torch.stack([p[0] for p in parts])
    scales = torch.tensor([p[1] for p in parts], dtype=torch.float32, device=value.device)
    deq = data.to(torch.float32) * scales[:, None, None]
    return data, scales, Bound.of_tensor(deq, spectral=False)


def declared_bound(value: float | tuple[float, float | None], shape: tuple[int, ...]) -> Bound:
    """Bound of an input declared as ``max |x|`` or ``(max |x|, max row norm)``."""
    a, r = value if isinstance(value, tuple) else (value, None)
    for v in (a, r):
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"a declared input bound must be finite and >= 0, got {value}")
    return Bound(float(a), INF if r is None else float(r)).tighten(shape)


def input_bounds_by_name(placeholders: list[fx.Node], input_bounds) -> dict[str, tuple[float, float | None]]:
    """Declared bounds by placeholder: ``(max |x|, max row norm or None)``, rounded up to the dtype."""
    floats = [p for p in placeholders if isinstance(p.meta.get("val"), Tensor) and p.meta["val"].dtype.is_floating_point]
    if input_bounds is None:
        return {}
    if isinstance(input_bounds, (int, float)):
        return {p.name: _declared(input_bounds, p) for p in floats}
    seq = list(input_bounds)
    if len(seq) != len(placeholders):
        raise ValueError(
            f"input_bounds has {len(seq)} entries but the model takes {len(placeholders)} tensor inputs "
            f"({', '.join(p.name for p in placeholders)}); give one per input (None for none), "
            "each a max |x| or a pair (max |x|, max row norm), or a single float"
        )
    return {p.name: _declared(b, p) for p, b in zip(placeholders, seq) if b is not None}


def _declared(b, p: fx.Node) -> tuple[float, float | None]:
    a, r = (b if isinstance(b, (tuple, list)) else (b, None))
    a, r = (float(v) if isinstance(v, Tensor) and v.numel() == 1 else v for v in (a, r))
    for v in (a, r):
        if v is not None and not (isinstance(v, (int, float)) and float(v) >= 0 and math.isfinite(float(v))):
            raise ValueError(
                f"input {p.name!r}: a declared bound must be a finite number >= 0 (or a pair "
                f"(max |x|, max row norm)), got {b!r}"
            )
    return _representable(float(a), p), (None if r is None else _representable(float(r), p))


def _representable(b: float, p: fx.Node) -> float:
    """The smallest value of input ``p``'s dtype >= ``b``: so that an input clamped to its bound in
    its own dtype (float32 rounds 2**1.75 up) passes the run-time check; proofs use this bound."""
    v = p.meta.get("val")
    if not (isinstance(v, Tensor) and v.dtype.is_floating_point) or not math.isfinite(b):
        return b
    r = float(torch.tensor(b, dtype=torch.float64).to(v.dtype))
    if r < b:
        _, e = math.frexp(r)  # r = m * 2**e, 0.5 <= m < 1: one ulp of r is eps * 2**(e - 1)
        r = float(torch.tensor(r + math.ldexp(torch.finfo(v.dtype).eps, e - 1), dtype=torch.float64).to(v.dtype))
    return r


def bounds_at_example(gm: fx.GraphModule, an: Analysis) -> dict[str, float]:
    """Each node's absmax bound re-proven at the example's sizes, for the nodes where it is
    smaller than at the declared maximum: the bounds that grow with the maximum (a sum or a
    matmul over the sequence; a softmax or an attention output, a convex mix, does not).

    Inputs, constants and measured values keep their bounds; every rule runs again.
    """
    if not any(has_declared_max(n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"):
        return {}
    ex = Analysis(an.fmt, an.mode, consts=an.consts, quantised_consts=an.quantised_consts)
    for n in gm.graph.nodes:
        shape = concrete_shape(n.meta.get("val"), "example")
        if shape is not None:
            ex.shapes[n.name] = shape
    for name, b in an.bounds.items():
        if name not in an.steps or name in an.measured:
            ex.bounds[name] = b
            ex.deps[name] = an.deps.get(name, frozenset())
    for step in build_steps(gm, "example"):
        if step.name in an.measured:
            continue
        evaluate_step(step, ex)
    out = {}
    for name, b in an.bounds.items():
        e = ex.bounds.get(name)
        finite = isinstance(b, Bound) and isinstance(e, Bound) and b.is_finite() and e.is_finite()
        if finite and float(e.absmax) < float(b.absmax) * (1 - 1e-9):
            out[name] = float(e.absmax)
    return out


def mark_growing(gm: fx.GraphModule, an: Analysis) -> None:
    """Note on each node whose bound grows with a declared maximum its bound at the example's size
    (``NodeInfo.bound_at_example``, and a reason saying so)."""
    from fxscale.nodeinfo import info

    nodes = {n.name: n for n in gm.graph.nodes}
    for name, at_example in bounds_at_example(gm, an).items():
        ni = info(nodes[name])
        ni.bound_at_example = at_example
        ni.reasons.append(f"bound grows with the declared maximum size ({at_example:.3g} at the example's)")

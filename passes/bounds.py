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

The pass's state is an :class:`Analysis`; the same :func:`evaluate_step` runs inside
:class:`ScaleFn` modules of the transformed graph with 0-d tensors instead of floats.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from fxscale.bound import INF, Bound, quantised_bound
from fxscale.formats import Format
from fxscale.rules import Arg, evaluate, lookup

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
}


@dataclass(frozen=True)
class Ref:
    """A reference to another node's value inside a :class:`Step`."""

    name: str


@dataclass
class Step:
    """One node, as the bound propagation needs it (no reference to the fx graph)."""

    name: str
    op: Any
    args: tuple
    kwargs: dict
    out_shapes: list[tuple[int, ...]]
    quantised: tuple[int, ...] = ()  # positions in ``args`` that are low-precision operands
    getitem: int | None = None       # for operator.getitem: the index taken


def concrete_shape(val: Any) -> tuple[int, ...] | None:
    if not isinstance(val, Tensor):
        return None
    return tuple(int(d) if isinstance(d, int) else int(d.node.hint) for d in val.shape)


def is_float_value(node: fx.Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, Tensor) and v.dtype.is_floating_point


def _to_ref(a: Any) -> Any:
    if isinstance(a, fx.Node):
        val = a.meta.get("val")
        if isinstance(val, torch.SymInt):  # a size computed in the graph: its example value
            return int(val.node.hint)
        if isinstance(val, (int, float, bool)):
            return val
        return Ref(a.name)
    if isinstance(a, (list, tuple)):
        return type(a)(_to_ref(x) for x in a)
    if isinstance(a, torch.SymInt):
        return int(a.node.hint)
    return a


def operand_positions(node: fx.Node) -> tuple[int, ...]:
    """Positions in ``node.args`` of its low-precision matmul operands (empty if none)."""
    names = QUANTISED_OPERANDS.get(node.target)
    if names is None or node.kwargs:
        return ()
    schema = node.target._schema
    pos = tuple(i for i, a in enumerate(schema.arguments) if a.name in names and i < len(node.args))
    if len(pos) != 2:
        return ()
    if not all(isinstance(node.args[i], fx.Node) and is_float_value(node.args[i]) for i in pos):
        return ()
    return pos


def build_steps(gm: fx.GraphModule) -> list[Step]:
    steps = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        val = n.meta.get("val")
        shapes = [concrete_shape(v) for v in val] if isinstance(val, (list, tuple)) else [concrete_shape(val)]
        if n.target is operator.getitem:
            steps.append(Step(n.name, n.target, (Ref(n.args[0].name),), {}, shapes, getitem=int(n.args[1])))
            continue
        idiom = _rms_norm_idiom(n, shapes)
        if idiom is not None:
            steps.append(idiom)
            continue
        op = n.target
        if _sums_over_symbolic_dim(n) or _contracts_over_symbolic_dim(n):
            op = _SUM_OVER_DYNAMIC_DIM  # its bound would hold for the example's size only
        steps.append(Step(n.name, op, _to_ref(tuple(n.args)), _to_ref(dict(n.kwargs)), shapes, operand_positions(n)))
    return steps


def _rms_norm_idiom(n: fx.Node, shapes) -> Step | None:
    """``x * rsqrt(mean(x ** 2, -1, keepdim=True) + eps)``, RMSNorm written out (HF Llama, T5,
    Mistral...): bounded as ``aten.rms_norm`` is, by ``sqrt(D)`` per row, instead of leaving a
    product with an unbounded ``rsqrt`` to be measured at run time. The graph is not changed.
    """
    if n.target is not aten.mul.Tensor or len(n.args) != 2 or not all(isinstance(a, fx.Node) for a in n.args):
        return None
    for x, r in (n.args, n.args[::-1]):
        if r.target is not aten.rsqrt.default or not isinstance(r.args[0], fx.Node):
            continue
        add = r.args[0]
        if add.target is not aten.add.Tensor or len(add.args) != 2:
            continue
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
        if pw.target is not aten.pow.Tensor_Scalar or pw.args[0] is not x or float(pw.args[1]) != 2.0:
            continue
        d = concrete_shape(xv)[-1]
        return Step(n.name, aten.rms_norm.default, (Ref(x.name), [d], None, float(eps)), {}, shapes)
    return None


def _SUM_OVER_DYNAMIC_DIM(*args, **kwargs):  # a marker with no rule: the node's bound is unknown
    raise NotImplementedError


def _contracts_over_symbolic_dim(n: fx.Node) -> bool:
    """A matmul whose contraction length changes between calls (``x.T @ x`` over the batch)."""
    if n.target not in QUANTISED_OPERANDS or n.target is aten.conv2d.default:
        return False
    names = QUANTISED_OPERANDS[n.target]
    schema = [a.name for a in n.target._schema.arguments]
    first = n.args[schema.index(names[0])] if schema.index(names[0]) < len(n.args) else None
    v = first.meta.get("val") if isinstance(first, fx.Node) else None
    return isinstance(v, Tensor) and v.dim() >= 1 and not isinstance(v.shape[-1], int)


def _sums_over_symbolic_dim(n: fx.Node) -> bool:
    """A sum over a dimension whose size changes between calls (the dynamic batch)."""
    if n.target not in (aten.sum.dim_IntList, aten.sum.default) or not n.args:
        return False
    x = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
    if not isinstance(x, Tensor):
        return False
    dims = n.args[1] if len(n.args) > 1 and n.args[1] is not None else n.kwargs.get("dim")
    dims = range(x.dim()) if not dims else [d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)]
    return any(not isinstance(x.shape[d], int) for d in dims)


@dataclass
class Analysis:
    """Bounds of every node, and which run-time measurements each one depends on."""

    fmt: Format
    mode: str
    bounds: dict[str, Any] = field(default_factory=dict)       # name -> Bound | list | None
    deps: dict[str, frozenset] = field(default_factory=dict)   # name -> measured sources
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    consts: dict[str, Tensor] = field(default_factory=dict)    # get_attr name -> value
    measured: dict[str, str] = field(default_factory=dict)     # name -> why it is measured
    failures: dict[str, str] = field(default_factory=dict)     # name -> why no rule applied
    # Constants read by matmuls: quantised once here, so that the matmul's rule sees the
    # exact bound of the weight it really multiplies: name -> (data, scale, bound).
    quantised_consts: dict[str, tuple[Tensor, float, Bound]] = field(default_factory=dict)
    steps: dict[str, Step] = field(default_factory=dict)       # name -> Step, for lowering

    def arg(self, ref: Ref) -> Arg | None:
        b = self.bounds.get(ref.name)
        if b is None or isinstance(b, list):
            return None
        return Arg(b, self.shapes[ref.name], self.consts.get(ref.name))


def operand_scale(fmt: Format, b: Bound):
    """The scale a low-precision operand with bound ``b`` is stored with."""
    if isinstance(b.absmax, Tensor):
        return fmt.scale_tensor(b.absmax)
    return fmt.scale_for(b.absmax)


def _materialise(a: Any, an: Analysis, quantise: bool = False) -> Any:
    if isinstance(a, Ref):
        arg = an.arg(a)
        if arg is None:
            if a.name not in an.shapes or isinstance(an.bounds.get(a.name), list):
                raise _NoBound(a.name)
            # No bound (an integer index, a mask, an op without a rule): unknown, which a
            # rule that ignores this input (embedding indices, LayerNorm's input) survives.
            arg = Arg(Bound.unknown(), an.shapes[a.name], an.consts.get(a.name))
        if quantise and a.name in an.quantised_consts:
            return Arg(an.quantised_consts[a.name][2], arg.shape, None)
        if quantise and not (isinstance(arg.bound.absmax, float) and math.isinf(arg.bound.absmax)):
            qb = quantised_bound(arg.bound, an.fmt, operand_scale(an.fmt, arg.bound), arg.shape)
            return Arg(qb, arg.shape, None)
        return arg
    if isinstance(a, (list, tuple)):
        return type(a)(_materialise(x, an) for x in a)
    return a


class _NoBound(Exception):
    pass


def evaluate_step(step: Step, an: Analysis) -> None:
    """Compute ``step``'s bound into ``an.bounds`` (None where no rule applies)."""
    if step.getitem is not None:
        src = an.bounds.get(step.args[0].name)
        an.bounds[step.name] = src[step.getitem] if isinstance(src, list) and step.getitem < len(src) else None
        an.deps[step.name] = an.deps.get(step.args[0].name, frozenset())
        return
    deps: set = set()
    for r in refs(step.args) + refs(step.kwargs):
        deps |= an.deps.get(r.name, frozenset())
    an.deps[step.name] = frozenset(deps)
    if lookup(step.op) is None or any(s is None for s in step.out_shapes):
        an.bounds[step.name] = None
        an.failures[step.name] = "no rule" if lookup(step.op) is None else "not a tensor"
        return
    try:
        args = tuple(_materialise(a, an, i in step.quantised) for i, a in enumerate(step.args))
        kwargs = {k: _materialise(v, an) for k, v in step.kwargs.items()}
        res = evaluate(step.op, args, kwargs, step.out_shapes, mode=an.mode)
    except _NoBound as e:
        an.bounds[step.name] = None
        an.failures[step.name] = f"input {e.args[0]} has no bound"
        return
    an.bounds[step.name] = res[0] if len(res) == 1 and len(step.out_shapes) == 1 else list(res)
    if not any(_has_tensor(b) for b in res):
        an.deps[step.name] = frozenset()  # e.g. after a LayerNorm: no longer depends on measurements
    if res[0] is None and len(res) == 1:
        an.failures[step.name] = "rule does not apply to these arguments"


def _has_tensor(b: Bound | None) -> bool:
    return b is not None and any(isinstance(getattr(b, f), Tensor) for f in b.__dataclass_fields__)


def refs(a: Any) -> list[Ref]:
    """Every :class:`Ref` inside ``a`` (nested lists, tuples, dicts), in order."""
    if isinstance(a, Ref):
        return [a]
    if isinstance(a, (list, tuple)):
        return [r for x in a for r in refs(x)]
    if isinstance(a, dict):
        return [r for x in a.values() for r in refs(x)]
    return []


def quantise_const(value: Tensor, fmt: Format, *, spectral: bool) -> tuple[Tensor, float, Bound]:
    """Quantise a constant once: ``(data, scale, exact bound of the dequantised data)``.

    The bound is of what the matmul really reads, rounding included (a weight can round up
    by half a step: 6% in e4m3).
    """
    w = value.detach().to(torch.float32)
    amax = float(w.abs().max()) if w.numel() else 0.0
    scale = fmt.scale_for(amax)
    if math.isfinite(amax) and fmt.pow2:  # in range by construction (exact scaling): a plain cast
        scaled = w * (1.0 / scale)
        data = (scaled if fmt.is_float else torch.round(scaled)).to(fmt.dtype)
    else:
        data = fmt.cast(w / scale)
    # Norms of data * scale: the data's norms times the scale (exact for a power of two;
    # otherwise within float rounding, which the rules' margin covers).
    bound = Bound.of_tensor(data.to(torch.float32), spectral=spectral).scaled(scale)
    return data, scale, bound


def measured_bound(stats, shape: tuple[int, ...]) -> Bound:
    """Bound from a measurement ``[absmax, rownorm]`` (a tensor of 2, or two floats).

    The fields stay 0-d tensors, so that every bound computed from them is a tensor too:
    that is how the analysis knows which bounds depend on run-time measurements.
    """
    if not isinstance(stats, Tensor):
        stats = torch.tensor([float(stats[0]), float(stats[1])], dtype=torch.float64)
    return Bound(stats[0], stats[1]).tighten(shape)


def declared_bound(value: float | tuple[float, float | None], shape: tuple[int, ...]) -> Bound:
    """Bound of an input declared as ``max |x|`` or ``(max |x|, max row norm)``."""
    a, r = value if isinstance(value, tuple) else (value, None)
    for v in (a, r):
        if v is not None and not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"a declared input bound must be finite and >= 0, got {value}")
    return Bound(float(a), INF if r is None else float(r)).tighten(shape)

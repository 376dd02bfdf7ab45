"""Run-time scale evaluation: what a transformed graph calls to compute a scale at run time.

A scale whose bound depends on run-time measurements (an input without a declared bound, a
requantise point) is computed inside the graph by a :class:`ScaleFn`: it re-runs the rules
(:mod:`fxscale.rules`) of the nodes between the measured sources and the value, on 0-d tensors.
The compiler (``passes.bounds``) runs the same :func:`evaluate_step` on floats at transform
time. This module imports only the runtime (:mod:`fxscale.bound`, :mod:`fxscale.formats`,
:mod:`fxscale.rules`), never ``passes``: a deployed model needs no compiler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .bound import Bound, quantised_bound
from .formats import Format
from .rules import Arg, evaluate, lookup

__all__ = ["Analysis", "Ref", "ScaleFn", "Step", "evaluate_step", "measured_bound", "opaque_call", "operand_scale", "refs"]


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
    if lookup(step.op) is None or all(s is None for s in step.out_shapes):
        an.bounds[step.name] = None
        an.failures[step.name] = "no rule" if lookup(step.op) is None else "not a tensor"
        return
    try:
        args = tuple(_materialise(a, an, i in step.quantised) for i, a in enumerate(step.args))
        kwargs = {k: _materialise(v, an) for k, v in step.kwargs.items()}
        why: list[str] = []
        res = evaluate(step.op, args, kwargs, step.out_shapes, mode=an.mode, why=why)
    except _NoBound as e:
        an.bounds[step.name] = None
        an.failures[step.name] = f"input {e.args[0]} has no bound"
        return
    an.bounds[step.name] = res[0] if len(res) == 1 and len(step.out_shapes) == 1 else list(res)
    if not any(_has_tensor(b) for b in res):
        an.deps[step.name] = frozenset()  # e.g. after a LayerNorm: no longer depends on measurements
    if res[0] is None and len(res) == 1:
        an.failures[step.name] = (f"its rule has none here: {why[0]}" if why
                                  else "rule does not apply to these arguments")


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


def measured_bound(stats, shape: tuple[int, ...]) -> Bound:
    """Bound from a measurement ``[absmax, rownorm]`` (a tensor of 2, or two floats).

    The fields stay 0-d tensors, so that every bound computed from them is a tensor too:
    that is how the analysis knows which bounds depend on run-time measurements.
    """
    if not isinstance(stats, Tensor):
        stats = torch.tensor([float(stats[0]), float(stats[1])], dtype=torch.float64)
    # float64 from here on: products of bounds of tiny (1e-25) or huge (1e37) values neither
    # underflow to a zero bound nor overflow to inf in float32 (issue 11 cases 12, 17).
    stats = stats.to(torch.float64)
    return Bound(stats[0], stats[1]).tighten(shape)


class ScaleFn(nn.Module):
    """Scale of one low-precision value whose bound depends on run-time measurements.

    ``forward(*stats)`` takes the ``[amax, rownorm]`` measurement of each source, re-runs the
    rules of the nodes between the sources and the value on 0-d tensors, and returns the
    value's scale (no host sync, so it stays inside compiled / CUDA-graph regions).
    """

    def __init__(self, an: Analysis, target: str, sources: list[str], steps: list[Step], static: dict[str, Any]):
        super().__init__()
        self.fmt, self.mode, self.target = an.fmt, an.mode, target
        self.sources = sources
        self.steps = steps
        self.static = static  # name -> float Bound of nodes the steps read that are static
        # Shapes of what the steps read too: an input with no bound (integer indices) is then
        # "unknown", as in the analysis (without its shape, a gather's scale raised at every call).
        reads = {r.name for s in steps for r in refs(s.args) + refs(s.kwargs)}
        self.shapes = {k: an.shapes[k] for k in set(an.shapes) & (set(sources) | {s.name for s in steps} | reads)}
        self.consts = {k: v for k, v in an.consts.items() if k in static}

    def forward(self, *stats: Tensor) -> Tensor:
        an = Analysis(self.fmt, self.mode)
        an.bounds.update(self.static)
        an.shapes.update(self.shapes)
        an.consts.update(self.consts)
        for name, st in zip(self.sources, stats):
            an.bounds[name] = measured_bound(st, self.shapes[name])
        for step in self.steps:
            evaluate_step(step, an)
        scale = operand_scale(self.fmt, an.bounds[self.target])
        # On the measurements' device: a CPU scalar here would sync the host every call.
        return torch.as_tensor(scale, dtype=torch.float32, device=stats[0].device)

    def extra_repr(self) -> str:
        return f"target={self.target}, sources={self.sources}, steps={len(self.steps)}"


def opaque_call(fn: ScaleFn, name: str):
    """``fn`` as a function torch.compile puts in its graph without tracing into it
    (``allow_in_graph``): Dynamo then guards the function's identity instead of every piece of
    the ScaleFn's Python state (its steps and bounds: ~0.1 ms of host time per call), and the
    rules are traced once, when the graph is compiled."""

    def call(*stats: Tensor) -> Tensor:
        return fn(*stats)

    call.__name__ = call.__qualname__ = name
    return torch.compiler.allow_in_graph(call)

"""THE rule table: ATen op -> a sound bound on its output, from bounds on its inputs.

Both the eager :class:`fxscale.scaled.ScaledTensor` and the compiler's bounds pass use this
table. A rule is a small pure function of a :class:`RuleCall` (input :class:`Bound`\\ s by
schema argument name, shapes, constant arguments) that returns the output's :class:`Bound`
(or a tuple of them for ops with several outputs). Bounds may be floats or 0-d tensors, so
the same rule runs at compile time and, for scales that depend on run-time measurements,
inside the transformed graph.

Two strengths (DESIGN decision 3), chosen by ``mode``:

* ``"rownorm"`` (default): tracks absmax plus L2/L1 row and column norms and the spectral
  norm; ``a @ b`` is bounded by Cauchy-Schwarz, ``|out_ij| <= ||a_i|| ||b_:j||``.
* ``"absmax"``: the seed notebook's rule, ``|a @ b| <= max|a| max|b| K``, kept for comparison.

>>> from fxscale.rules import Arg, evaluate
>>> import torch
>>> a, b = Arg(Bound(1.0), (4, 64)), Arg(Bound(1.0), (64, 8))
>>> evaluate(torch.ops.aten.mm.default, (a, b), {}, [(4, 8)], mode="absmax")[0].absmax
64.5
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .bound import INF, Bound, fmin, fprod

aten = torch.ops.aten

#: Relative margin on every computed (non-shape) rule's result: covers float32
#: accumulation and bf16/fp16 rounding of the arithmetic the bound describes.
MARGIN = 2.0**-7

__all__ = ["MARGIN", "RULES", "Arg", "Bound", "RuleCall", "evaluate", "lookup", "register"]


@dataclass
class Arg:
    """A tensor argument as a rule sees it: its bound, its shape, and its value if constant."""

    bound: Bound
    shape: tuple[int, ...]
    value: Tensor | None = None

    @staticmethod
    def scalar(c: float) -> Arg:
        c = abs(float(c))
        return Arg(Bound(c, c, c, c, c, c), ())


@dataclass
class RuleCall:
    op: Any
    args: dict[str, Any]
    out_shapes: list[tuple[int, ...]]
    mode: str = "rownorm"
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.args[name]

    def get(self, name: str, default: Any = None) -> Any:
        v = self.args.get(name, default)
        return default if v is None else v

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.out_shapes[0]


@dataclass(frozen=True)
class Rule:
    fn: Callable[[RuleCall], Any]
    exact: bool  # shape rules move values without arithmetic: no margin


RULES: dict[Any, Rule] = {}


def register(*ops, exact: bool = False):
    """Decorator: register ``fn`` as the rule for each ATen overload (or packet) in ``ops``."""

    def deco(fn):
        for op in ops:
            overloads = [getattr(op, n) for n in op.overloads()] if hasattr(op, "overloads") else [op]
            for o in overloads:
                RULES[o] = Rule(fn, exact)
        return fn

    return deco


def lookup(op) -> Rule | None:
    return RULES.get(op)


#: op -> ((argument name, default), ...): read from the schema once, at compile time, so
#: that evaluating rules at run time (inside a compiled graph) never touches the schema.
_SIGNATURES: dict[Any, tuple[tuple[str, Any], ...]] = {}


def _signature(op) -> tuple[tuple[str, Any], ...]:
    sig = _SIGNATURES.get(op)
    if sig is None:
        sig = tuple((a.name, a.default_value if a.has_default_value() else None) for a in op._schema.arguments)
        _SIGNATURES[op] = sig
    return sig


def _normalise(op, args, kwargs) -> dict[str, Any]:
    """The op's arguments by schema name (positional, keyword or default)."""
    out: dict[str, Any] = {}
    for i, (name, default) in enumerate(_signature(op)):
        if i < len(args):
            out[name] = args[i]
        elif name in kwargs:
            out[name] = kwargs[name]
        else:
            out[name] = default
    return out


def _strip(x: Any) -> Any:
    if isinstance(x, Arg):
        return Arg(Bound(x.bound.absmax).tighten(x.shape), x.shape, x.value)
    if isinstance(x, (list, tuple)):
        return type(x)(_strip(v) for v in x)
    return x


def evaluate(op, args: tuple, kwargs: dict, out_shapes: list[tuple[int, ...]], *, mode: str = "rownorm") -> list[Bound]:
    """Apply ``op``'s rule. Tensor arguments are :class:`Arg`; returns one Bound per output.

    Raises ``KeyError`` if ``op`` has no rule.
    """
    if mode not in ("rownorm", "absmax"):
        raise ValueError(f"rules must be 'rownorm' or 'absmax', got {mode!r}")
    rule = RULES[op]
    named = _normalise(op, args, kwargs)
    if mode == "absmax":
        named = {k: _strip(v) for k, v in named.items()}
    res = rule.fn(RuleCall(op, named, [tuple(s) for s in out_shapes], mode))
    res = list(res) if isinstance(res, (tuple, list)) else [res]
    out = []
    for b, shape in zip(res, out_shapes):
        if b is None:
            out.append(None)
            continue
        if not rule.exact:
            b = b.widen(1 + MARGIN)
        b = b.tighten(tuple(shape))
        if mode == "absmax":
            b = Bound(b.absmax).tighten(tuple(shape))
        out.append(b)
    return out


_CONST_CACHE: Any = None


def const_float(fn: Callable[..., Tensor], *tensors: Tensor, key: Any = None) -> float:
    """``float(fn(*tensors))`` for constant tensors (weights, buffers), computed once per ``key``.

    Rules run again inside the transformed graph (``ScaleFn``) on every call; reading a
    constant's data there would sync the host each call and break ``torch.export`` (a
    data-dependent ``.item()``). The cache is keyed by the identity of ``tensors[0]`` (weakly)
    and holds the other tensors strongly, so an identity match is never a stale id.
    """
    global _CONST_CACHE
    if _CONST_CACHE is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _CONST_CACHE = WeakIdKeyDictionary()
    ident = fn if key is None else key  # ``key`` names what ``fn`` computes (fn may be a lambda)
    entries = _CONST_CACHE.setdefault(tensors[0], [])
    for k, others, v in entries:
        if k == ident and len(others) == len(tensors) - 1 and all(a is b for a, b in zip(others, tensors[1:])):
            return v
    v = float(fn(*tensors))
    entries.append((ident, tensors[1:], v))
    return v


# ============================================================================ helpers
def _bcast(a: Any, out_shape: tuple[int, ...]) -> Bound:
    """Bound of ``a`` broadcast to ``out_shape`` (a Python number is a constant)."""
    if not isinstance(a, Arg):
        a = Arg.scalar(a)
    b, s = a.bound, tuple(a.shape)
    if s == tuple(out_shape):
        return b
    nd = len(out_shape)
    d_in = s[-1] if len(s) >= 1 else 1
    r_in = s[-2] if len(s) >= 2 else 1
    d = out_shape[-1] if nd >= 1 else 1
    r = out_shape[-2] if nd >= 2 else 1
    if len(s) <= 1:  # a vector (or scalar) becomes every row: no column structure known
        rn, rs = b.rownorm, b.rowsum
        if d_in != d:
            rn, rs = fprod(math.sqrt(d), b.absmax), fprod(d, b.absmax)
        return Bound(b.absmax, rn, INF, rs, INF).tighten(tuple(out_shape))
    rn, rs, cn, cs = b.rownorm, b.rowsum, b.colnorm, b.colsum
    if d_in != d:  # last dim broadcast from 1
        rn, rs = fprod(math.sqrt(d), rn), fprod(d, rs)
    if r_in != r:
        cn, cs = fprod(math.sqrt(r), cn), fprod(r, cs)
    return Bound(b.absmax, rn, cn, rs, cs).tighten(tuple(out_shape))


def _as_matrix_rhs(b: Arg) -> Bound:
    """Bound of a matmul right operand, treating a 1-D vector as a (K, 1) column."""
    if len(b.shape) == 1:
        v = b.bound
        return Bound(v.absmax, v.absmax, v.rownorm, v.absmax, v.rowsum, v.rownorm)
    return b.bound


def _as_matrix_lhs(a: Arg) -> Bound:
    if len(a.shape) == 1:
        v = a.bound
        return Bound(v.absmax, v.rownorm, v.absmax, v.rowsum, v.absmax, v.rownorm)
    return a.bound


def matmul_bound(a: Bound, b: Bound, k: int) -> Bound:
    """Bound of ``a @ b`` (contraction length ``k``) from the operands' bounds.

    ``|out_ij| <= min(max|a| max|b| k, ||a_i||_2 ||b_:j||_2, max|a| ||b_:j||_1, ||a_i||_1 max|b|)``;
    ``||out_i||_2 <= ||a_i||_2 ||b||_2``; ``||out_:j||_2 <= ||a||_2 ||b_:j||_2``.
    """
    absmax = fmin(
        fprod(a.absmax, b.absmax, k),
        fprod(a.rownorm, b.colnorm),
        fprod(a.absmax, b.colsum),
        fprod(a.rowsum, b.absmax),
    )
    return Bound(
        absmax,
        rownorm=fprod(a.rownorm, b.spectral),
        colnorm=fprod(a.spectral, b.colnorm),
        spectral=fprod(a.spectral, b.spectral),
    )


def _add_bias(out: Bound, bias: Any, out_shape, scale: float = 1.0) -> Bound:
    if bias is None:
        return out
    return out.plus(_bcast(bias, out_shape).scaled(scale))


# The table itself: importing these modules registers every rule.
from . import rules_numeric, rules_shape  # noqa: F401

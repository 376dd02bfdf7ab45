"""The rule registry: ``RULES`` (ATen overload -> :class:`Rule`), ``register``, ``evaluate``.

Imports only :mod:`fxscale.bound`; the rule modules (:mod:`.numeric`, :mod:`.shape`) import
this one and register into it. See :mod:`fxscale.rules` for what a rule is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..bound import Bound
from ..config import check_rules

aten = torch.ops.aten

#: Relative margin on every computed (non-shape) rule's result: covers float32
#: accumulation and bf16/fp16 rounding of the arithmetic the bound describes.
MARGIN = 2.0**-7

__all__ = ["MARGIN", "RULES", "Arg", "Rule", "RuleCall", "Unbounded", "evaluate", "lookup", "normalise", "register"]


class Unbounded(Exception):
    """Raised by a rule that has no bound for these arguments, saying why (``evaluate`` returns
    None for it and hands the reason to ``why``): ``raise Unbounded("a divisor known only at run
    time")`` reads better in a report than a bare ``return None``."""


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
#: Rules for ops named by schema (``"transformers::grouped_mm_fallback"``): ops of libraries
#: fxscale does not import, found by name the first time a graph calls them.
RULES_BY_NAME: dict[str, Rule] = {}


def register(*ops, exact: bool = False):
    """Decorator: register ``fn`` as the rule for each ATen overload (or packet) in ``ops``,
    or for an op of another library named by its schema name (a string)."""

    def deco(fn):
        for op in ops:
            if isinstance(op, str):
                RULES_BY_NAME[op] = Rule(fn, exact)
                continue
            overloads = [getattr(op, n) for n in op.overloads()] if hasattr(op, "overloads") else [op]
            for o in overloads:
                RULES[o] = Rule(fn, exact)
        return fn

    return deco


def lookup(op) -> Rule | None:
    rule = RULES.get(op)
    if rule is None and RULES_BY_NAME and hasattr(op, "_schema"):
        rule = RULES_BY_NAME.get(op._schema.name)
        if rule is not None:
            RULES[op] = rule
    return rule


#: op -> ((argument name, default), ...): read from the schema once, at compile time, so
#: that evaluating rules at run time (inside a compiled graph) never touches the schema.
_SIGNATURES: dict[Any, tuple[tuple[str, Any], ...]] = {}


def _signature(op) -> tuple[tuple[str, Any], ...]:
    sig = _SIGNATURES.get(op)
    if sig is None:
        sig = tuple((a.name, a.default_value if a.has_default_value() else None) for a in op._schema.arguments)
        _SIGNATURES[op] = sig
    return sig


def normalise(op, args, kwargs) -> dict[str, Any]:
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


def evaluate(op, args: tuple, kwargs: dict, out_shapes: list[tuple[int, ...]], *, mode: str = "rownorm",
             why: list[str] | None = None) -> list[Bound]:
    """Apply ``op``'s rule. Tensor arguments are :class:`Arg`; returns one Bound per output (None
    where the rule has none: a rule that says why, by raising :class:`Unbounded`, appends the
    reason to ``why``).

    Raises ``KeyError`` if ``op`` has no rule.
    """
    check_rules(mode)
    rule = lookup(op)
    if rule is None:
        raise KeyError(op)
    named = normalise(op, args, kwargs)
    if mode == "absmax":
        named = {k: _strip(v) for k, v in named.items()}
    try:
        res = rule.fn(RuleCall(op, named, [None if s is None else tuple(s) for s in out_shapes], mode))
    except Unbounded as e:
        if why is not None:
            why.append(str(e))
        return [None for _ in out_shapes]
    res = list(res) if isinstance(res, (tuple, list)) else [res]
    out = []
    for b, shape in zip(res, out_shapes):
        if b is None or shape is None:  # (or an output that is not a tensor: a SymInt, None)
            out.append(None)
            continue
        if not rule.exact:
            b = b.widen(1 + MARGIN)
        b = b.tighten(tuple(shape))
        if mode == "absmax":
            b = Bound(b.absmax).tighten(tuple(shape))
        out.append(b)
    return out

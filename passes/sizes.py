"""Symbolic sizes: the size each bound is proven for, and the nodes whose bound would hold for one
size only.

A dynamic dim with a declared maximum (``torch.export.Dim('seq', max=N)``) is proven at N: every
rule grows with the sizes it reads. The dynamic batch (dim 0, no maximum) is taken at the example's
size, which is sound only where no rule sums over it or reads it as a number; such nodes get no
bound (a low-precision consumer then measures them at run time).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

from fxscale.rules import lookup

aten = torch.ops.aten


def size_upper(d: Any) -> int:
    """The size bounds are proven for: ``d`` itself, the declared maximum of a symbolic size
    (``torch.export.Dim(max=...)``: every rule grows with the sizes it reads, so a bound proven
    at the maximum holds at every smaller size), or the example's size where no maximum is
    declared (the dynamic batch, which the rules do not sum over)."""
    if isinstance(d, int):
        return int(d)
    up = symbolic_upper(d)
    return int(d.node.hint) if up is None else up


def symbolic_upper(d: Any) -> int | None:
    """The declared maximum of a symbolic size (None: a plain int, or no finite maximum)."""
    if not isinstance(d, torch.SymInt):
        return None
    try:
        up = d.node.shape_env.bound_sympy(d.node.expr).upper
    except Exception:  # noqa: BLE001  (no shape env: an unbacked or foreign SymInt)
        return None
    import sympy

    return int(up) if isinstance(up, (int, sympy.Integer)) else None  # int_oo: no maximum


def concrete_shape(val: Any, sizes: str = "max") -> tuple[int, ...] | None:
    """``val``'s shape with each symbolic size at its declared maximum (``sizes="max"``, what
    bounds are proven for) or at the example's size (``sizes="example"``)."""
    if not isinstance(val, Tensor):
        return None
    if sizes == "example":
        return tuple(int(d) if isinstance(d, int) else int(d.node.hint) for d in val.shape)
    return tuple(size_upper(d) for d in val.shape)


def has_declared_max(val: Any) -> bool:
    """Whether ``val`` (a tensor or SymInt) has a size bounded by a declared maximum."""
    if isinstance(val, Tensor):
        return any(symbolic_upper(d) is not None for d in val.shape)
    return symbolic_upper(val) is not None


#: Ops whose bound grows with the magnitude of a (non-negative) size passed as a number, so
#: that the bound at the size's maximum holds for every smaller size (``arange(seq_len)``).
#: Any other op reading a symbolic size as a number (``x / seq_len``) gets no bound.
_GROWS_WITH_SIZE_ARG = {
    aten.arange.default, aten.arange.start, aten.arange.start_step, aten.full.default,
    aten.new_full.default, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
    aten.mul.Tensor, aten.mul.Scalar, aten.rsub.Scalar, aten.scalar_tensor.default,
}


def _reads_size_as_number(n: fx.Node) -> bool:
    """``n`` takes a symbolic size as a numeric argument (not a shape) where its bound would hold
    for one size only: a size without a declared maximum (the dynamic batch: ``x * x.shape[0]``,
    issue 11 case 4) anywhere the schema wants a number, or a size with a maximum in an op whose
    bound does not grow with it."""
    if _unbounded_size_as_number(n):
        return True
    rule = lookup(n.target)
    if n.target in _GROWS_WITH_SIZE_ARG or (rule is not None and rule.exact):
        return False  # shape ops read sizes as shapes only; the others grow with them
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in pytree.tree_leaves((n.args, n.kwargs))]
    return any(isinstance(v, torch.SymInt) and symbolic_upper(v) is not None for v in vals)


def _unbounded_size_as_number(n: fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    if schema is None:
        return False
    types = {a.name: str(a.type).rstrip("?") for a in schema.arguments}
    named = list(zip([a.name for a in schema.arguments], n.args)) + list(n.kwargs.items())
    for k, a in named:
        v = a.meta.get("val") if isinstance(a, fx.Node) else a
        if types.get(k) in ("Tensor", "Scalar", "float", "number") and (
                isinstance(v, torch.SymFloat) or isinstance(v, torch.SymInt) and symbolic_upper(v) is None):
            return True
    return False


def _unbounded(d: Any) -> bool:
    """A symbolic size without a declared maximum (a plain int is bounded by itself)."""
    return not isinstance(d, int) and symbolic_upper(d) is None


#: Ops whose rule's bound grows with the sizes of the dims they reduce over: the reduced dims
#: (a dim list / dim argument, all dims where none is given), or for the normalisations the
#: last ``len(normalized_shape)`` dims (``sqrt(D)``).
_REDUCES = {
    aten.sum.dim_IntList: "dim", aten.sum.default: "dim", aten.cumsum.default: "dim",
    aten.linalg_vector_norm.default: "dim", aten.norm.ScalarOpt_dim: "dim", aten.norm.Scalar: "dim",
    aten.layer_norm.default: "normalized_shape", aten.rms_norm.default: "normalized_shape",
    aten.native_layer_norm.default: "normalized_shape",
}


def _reduced_dims(n: fx.Node, x: Tensor) -> list[int]:
    what = "normalized_shape" if n.target is torch.ops.fxscale.layer_norm.default else _REDUCES.get(n.target)
    if what is None:
        return []
    schema = [a.name for a in n.target._schema.arguments]
    key = what if what in schema else next((k for k in ("dim", "normalized_shape") if k in schema), None)
    if key is None:
        return []
    i = schema.index(key)
    arg = n.args[i] if i < len(n.args) else n.kwargs.get(key)
    if what == "normalized_shape":
        return list(range(x.dim() - len(arg), x.dim())) if arg is not None else []
    if arg is None or (isinstance(arg, (list, tuple)) and not arg):
        return list(range(x.dim()))
    return [d % x.dim() for d in ([arg] if isinstance(arg, int) else arg)] if x.dim() else []


def _sums_over_symbolic_dim(n: fx.Node) -> bool:
    """A sum, prefix sum, norm or normalisation over a dimension whose size changes between calls
    without a declared maximum (the dynamic batch): its rule reads the example's size there,
    which a larger batch exceeds (``cumsum`` over the batch, a LayerNorm of ``x.T``)."""
    if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    x = n.args[0].meta.get("val")
    if not isinstance(x, Tensor):
        return False
    return any(_unbounded(x.shape[d]) for d in _reduced_dims(n, x))


def check_maxima(placeholders: list[fx.Node]) -> None:
    """Every dynamic dim but the batch (dim 0) needs a declared maximum: bounds are proven at it."""
    for p in placeholders:
        v = p.meta.get("val")
        if not isinstance(v, Tensor):
            continue
        for d, size in enumerate(v.shape):
            if d > 0 and isinstance(size, torch.SymInt) and symbolic_upper(size) is None:
                raise ValueError(
                    f"input {p.name!r}: dim {d} is dynamic without a maximum; fxscale proves bounds at "
                    "the maximum size, so declare one: torch.export.Dim('seq', max=...) in dynamic_shapes"
                )

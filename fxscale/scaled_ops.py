"""Dispatch handlers of the eager :class:`~fxscale.scaled.ScaledTensor`: which ATen ops stay scaled.

Each handler takes the op and its arguments as they reach ``__torch_dispatch__`` and returns a
``ScaledTensor`` (scale from :mod:`fxscale.rules`), a plain tensor, or ``NotImplemented``.
The table (``HANDLERS``, filled by ``@implements``) lives here, beside the ops; the subclass
imports it lazily inside ``__torch_dispatch__``, so this module imports :mod:`fxscale.scaled`
and not the other way round.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from . import rules as _rules
from .bound import Bound
from .formats import Format, get_format
from .scaled import (
    ScaledFallbackWarning,
    ScaledTensor,
    ScaledTensorData,
    acc_dtype,
    current_options,
    finite_amax,
)

aten = torch.ops.aten

#: ATen overload (or packet) -> handler ``(func, args, kwargs) -> ScaledTensor | Tensor | NotImplemented``.
HANDLERS: dict[Any, Any] = {}


def implements(*ops):
    """Decorator: ``fn`` handles each op in ``ops`` on ScaledTensors. Registering an op twice raises."""

    def deco(fn):
        for op in ops:
            if op in HANDLERS:
                raise ValueError(f"ScaledTensor op {op} already has a handler ({HANDLERS[op].__name__})")
            HANDLERS[op] = fn
        return fn

    return deco


def _fmt_of(*xs: Any) -> Format:
    fmts = {x._data.dtype for x in xs if isinstance(x, ScaledTensor)}
    if len(fmts) > 1:
        names = sorted(get_format(f).name for f in fmts)
        raise ValueError(
            f"ScaledTensor operands have mixed formats {names}; convert one first, "
            f"e.g. fxscale.quantise(x.to(torch.float32), {names[0]!r})"
        )
    return get_format(fmts.pop())


def _hp(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, ScaledTensor):
        return x.st.to_tensor(dtype)
    if isinstance(x, Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    return x


def _arg(x: Any, hp: Any) -> Any:
    """A rule argument: exact stats of the (dequantised) operand; no spectral norm per op."""
    if isinstance(x, Tensor):
        value = hp if not isinstance(x, ScaledTensor) else None
        return _rules.Arg(Bound.of_tensor(hp, spectral=False), tuple(hp.shape), value)
    return x


def _finish(hp: Tensor, bound: Bound | None, fmt: Format) -> ScaledTensor:
    """Cast the high-precision result ``hp`` into ``fmt`` with the proven scale, or requantise.

    Requantises (scale from the real max |hp|) where the bound wastes more than the threshold.
    """
    opts = current_options()
    threshold = fmt.threshold if opts.threshold is None else opts.threshold
    amax = finite_amax(hp)
    b = float(bound.absmax) if bound is not None else math.inf
    if not math.isfinite(b) or amax == 0.0 or math.log2(b / amax) > threshold:
        scale = fmt.scale_for(amax)
    else:
        scale = fmt.scale_for(b)
        if amax > scale * fmt.max:  # a rule under-estimated: never saturate silently
            warnings.warn(f"fxscale rule bound {b} below the real max |value| {amax}; requantising",
                          RuntimeWarning, stacklevel=4)
            scale = fmt.scale_for(amax)
    data = fmt.cast(hp / scale)
    return ScaledTensor(ScaledTensorData(data, torch.tensor(scale, dtype=torch.float32, device=hp.device)))


def _computed(func, args, kwargs, scaled_positions: tuple[str, ...]):
    """Run ``func`` on the dequantised operands in high precision, bound it, cast back."""
    named = _rules.normalise(func, args, kwargs)
    if any(not isinstance(named.get(n), ScaledTensor) for n in scaled_positions):
        return NotImplemented
    tensors = [x for x in named.values() if isinstance(x, Tensor)]
    fmt = _fmt_of(*tensors)
    dt = acc_dtype(fmt)
    hp_args = tree_map(lambda x: _hp(x, dt), args)
    hp_kwargs = tree_map(lambda x: _hp(x, dt), kwargs)
    out = func(*hp_args, **hp_kwargs)
    r_args = tuple(_map2(_arg, a, h) for a, h in zip(args, hp_args))
    r_kwargs = {k: _map2(_arg, kwargs[k], hp_kwargs[k]) for k in kwargs}
    bound = None
    if func in _rules.RULES:
        bound = _rules.evaluate(func, r_args, r_kwargs, [tuple(out.shape)], mode=current_options().rules)[0]
    return _finish(out, bound, fmt)


def _map2(fn, a, b):
    if isinstance(a, (list, tuple)):
        return type(a)(_map2(fn, x, y) for x, y in zip(a, b))
    return fn(a, b)


@implements(aten.mm.default, aten.bmm.default, aten.matmul.default, aten.mv.default, aten.dot.default)
def _matmul(func, args, kwargs):
    """Both operands scaled; float32 accumulation (float64 for integer formats)."""
    a, b = args[0], args[1]
    if not (isinstance(a, ScaledTensor) and isinstance(b, ScaledTensor)):
        return NotImplemented
    fmt = _fmt_of(a, b)
    dt = acc_dtype(fmt)
    ha, hb = a.st.to_tensor(dt), b.st.to_tensor(dt)
    out = func(ha, hb)
    op, sa, sb, shape = func, ha, hb, tuple(out.shape)
    if func in (aten.mv.default, aten.dot.default):  # the rules see them as (M, K) @ (K, 1)
        op, sa, sb = aten.mm.default, ha.reshape(-1, ha.shape[-1]), hb.reshape(-1, 1)
        shape = (sa.shape[0], 1)
    bound = _rules.evaluate(op, (_arg(a, sa), _arg(b, sb)), {}, [shape], mode=current_options().rules)[0]
    return _finish(out, bound, fmt)


@implements(aten.addmm.default, aten.baddbmm.default)
def _addmm(func, args, kwargs):
    """Matrix operands scaled; the bias may be scaled or a float tensor (added in high precision)."""
    return _computed(func, args, kwargs, ("mat1", "mat2") if func is aten.addmm.default else ("batch1", "batch2"))


@implements(aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor)
def _binary(func, args, kwargs):
    """Both operands scaled, same format; the result keeps it."""
    return _computed(func, args, kwargs, ("self", "other"))


@implements(aten.gelu.default, aten.silu.default, aten.tanh.default, aten.neg.default, aten.abs.default)
def _unary(func, args, kwargs):
    return _computed(func, args, kwargs, ("self",))


@implements(aten.relu.default)
def _relu(func, args, kwargs):
    """relu is exact on the data: same format, same scale."""
    d = args[0].st
    fmt = d.format
    return ScaledTensor(ScaledTensorData(fmt.cast(torch.relu(d.data.to(acc_dtype(fmt)))), d.scale))


@implements(aten.cat.default, aten.stack.default)
def _joined(func, args, kwargs):
    """Concatenation of scaled tensors of one format: exact when the scales agree."""
    named = _rules.normalise(func, args, kwargs)
    xs = named["tensors"]
    if not xs or not all(isinstance(x, ScaledTensor) for x in xs):
        return NotImplemented
    fmt = _fmt_of(*xs)
    dim = named["dim"]
    if all(torch.equal(x._scale, xs[0]._scale) for x in xs):
        try:
            data = func([x._data for x in xs], dim)
        except (RuntimeError, NotImplementedError):  # no float8 kernel: via float32, exact
            data = fmt.cast(func([x._data.to(acc_dtype(fmt)) for x in xs], dim))
        return ScaledTensor(ScaledTensorData(data, xs[0]._scale))
    hp = func([x.st.to_tensor(acc_dtype(fmt)) for x in xs], dim)
    b = max(float(x._scale) * finite_amax(x._data.to(acc_dtype(fmt))) for x in xs)
    return _finish(hp, Bound(b), fmt)


_SHAPE_OPS = (
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default, aten.transpose.int,
    aten.permute.default, aten.expand.default, aten.clone.default, aten.detach.default, aten.alias.default,
    aten.slice.Tensor, aten.select.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.unsqueeze.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
    aten._reshape_alias.default, aten.contiguous.default, aten.flatten.using_ints, aten.narrow.default,
    aten.lift_fresh.default,
)


@implements(*_SHAPE_OPS)
def _shape_op(func, args, kwargs):
    """Moves elements without arithmetic: apply to the data, keep the scale."""
    x = args[0]
    if not isinstance(x, ScaledTensor) or any(isinstance(a, ScaledTensor) for a in args[1:]):
        return NotImplemented
    d = x.st
    try:
        out = func(d.data, *args[1:], **kwargs)
    except (RuntimeError, NotImplementedError):  # some shape ops lack float8 kernels: go via float32
        fmt = d.format
        out = tree_map(lambda t: fmt.cast(t) if isinstance(t, Tensor) else t,
                       func(d.data.to(acc_dtype(fmt)), *args[1:], **kwargs))
    return tree_map(lambda t: ScaledTensor(ScaledTensorData(t, d.scale)) if isinstance(t, Tensor) else t, out)


@implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    x = args[0]
    dtype = kwargs.get("dtype")
    device = kwargs.get("device")
    d = x.st
    if device is not None:
        d = ScaledTensorData(d.data.to(device), d.scale.to(device))
    if dtype is None:
        return ScaledTensor(d)
    return d.to_tensor(dtype)


def fallback(func, args, kwargs):
    """Any op without a handler: run it in float32 on dequantised operands, with a warning."""
    if func._schema.is_mutable and any(
        isinstance(x, ScaledTensor) for x in args[:1]
    ):
        raise NotImplementedError(
            f"{func} would modify a ScaledTensor in place; use the out-of-place op "
            "or dequantise first with .to(torch.float32)"
        )
    warnings.warn(
        f"ScaledTensor: no scaled implementation of {func}; computing it in float32",
        ScaledFallbackWarning,
        stacklevel=3,
    )

    def deq(t):
        return t.st.to_tensor(torch.float32) if isinstance(t, ScaledTensor) else t

    return func(*tree_map(deq, args), **tree_map(deq, kwargs))

"""Eager scaled tensors: ``ScaledTensorData(data, scale)`` and the ``ScaledTensor`` subclass.

A scaled value is ``data * scale`` with ``data`` in a low-precision format (int8, float8, ...)
and ``scale`` a 0-d float32 tensor (a power of two). This is the seed notebook's API, fixed:

* matmuls accumulate in float32 (float64 for integer formats: exact), never in int16;
* output scales come from the shared rule table :mod:`fxscale.rules` (the tight ``"rownorm"``
  rules by default, the seed's ``"absmax"`` rule on request, see :func:`eager_options`), fed
  with the operands' exact statistics;
* where the proven bound would waste more than the format's threshold, the op requantises
  its high-precision result (scale from its real max |value|) instead of casting with the
  loose scale, so a chain of matmuls never collapses to zeros (DESIGN decision 5);
* ops without a scaled implementation run in float32 with a :class:`ScaledFallbackWarning`.

>>> import torch
>>> from fxscale.scaled import quantise
>>> a = quantise(torch.full((2, 3), 100.0), torch.int8)
>>> b = quantise(torch.full((3, 4), 200.0), torch.int8)
>>> (a @ b).to(torch.float32)[0, 0]   # 60000 in int8 at scale 512
tensor(59904.)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import check_rules
from .formats import Format, get_format

__all__ = [
    "EagerOptions",
    "ScaledFallbackWarning",
    "ScaledTensor",
    "ScaledTensorData",
    "dequantise",
    "eager_options",
    "quantise",
    "requantise",
]

aten = torch.ops.aten


# ============================================================================ options
@dataclass(frozen=True)
class EagerOptions:
    """How eager ``ScaledTensor`` ops choose output scales.

    ``rules``: ``"rownorm"`` (tight, default) or ``"absmax"`` (the seed's worst case).
    ``threshold``: wasted bits (log2 of proven bound over the real max |value|) above which an
    op requantises its result; ``None`` uses the format's own :attr:`Format.threshold`,
    ``math.inf`` never requantises (the seed's behaviour).
    """

    rules: str = "rownorm"
    threshold: float | None = None


_OPTIONS: contextvars.ContextVar[EagerOptions] = contextvars.ContextVar(
    "fxscale_eager_options", default=EagerOptions()  # noqa: B039  (frozen: immutable)
)


@contextlib.contextmanager
def eager_options(*, rules: str | None = None, threshold: float | None = None) -> Iterator[EagerOptions]:
    """Context manager selecting the eager rule strength and requantise threshold.

    >>> import math, torch
    >>> x = quantise(torch.ones(2, 8), torch.int8)
    >>> with eager_options(rules="absmax", threshold=math.inf):
    ...     y = x @ x.t()              # the seed's scale: 1 * 1 * 8, plus margin
    >>> y.st.scale.item()
    0.125
    """
    cur = _OPTIONS.get()
    if rules is not None:
        check_rules(rules)  # the one validator, shared with transform's config
    new = EagerOptions(rules if rules is not None else cur.rules, threshold if threshold is not None else cur.threshold)
    token = _OPTIONS.set(new)
    try:
        yield new
    finally:
        _OPTIONS.reset(token)


def current_options() -> EagerOptions:
    """The :class:`EagerOptions` in force (set by :func:`eager_options`)."""
    return _OPTIONS.get()


class ScaledFallbackWarning(UserWarning):
    """An op on a ScaledTensor had no scaled implementation and ran in float32."""


# ============================================================================ data
def acc_dtype(fmt: Format) -> torch.dtype:
    """High-precision type to compute in: float64 for integers (int8 products sum exactly)."""
    return torch.float32 if fmt.is_float else torch.float64


@dataclass
class ScaledTensorData:
    """``data * scale``: ``data`` in a low-precision format, ``scale`` a 0-d float32 tensor.

    >>> import torch
    >>> ScaledTensorData(torch.tensor([1, 2], dtype=torch.int8), 0.5).to_tensor(torch.float32)
    tensor([0.5000, 1.0000])
    """

    data: Tensor
    scale: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.scale, Tensor):
            self.scale = torch.tensor(float(self.scale), dtype=torch.float32, device=self.data.device)
        if self.scale.dtype != torch.float32 or self.scale.dim() != 0:
            raise ValueError(
                f"scale must be a 0-d float32 tensor, got dtype {self.scale.dtype} shape {tuple(self.scale.shape)}"
            )
        get_format(self.data.dtype)  # raises ValueError for an unsupported data dtype

    def __repr__(self) -> str:
        return f"ScaledTensor({_scale_str(self.scale)} * {self.data})"

    @property
    def format(self) -> Format:
        """The :class:`~fxscale.formats.Format` of ``data``."""
        return get_format(self.data.dtype)

    def to_tensor(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The represented value ``data * scale`` in ``dtype`` (computed in float32 or wider)."""
        hp = torch.float64 if dtype == torch.float64 else acc_dtype(self.format)
        return (self.data.to(hp) * self.scale.to(hp)).to(dtype)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype_max(self) -> float:
        """Largest finite magnitude of the data format (127 for int8, 448 for e4m3)."""
        return self.format.max


def _scale_str(scale: Tensor) -> str:
    try:
        return repr(float(scale))
    except (RuntimeError, TypeError, ValueError, NotImplementedError):  # fake / meta under tracing
        return "scale"


# ============================================================================ quantise
def finite_amax(x: Tensor) -> float:
    """max |x| over the finite elements (0 if none)."""
    if x.numel() == 0:
        return 0.0
    a = x.detach().abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    return float(a.max())


def _quantise_data(x: Tensor, fmt: Format) -> ScaledTensorData:
    scale = fmt.scale_for(finite_amax(x))
    hp = torch.float64 if x.dtype == torch.float64 else torch.float32
    return ScaledTensorData(fmt.cast(x.to(hp) / scale), torch.tensor(scale, dtype=torch.float32, device=x.device))


def quantise(x: Tensor, dtype: torch.dtype | str) -> ScaledTensor:
    """Quantise ``x`` into ``dtype`` with the power-of-two scale that fits its max |x|.

    An all-zero tensor gets scale 1. NaN stays NaN (float formats; integer formats raise).

    >>> import torch
    >>> quantise(torch.tensor([1.0, 2.0, 3.0]), torch.int8)
    ScaledTensor(0.03125 * tensor([32, 64, 96], dtype=torch.int8))
    """
    if isinstance(x, ScaledTensor):
        x = dequantise(x, torch.float32)
    return ScaledTensor(_quantise_data(x, get_format(dtype)))


def requantise(st: ScaledTensor | ScaledTensorData) -> ScaledTensor:
    """Rescale so that max |data| uses the format's range (equivalent to re-quantising the value).

    All-zero data is returned unchanged.

    >>> import torch
    >>> requantise(ScaledTensor(ScaledTensorData(torch.tensor([2, -4], dtype=torch.int8), 1.0)))
    ScaledTensor(0.0625 * tensor([ 32, -64], dtype=torch.int8))
    """
    d = st.st if isinstance(st, ScaledTensor) else st
    fmt = d.format
    mx = finite_amax(d.data.to(acc_dtype(fmt)))
    if mx == 0.0:
        return ScaledTensor(ScaledTensorData(d.data, d.scale))
    new_scale = fmt.scale_for(mx * float(d.scale))
    ratio = d.scale.to(torch.float64) / new_scale
    data = fmt.cast((d.data.to(torch.float64) * ratio).to(acc_dtype(fmt)))
    return ScaledTensor(ScaledTensorData(data, torch.tensor(new_scale, dtype=torch.float32, device=d.data.device)))


def dequantise(st: ScaledTensor | ScaledTensorData, dtype: torch.dtype = torch.float32) -> Tensor:
    """The value ``data * scale`` as a plain tensor of ``dtype``."""
    d = st.st if isinstance(st, ScaledTensor) else st
    return d.to_tensor(dtype)


# ============================================================================ the subclass
_TO_FUNCS = {Tensor.to, Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16}
_HOST_FUNCS = {Tensor.tolist, Tensor.numpy, Tensor.item, Tensor.__array__}


class ScaledTensor(Tensor):
    """A tensor holding ``ScaledTensorData``; ``.st`` is the data, ``.to(dtype)`` dequantises.

    Its logical dtype is float32; its storage is the low-precision ``data`` plus ``scale``,
    and no view of it ever exposes ``data`` uninterpreted. ``@``, ``+``, ``-``, ``*``, relu,
    gelu, silu, tanh and shape ops stay scaled; anything else runs in float32 with a
    :class:`ScaledFallbackWarning`.

    >>> import torch
    >>> x = quantise(torch.tensor([16.0]), torch.int8)
    >>> (x + x).to(torch.float32)
    tensor([32.])
    """

    _data: Tensor
    _scale: Tensor

    @staticmethod
    def __new__(cls, st: ScaledTensorData) -> ScaledTensor:  # noqa: PYI034
        if not isinstance(st, ScaledTensorData):
            raise TypeError(f"ScaledTensor takes a ScaledTensorData, got {type(st).__name__}; use fxscale.quantise(x, dtype)")
        d = st.data
        self = Tensor._make_wrapper_subclass(
            cls, d.shape, strides=d.stride(), dtype=torch.float32, device=d.device, requires_grad=False
        )
        self._data = d
        self._scale = st.scale
        return self

    def __init__(self, st: ScaledTensorData) -> None:
        super().__init__()

    @property
    def st(self) -> ScaledTensorData:
        return ScaledTensorData(self._data, self._scale)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return repr(self.st)

    def __tensor_flatten__(self):
        return ["_data", "_scale"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        return ScaledTensor(ScaledTensorData(inner_tensors["_data"], inner_tensors["_scale"]))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Tensor.to(float32) on a float32-typed wrapper would return self: dequantise instead.
        if func in _TO_FUNCS and args and isinstance(args[0], ScaledTensor):
            return _to(func, args[0], args[1:], kwargs)
        if func in _HOST_FUNCS and args and isinstance(args[0], ScaledTensor):
            return func(dequantise(args[0]), *args[1:], **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # The op table lives beside the ops (fxscale.scaled_ops), imported here, lazily: no circle.
        from .scaled_ops import HANDLERS, fallback

        kwargs = kwargs or {}
        handler = HANDLERS.get(func) or HANDLERS.get(func.overloadpacket)
        if handler is not None:
            out = handler(func, args, kwargs)
            if out is not NotImplemented:
                return out
        return fallback(func, args, kwargs)


def _to(func, x: ScaledTensor, args, kwargs) -> Tensor:
    if func is not Tensor.to:
        dtype = {Tensor.float: torch.float32, Tensor.double: torch.float64, Tensor.half: torch.float16,
                 Tensor.bfloat16: torch.bfloat16}[func]
        return dequantise(x, dtype)
    device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
    d = x.st
    if device is not None and torch.device(device) != d.data.device:
        d = ScaledTensorData(d.data.to(device, non_blocking=non_blocking), d.scale.to(device, non_blocking=non_blocking))
    if dtype is None:
        return ScaledTensor(d)
    return d.to_tensor(dtype)

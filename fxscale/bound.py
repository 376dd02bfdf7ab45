"""``Bound``: what the compiler proves about a value, and how quantising widens it.

A :class:`Bound` holds upper bounds on six norms of a tensor, each ``inf`` when unknown:

* ``absmax``   max |x|
* ``rownorm``  max L2 norm along the last dim (a "row")
* ``colnorm``  max L2 norm along dim -2 (a "column" of the trailing matrix)
* ``rowsum``   max L1 norm along the last dim
* ``colsum``   max L1 norm along dim -2
* ``spectral`` max operator 2-norm of the trailing 2-D matrices

Fields are Python floats at compile time, or 0-d tensors when a bound depends on a value
measured at run time (an input without a declared bound, a requantise point): the same
rules evaluate either way.

>>> b = Bound(absmax=1.0).tighten((4, 16))
>>> [round(v, 9) for v in (b.rownorm, b.rowsum, b.colnorm)]  # rounded up, never down
[4.0, 16.0, 2.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from .formats import Format

Number = float | Tensor
INF = math.inf

__all__ = ["INF", "Bound", "Number", "as_float", "fmin", "fprod", "fsqrt", "quantised_bound"]


def _is_t(x) -> bool:
    return isinstance(x, Tensor)


def _extreme(xs: tuple, pick, pairwise, clamp_to: str) -> Number:
    floats = [float(x) for x in xs if not _is_t(x)]
    tensors = [x for x in xs if _is_t(x)]
    if not tensors:
        return pick(floats)
    out = tensors[0]
    for x in tensors[1:]:
        out = pairwise(out, x)
    # Floats join as a clamp bound: no tensor is built from them (no host copy, no sync).
    return torch.clamp(out, **{clamp_to: pick(floats)}) if floats else out


def fmin(*xs: Number) -> Number:
    """Minimum of floats and 0-d tensors (a tensor if any input is one; NaN propagates)."""
    return _extreme(xs, min, torch.minimum, "max")


def fmax(*xs: Number) -> Number:
    """Maximum of floats and 0-d tensors (a tensor if any input is one; NaN propagates)."""
    return _extreme(xs, max, torch.maximum, "min")


def fprod(*xs: Number) -> Number:
    """Product of bounds where 0 * inf is 0 (a zero bound means the value is exactly zero)."""
    if any(not _is_t(x) and float(x) == 0.0 for x in xs):
        return 0.0
    if not any(_is_t(x) for x in xs):
        return math.prod([float(x) for x in xs])
    out = zero = None
    for x in xs:
        if _is_t(x):
            zero = (x == 0) if zero is None else (zero | (x == 0))
        elif float(x) == 1.0:
            continue  # (no op for a unit factor: these run as kernels in every run-time scale)
        out = x if out is None else out * x
    return torch.where(zero, 0.0, out)


def fsqrt(x: Number) -> Number:
    return torch.sqrt(x) if _is_t(x) else math.sqrt(x)


def as_float(x: Number) -> float:
    return float(x.detach()) if _is_t(x) else float(x)


@dataclass(frozen=True)
class Bound:
    absmax: Number
    rownorm: Number = INF
    colnorm: Number = INF
    rowsum: Number = INF
    colsum: Number = INF
    spectral: Number = INF

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def unknown() -> Bound:
        return Bound(INF)

    @staticmethod
    def zero() -> Bound:
        return Bound(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    @staticmethod
    def of_tensor(t: Tensor, *, spectral: bool = True, columns: bool = True) -> Bound:
        """Exact norms of a concrete tensor (weights, constants; eager operands).

        ``columns=False`` skips the column norms (left unknown): an embedding table is read
        by rows only, and its 50k-row columns cost half the time of a GPT-2 analysis.
        """
        x = t.detach().to(torch.float64 if t.device.type == "cpu" and t.numel() < 2**16 else torch.float32)
        if x.numel() == 0:
            return Bound.zero()
        if x.dim() == 0:
            v = float(x.abs())
            return Bound(v, v, v, v, v, v)
        absmax = float(x.abs().max())
        if x.dtype == torch.float32 and 0 < absmax < math.inf and not 0.5 <= absmax < 1:
            # Norms of x / 2^e (exact) scaled back: float32 squares of tiny (< 1e-19) or huge
            # entries would under/overflow, and an underflowed norm of 0 is unsound.
            p2 = math.ldexp(1.0, math.frexp(absmax)[1])
            return Bound.of_tensor(x / p2, spectral=spectral, columns=columns).scaled(p2)
        a = x.abs()
        rownorm = float(torch.linalg.vector_norm(x, dim=-1).max())
        rowsum = float(a.sum(-1).max())
        if x.dim() == 1:
            return Bound(absmax, rownorm, absmax, rowsum, absmax, rownorm)
        if not columns:
            return Bound(absmax, rownorm, INF, rowsum).tighten(tuple(x.shape))
        colnorm = float(torch.linalg.vector_norm(x, dim=-2).max())
        colsum = float(a.sum(-2).max())
        spec = INF
        if spectral and x.dim() == 2:
            # Normalise by max |x| first: a float32 Gram matrix of tiny (< 1e-19) or huge
            # entries under/overflows, and an underflowed spectral norm of 0 is unsound.
            m = (x / absmax).to(torch.float32) if absmax > 0 else x.to(torch.float32)
            gram = m @ m.t() if m.shape[0] <= m.shape[1] else m.t() @ m
            lam = float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0))
            # float32 eigenvalues are accurate to ~1e-6 of ||G||; 1e-3 of margin is safe.
            spec = math.sqrt(lam * (1 + 1e-3)) * (absmax if absmax > 0 else 1.0)
        return Bound(absmax, rownorm, colnorm, rowsum, colsum, spec).tighten(tuple(x.shape))

    # ------------------------------------------------------------------ algebra
    def map(self, fn) -> Bound:
        return Bound(*(fn(getattr(self, f.name)) for f in fields(self)))

    def scaled(self, c: Number) -> Bound:
        """Bound of ``c * x`` for a scalar ``c`` (sign irrelevant)."""
        c = abs(c) if not _is_t(c) else c.abs()
        return self.map(lambda v: fprod(v, c))

    def plus(self, other: Bound) -> Bound:
        """Bound of ``x + y`` for same-shaped (already broadcast) operands."""
        return Bound(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def transposed(self) -> Bound:
        """Bound after swapping the last two dims."""
        return replace(self, rownorm=self.colnorm, colnorm=self.rownorm, rowsum=self.colsum, colsum=self.rowsum)

    def widen(self, factor: float) -> Bound:
        """Every field times ``factor`` (a margin for rounding in the arithmetic)."""
        return self.map(lambda v: v * factor)

    def elementwise(self) -> Bound:
        """Only what survives a shape change that keeps no row or column structure."""
        return Bound(self.absmax)

    def tighten(self, shape: tuple[int, ...]) -> Bound:
        """Derive each field from the others where that is tighter, for a value of ``shape``."""
        nd = len(shape)
        d = shape[-1] if nd >= 1 else 1
        r = shape[-2] if nd >= 2 else 1
        am, rn, cn, rs, cs, sp = self.absmax, self.rownorm, self.colnorm, self.rowsum, self.colsum, self.spectral
        am = fmin(am, rn, cn, rs, cs)
        # Derived fields round up (``_UP``): sqrt(3) * sqrt(3) is 2.9999999999999996 in float64.
        sd, sr = math.sqrt(d) * _UP, math.sqrt(r) * _UP
        rn = fmin(rn, fprod(sd, am), rs, fprod(fsqrt(fprod(rs, am)), _UP) if not _inf(rs) else INF)
        rs = fmin(rs, fprod(d, am), fprod(sd, rn))
        cn = fmin(cn, fprod(sr, am), cs, fprod(fsqrt(fprod(cs, am)), _UP) if not _inf(cs) else INF)
        cs = fmin(cs, fprod(r, am), fprod(sr, cn))
        sp = fmin(sp, fprod(sr, rn), fprod(sd, cn), fprod(fsqrt(fprod(rs, cs)), _UP) if not (_inf(rs) or _inf(cs)) else INF)
        if nd <= 1:
            cn, cs = am, am
            sp = fmin(sp, rn)
        return Bound(am, rn, cn, rs, cs, sp)

    def as_floats(self) -> Bound:
        return self.map(as_float)

    def is_finite(self) -> bool:
        return math.isfinite(as_float(self.absmax))


_UP = 1 + 2.0**-48  # a few float64 ulps: products and square roots of bounds round up


def _inf(x: Number) -> bool:
    return not _is_t(x) and math.isinf(x)


def quantised_bound(b: Bound, fmt: Format, scale: Number, shape: tuple[int, ...]) -> Bound:
    """Bound of ``dequantise(quantise(x, scale))`` given a bound ``b`` of ``x``.

    Round to nearest moves each element by at most ``rel * |x|`` (normal floats) plus half
    the format's smallest step (subnormals; integers: 0.5) times ``scale``, and never past
    ``max * scale``. Norms grow by the norm of that error.
    """
    rel = fmt.rel_rounding if fmt.is_float else 0.0
    half = (fmt.smallest_subnormal if fmt.is_float else 1.0) / 2
    d = shape[-1] if shape else 1
    r = shape[-2] if len(shape) >= 2 else 1
    step = fprod(half, scale)
    k = 1 + rel
    out = Bound(
        absmax=fmin(fprod(b.absmax, k) + step, fprod(fmt.max, scale)),
        rownorm=fprod(b.rownorm, k) + fprod(math.sqrt(d), step),
        colnorm=fprod(b.colnorm, k) + fprod(math.sqrt(r), step),
        rowsum=fprod(b.rowsum, k) + fprod(d, step),
        colsum=fprod(b.colsum, k) + fprod(r, step),
        spectral=b.spectral + fprod(math.sqrt(r * d), fprod(rel, b.absmax) + step),
    )
    return out.tighten(shape)

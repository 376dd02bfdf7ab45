"""Low-precision storage formats: range, resolution, scale choice and wasted bits.

One :class:`Format` per dtype. A scaled value is ``data * scale`` with ``data`` in the
format and ``scale`` a float32 power of two (by default), so rescaling is exact.

>>> from fxscale.formats import get_format
>>> f = get_format("e4m3")
>>> f.max, f.smallest_normal, f.bits
(448.0, 0.015625, 8)
>>> f.scale_for(100.0)   # smallest power of two with 100 / scale <= 448
0.25
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

__all__ = ["FORMATS", "Format", "get_format", "pow2_scale", "wasted_bits"]


@dataclass(frozen=True)
class Format:
    """A storage format and what the compiler needs to know about it.

    ``max``: largest finite magnitude; ``smallest_normal`` / ``smallest_subnormal``: where
    relative precision starts to fall off and where values flush to zero (for integers both
    are 1); ``bits``: storage width; ``mantissa_bits``: precision of normal numbers (for
    integers, ``bits - 1``); ``overflow``: what a plain ``tensor.to(dtype)`` does with finite
    values beyond ``max`` on the CPU ("saturate": clamps to ``max``, "inf": becomes inf,
    "wrap": integer wrap-around). fxscale never relies on it: :meth:`cast` clamps explicitly
    and keeps NaN/Inf non-finite. ``threshold``: default projected wasted bits above which
    the compiler inserts a requantise (see :func:`wasted_bits` for what a bit costs).
    ``pow2``: scales are powers of two (default: rescaling is exact, wasted bits are whole);
    ``get_format("int8:exact")`` gives scales of exactly ``amax / max`` instead, which wins
    up to one bit (~3 dB in int8) where the scale is measured or proven tight.
    """

    name: str
    dtype: torch.dtype
    max: float
    smallest_normal: float
    smallest_subnormal: float
    bits: int
    mantissa_bits: int
    is_float: bool
    overflow: str
    threshold: float
    pow2: bool = True

    @property
    def binades(self) -> float:
        """Binades of normal range: log2(max / smallest_normal)."""
        return math.log2(self.max / self.smallest_normal)

    @property
    def rel_rounding(self) -> float:
        """Largest relative rounding error of round-to-nearest for normal values."""
        return 2.0 ** -(self.mantissa_bits + 1)

    def scale_for(self, amax: float, *, pow2: bool | None = None) -> float:
        """Smallest scale (a power of two unless ``pow2`` is False) with ``amax / scale <= max``.

        ``amax == 0`` gives 1.0; a non-finite ``amax`` raises ``ValueError``.
        """
        amax = float(amax)
        if not math.isfinite(amax):
            raise ValueError(f"cannot choose a {self.name} scale for non-finite max |x| = {amax}")
        if amax == 0.0:
            return 1.0
        # Never below float32's smallest normal: a smaller scale is not a float32 (tiny
        # values in a wide format such as bfloat16 would otherwise divide by zero).
        pow2 = self.pow2 if pow2 is None else pow2
        scale = pow2_scale(amax / self.max) if pow2 else _f32_up(amax / self.max)
        # Never above 2^127: every finite float32 fits a format of max >= 2 with it (a larger
        # scale is not a float32).
        return min(max(scale, MIN_SCALE), MAX_SCALE)

    def scale_tensor(self, amax: torch.Tensor, *, pow2: bool | None = None) -> torch.Tensor:
        """:meth:`scale_for` on a 0-d tensor, without a host sync (for run-time scales).

        Zero gives 1; NaN/Inf give NaN/Inf, so that a non-finite input stays non-finite.
        """
        # float64 arithmetic: a bound computed at run time can pass float32's range (issue 11
        # case 17) though the values it bounds are float32; the scale is clamped into range.
        amax = amax.to(torch.float64)
        raw = amax / self.max
        if self.pow2 if pow2 is None else pow2:
            scale = torch.exp2(torch.ceil(torch.log2(raw)))
            # log2 rounding can land one binade low near exact powers of two: never too small.
            scale = torch.where(scale * self.max < amax, scale * 2, scale)
        else:
            scale = raw
        scale = scale.clamp(MIN_SCALE, MAX_SCALE)  # NaN stays NaN
        s32 = scale.to(torch.float32)
        # float32 rounding of an exact (non power of two) scale must not round it down.
        s32 = torch.where(s32.to(torch.float64) < scale, torch.nextafter(s32, torch.full_like(s32, math.inf)), s32)
        return torch.where(amax == 0, torch.ones_like(s32), s32)

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` (already divided by its scale) into this format.

        Finite values beyond ``max`` saturate to ``±max`` (a sound scale never produces
        them); NaN stays NaN and ±Inf becomes NaN (e4m3fn, int) or ±Inf (e5m2, float16,
        bfloat16) — never a finite number. Integer formats round half to even and, having
        no NaN, raise ``ValueError`` on non-finite input.
        """
        if self.is_float:
            y = x.clamp(-self.max, self.max)
            if self.overflow != "inf":
                y = torch.where(torch.isinf(x), torch.full_like(y, float("nan")), y)
            else:
                y = torch.where(torch.isinf(x), x, y)
            return y.to(self.dtype)
        msg = f"{self.name} has no NaN/Inf: cannot store a non-finite value; check the model input or use a float8 format"
        if _concrete():
            if not bool(torch.isfinite(x).all()):
                raise ValueError(msg)
        else:  # traced (export / compile): a device-side assert, no host sync
            torch._assert_async(torch.isfinite(x).all(), msg)
        return torch.round(x).clamp(-self.max, self.max).to(self.dtype)

    def store(self, w: torch.Tensor, scale: float, *, in_range: bool) -> torch.Tensor:
        """``w`` (float32) as this format's data at ``scale``, the way a weight is quantised once:
        a plain cast of ``w * (1 / scale)`` where the scale is a power of two and ``w`` is within
        it (``in_range``: chosen for its finite max), else :meth:`cast` of ``w / scale``."""
        if in_range and self.pow2:
            scaled = w * (1.0 / scale)
            return (scaled if self.is_float else torch.round(scaled)).to(self.dtype)
        return self.cast(w / scale)

    def info(self) -> torch.finfo | torch.iinfo:
        return torch.finfo(self.dtype) if self.is_float else torch.iinfo(self.dtype)


def _concrete() -> bool:
    """True outside tracing (export / compile), where a data-dependent check is allowed."""
    from torch._guards import detect_fake_mode

    return not torch.compiler.is_compiling() and detect_fake_mode() is None


#: Smallest scale ever chosen: float32's smallest normal, 2**-126.
MIN_SCALE = 2.0**-126
#: Largest scale ever chosen: 2**127 (any finite float32 / 2**127 is below 2).
MAX_SCALE = 2.0**127


def _f32_up(v: float) -> float:
    """The smallest float32 >= ``v`` (a scale stored as a float32 must not round down)."""
    t = torch.tensor(v, dtype=torch.float32)
    if float(t) < v:
        t = torch.nextafter(t, torch.tensor(math.inf))
    return float(t)


def pow2_scale(ratio: float) -> float:
    """Smallest power of two >= ``ratio`` (ratio > 0), exact in float32."""
    m, e = math.frexp(ratio)  # ratio = m * 2**e, 0.5 <= m < 1
    return math.ldexp(1.0, e - 1) if m == 0.5 else math.ldexp(1.0, e)


def _float(name: str, dtype: torch.dtype, overflow: str, threshold: float) -> Format:
    fi = torch.finfo(dtype)
    mant = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2, torch.float16: 10, torch.bfloat16: 7}[dtype]
    return Format(
        name=name,
        dtype=dtype,
        max=float(fi.max),
        smallest_normal=float(fi.smallest_normal),
        smallest_subnormal=float(fi.smallest_normal) * 2.0**-mant,
        bits=fi.bits,
        mantissa_bits=mant,
        is_float=True,
        overflow=overflow,
        threshold=threshold,
    )


def _int(name: str, dtype: torch.dtype, threshold: float) -> Format:
    ii = torch.iinfo(dtype)
    # Symmetric range: -max..max, so that negation and relu never overflow.
    return Format(
        name=name,
        dtype=dtype,
        max=float(ii.max),
        smallest_normal=1.0,
        smallest_subnormal=1.0,
        bits=ii.bits,
        mantissa_bits=ii.bits - 1,
        is_float=False,
        overflow="wrap",
        threshold=threshold,
    )


# Thresholds (projected wasted bits before a requantise goes in). Integers lose one bit of
# resolution per wasted bit, so int8 tolerates one. A float format loses precision only
# where values fall under its smallest normal, so e4m3 (15 binades of normal range) takes 6
# binades of headroom: measured, its SQNR is flat up to ~10 wasted binades on ReLU'd Gaussian and
# Student-t activations and on the test zoo and MiniLM (RESULTS_cpu.md); e5m2 (30 binades) is
# flat to ~24, so it takes 16.
FORMATS: dict[str, Format] = {
    "int8": _int("int8", torch.int8, threshold=1.0),
    "int16": _int("int16", torch.int16, threshold=4.0),
    "float8_e4m3fn": _float("float8_e4m3fn", torch.float8_e4m3fn, "saturate", threshold=6.0),
    "float8_e5m2": _float("float8_e5m2", torch.float8_e5m2, "inf", threshold=16.0),
    "float16": _float("float16", torch.float16, "inf", threshold=8.0),
    "bfloat16": _float("bfloat16", torch.bfloat16, "inf", threshold=16.0),
}

_ALIASES = {
    "e4m3": "float8_e4m3fn",
    "e4m3fn": "float8_e4m3fn",
    "fp8": "float8_e4m3fn",
    "e5m2": "float8_e5m2",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}


def get_format(fmt: str | torch.dtype | Format) -> Format:
    """The :class:`Format` for a dtype, its name or an alias (``"e4m3"``, ``"int8"``, ...)."""
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, torch.dtype):
        for f in FORMATS.values():
            if f.dtype == fmt:
                return f
        raise ValueError(f"unsupported format dtype {fmt}; choose one of {sorted(FORMATS)}")
    key = str(fmt).removeprefix("torch.").lower()
    base, _, variant = key.partition(":")
    base = _ALIASES.get(base, base)
    if base not in FORMATS or variant not in ("", "exact", "pow2"):
        raise ValueError(
            f"unknown format {fmt!r}; choose one of {sorted(FORMATS)} or an alias {sorted(_ALIASES)}, "
            "optionally with ':exact' for scales of exactly amax / max instead of powers of two"
        )
    if variant == "exact":
        return replace(FORMATS[base], name=f"{base}:exact", pow2=False)
    return FORMATS[base]


def wasted_bits(data: torch.Tensor, maxval: torch.Tensor | float | None = None) -> float:
    """How much of the format's range ``data`` (stored in a low-precision dtype) leaves unused.

    Integers (the seed's meaning): ``bits - 1 - log2(max |data|)``: each wasted bit halves
    the resolution. ``wasted_bits(torch.tensor([1, 2, -16], dtype=torch.int8)) == 3.0``.

    Floats: binades of headroom, ``log2(format max / max |data|)``. Headroom costs precision
    only for values pushed below the smallest normal; :func:`underflow_fraction` tells how
    many. All-zero data wastes every bit: ``bits`` is returned. A ``ScaledTensor`` or
    ``ScaledTensorData`` is measured on its stored data.
    """
    data = getattr(data, "st", data).data  # a ScaledTensor's logical dtype is float32: its stored data
    fmt = get_format(data.dtype)
    if maxval is None:
        maxval = data.to(torch.float32).abs().max() if data.numel() else torch.tensor(0.0)
    maxval = float(maxval)
    if maxval == 0.0:
        return float(fmt.bits)
    if fmt.is_float:
        return math.log2(fmt.max / maxval)
    return fmt.bits - 1 - math.log2(maxval)


def underflow_fraction(data: torch.Tensor) -> float:
    """Fraction of nonzero elements of ``data`` stored below the format's smallest normal."""
    fmt = get_format(data.dtype)
    a = data.to(torch.float32).abs()
    nz = a > 0
    n = int(nz.sum())
    return float(((a < fmt.smallest_normal) & nz).sum()) / n if n else 0.0

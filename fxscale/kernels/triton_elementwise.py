"""Light Triton passes over fp8 data that follow a matmul.

* :func:`requant_cast` -- the second pass of a requantise: reads the ``max |y|`` and row sums of
  squares that :func:`fxscale.kernels.triton_fp8.linear` gathered (``stats=True``), chooses the
  scale exactly as :meth:`fxscale.formats.Format.scale_tensor` does, and writes ``cast(y /
  scale)``, the scale and ``[amax, max row norm]`` -- one launch instead of a dozen small torch
  ops (which, at decode sizes, cost more than the matmul).
* :func:`relu_fp8` -- ReLU applied directly to fp8 data (exact: the cast is monotone and odd),
  used after a ``torch._scaled_mm`` that cannot fuse the activation.

Example (on a GPU; ``y`` bf16 ``(M, N)`` and ``buf`` the ``(M + 1,)`` stats of ``linear``)::

    data, scale, st = requant_cast(y, buf, get_format("e4m3"))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..formats import MAX_SCALE, MIN_SCALE, Format
from .triton_fp8 import _FP8_MAX, _NEG_NAN_LO, _OUT_KIND, _to_out


@triton.jit
def _choose_scale(amax, FMT_MAX: tl.constexpr, POW2: tl.constexpr, MIN_S: tl.constexpr,
                  MAX_S: tl.constexpr):
    """``Format.scale_tensor(amax)``: zero -> 1, NaN stays, clamped into ``[MIN_S, MAX_S]``
    (Inf -> ``MAX_S``), an exact (non power of two) scale rounded *up* to float32."""
    raw = tl.math.div_rn(amax, FMT_MAX)
    # The exact quotient is above the rounded one iff raw * FMT_MAX < amax, a product of two
    # float32 values, exact in float64: then step one ulp up, as scale_tensor does.
    below = raw.to(tl.float64) * FMT_MAX < amax.to(tl.float64)
    up = (raw.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True)
    raw = tl.where(below & (raw < float("inf")), up, raw)
    s = raw
    if POW2:  # smallest power of two >= raw, from the bits: clear the mantissa, bump if it was set
        bits = raw.to(tl.int32, bitcast=True)
        expo = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        s = (expo << 23).to(tl.float32, bitcast=True)
        s = tl.where(s * FMT_MAX < amax, s * 2.0, s)  # raw rounded down onto a power of two
    s = tl.where(s < MIN_S, MIN_S, s)
    s = tl.where(s > MAX_S, MAX_S, s)  # Inf too: x / 2**127 keeps Inf non-finite, the rest finite
    s = tl.where(amax.to(tl.int32, bitcast=True) == 0, 1.0, s)  # bits: a subnormal amax is not 0
    return tl.where(amax != amax, amax, s)  # noqa: PLR0124 (NaN stays NaN)


@triton.jit
def _requant_cast_kernel(y_ptr, stats_ptr, out_ptr, scale_ptr, st_ptr, n, M,
                         FMT_MAX: tl.constexpr, POW2: tl.constexpr, MIN_S: tl.constexpr,
                         MAX_S: tl.constexpr, OUT_KIND: tl.constexpr, OUT_MAX: tl.constexpr, BLOCK: tl.constexpr,
                         RBLOCK: tl.constexpr):
    amax = tl.load(stats_ptr)  # int32 bits of a non-negative float: the float itself
    s = _choose_scale(amax, FMT_MAX, POW2, MIN_S, MAX_S)
    pid = tl.program_id(0)
    if pid == 0:
        rmax = tl.zeros([RBLOCK], dtype=tl.float32)
        for start in tl.range(0, M, RBLOCK):
            offs = start + tl.arange(0, RBLOCK)
            rmax = tl.maximum(rmax, tl.load(stats_ptr + 1 + offs, mask=offs < M, other=0.0))
        rn = tl.sqrt(tl.max(rmax, axis=0))
        rn = tl.where(amax != amax, amax, rn)  # noqa: PLR0124 (a NaN result: both stats NaN)
        tl.store(scale_ptr, s)
        tl.store(st_ptr, amax)
        tl.store(st_ptr + 1, rn)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = _to_out(y, s, OUT_KIND, OUT_MAX)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


def requant_cast(y: torch.Tensor, stats: torch.Tensor, fmt: Format):
    """``(cast(y / s), s, [amax, max row norm])`` with ``s = fmt.scale_tensor(amax)``.

    ``stats``: float32 ``(M + 1,)``, ``[max |y| (as written by the atomics), row sums of
    squares...]`` for ``y`` of shape ``(M, N)``; ``fmt`` an fp8 format.
    """
    y = y.contiguous()
    out = torch.empty(y.shape, device=y.device, dtype=fmt.dtype)
    scale = torch.empty((), device=y.device, dtype=torch.float32)
    st = torch.empty(2, device=y.device, dtype=torch.float32)
    n, M = y.numel(), stats.numel() - 1
    block = 4096
    _requant_cast_kernel[(max(1, triton.cdiv(n, block)),)](
        y, stats, out, scale, st, n, M, FMT_MAX=fmt.max, POW2=fmt.pow2, MIN_S=MIN_SCALE, MAX_S=MAX_SCALE,
        OUT_KIND=_OUT_KIND[fmt.dtype], OUT_MAX=_FP8_MAX[fmt.dtype], BLOCK=block, RBLOCK=1024,
        num_warps=8,
    )
    return out, scale, st


@triton.jit
def _relu_fp8_kernel(d_ptr, out_ptr, n, NAN_LO: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(d_ptr + offs, mask=mask, other=0)
    # fp8 bytes: sign bit 0x80. Keep non-negatives and negative NaNs (byte >= NAN_LO);
    # e5m2 -Inf (0xFC) becomes 0 as relu(-inf) = 0.
    keep = (v < 128) | (v >= NAN_LO)
    tl.store(out_ptr + offs, tl.where(keep, v, 0), mask=mask)


def relu_fp8(d: torch.Tensor) -> torch.Tensor:
    """ReLU on fp8 data, in place (exactly ``cast(relu(y) / s)`` for ``d = cast(y / s)``)."""
    n = d.numel()
    if n:
        v = d.view(torch.uint8)
        block = 8192
        _relu_fp8_kernel[(triton.cdiv(n, block),)](v, v, n, NAN_LO=_NEG_NAN_LO[d.dtype], BLOCK=block,
                                                   num_warps=8)
    return d

"""Normalisation rules of the rule table: LayerNorm (PyTorch's kernel and fxscale's two-pass
one), RMSNorm, eval-mode BatchNorm. Their bounds hold for the kernels' float32 rounding, which
each docstring derives (and tests/test_rules_layer_norm.py attacks).

Imported by :mod:`fxscale.rules`, which registers them; not imported directly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import ops as _ops  # noqa: F401  (registers torch.ops.fxscale.layer_norm)
from ..bound import INF, Bound, fprod
from .helpers import const_float
from .registry import Arg, RuleCall, Unbounded, register

aten = torch.ops.aten

def _affine(xhat_abs: float, xhat_rn: float, weight, bias) -> Bound:
    """Bound of ``weight * xhat + bias`` given bounds on ``xhat``'s absmax and row norm."""
    g = weight.bound.absmax if isinstance(weight, Arg) else 1.0
    am, rn = fprod(xhat_abs, g), fprod(xhat_rn, g)
    if isinstance(bias, Arg):
        am, rn = am + bias.bound.absmax, rn + bias.bound.rownorm
    return Bound(am, rn)


#: Unit roundoff of the arithmetic normalisation kernels use (float32, for float32, bf16 and
#: fp16 inputs alike; float64 inputs compute more precisely, so this is conservative there).
_KERNEL_U = 2.0**-24
#: LayerNorm's rounding term, in units of ``u max|x| / sqrt(eps)``: measured at most 2 on
#: PyTorch's float32 CPU kernel (D = 4..4096, eps 1e-5 and 1e-12, |x| 2^0..2^30, rows a few
#: ulps from constant, tests/test_holes_rules.py); 4 gives a 2x margin.
_LN_ROUNDING = 4.0


@register(aten.layer_norm)
def _layer_norm(c: RuleCall) -> Bound:
    """Exact math: a zero-mean row with unit RMS has ``||xhat|| <= sqrt(D)``, ``|xhat_i| <= sqrt(D-1)``.

    The kernel adds rounding: on rows within a few ulps of a constant ``A`` its variance
    cancels to ~0, and ``(x - mean) / sqrt(var + eps)`` comes out up to an ulp of ``A`` over
    ``sqrt(eps)`` (``39.5`` for D=16, x ~ 2^20, against ``sqrt(15) = 3.9``). So
    ``|xhat_i| <= sqrt(D - 1) + 4 u max|x| / sqrt(eps)`` (``u = 2^-24``): negligible for
    ordinary activations, large where the input's bound is (then a requantise measures
    the output at run time). ``eps`` below :data:`MIN_EPS` (0 included) has no bound (measured).
    """
    d = math.prod(c["normalized_shape"])
    eps = float(c.get("eps", 1e-5))
    if not eps >= MIN_EPS:
        raise Unbounded(f"eps={eps:g} is below {MIN_EPS:g} (float32's smallest normal): the variance may vanish")
    rounding = fprod(c["input"].bound.absmax, _LN_ROUNDING * _KERNEL_U / math.sqrt(eps))
    am = math.sqrt(max(d - 1, 1)) + rounding
    rn = math.sqrt(d) + fprod(rounding, math.sqrt(d)) if len(c["normalized_shape"]) == 1 else INF
    return _affine(am, rn, c.get("weight"), c.get("bias"))


@register(torch.ops.fxscale.layer_norm)
def _two_pass_layer_norm(c: RuleCall) -> Bound:
    """``torch.ops.fxscale.layer_norm``: ``xhat = d * rsqrt(sum_j fl(d_j^2) / D + eps)``, one ``d``.

    Proof (float32, ``u = 2^-24``; rsqrt within 4 ulps as on CUDA): every term of the sum is
    non-negative, so in any order ``S >= (1 - u)^D d_i^2``; the division, ``+ eps`` and rsqrt add
    ``(1 - u)^2`` and ``1 + 4u``, the product ``1 + u``: ``|xhat_i| <= sqrt(D) (1 + (D + 16) u)``,
    whatever the mean's error (and ``||xhat||_2`` likewise). Where ``d_i^2`` underflows,
    ``|xhat_i| <= 2^-62 / sqrt(eps)``.

    The tighter of that and ``sqrt(D - 1) + |dbar| / sqrt(eps)``, ``dbar`` the exact mean of the
    computed ``d``: ``sum_j d_j^2 = sum_j (d_j - dbar)^2 + D dbar^2``, and a deviation from the
    mean is at most ``sqrt(D - 1)`` RMS deviations, so ``|d_i| / sqrt(sum d^2 / D + eps) <=
    sqrt(D - 1) + |dbar| / sqrt(eps)``; ``|dbar| <= (D + 4) u max|x|`` (the float32 mean's error,
    ``D u max|x|``, and each ``d_j``'s rounding, ``2 u max|x|``). It wins where ``max|x| /
    sqrt(eps)`` is moderate (ConvNeXt's D=16: 3.88 against 4.0, a bit of int8 precision).
    The affine step and the cast to bf16 are the registry's ``MARGIN`` (``2^-7`` on every
    computed rule), not a second factor here.
    """
    d = math.prod(c["normalized_shape"])
    eps = float(c.get("eps", 1e-5))
    if not eps > 0:
        return None
    tiny = 2.0**-61 / math.sqrt(eps)
    mean_err = fprod(c["x"].bound.absmax, (d + 4) * _KERNEL_U / math.sqrt(eps))
    tight = math.sqrt(max(d - 1, 1)) + mean_err
    # a run-time bound (tensor) takes sqrt(D): no data-dependent branch in the compiled graph
    am = (min(math.sqrt(d), tight) if isinstance(tight, float) else math.sqrt(d)) * (1.0 + (d + 16) * _KERNEL_U) + tiny
    rn = math.sqrt(d) * (1.0 + (d + 16) * _KERNEL_U) + tiny
    rn = rn + fprod(tiny, math.sqrt(d)) if len(c["normalized_shape"]) == 1 else INF
    return _affine(am, rn, c.get("weight"), c.get("bias"))


#: The smallest ``eps`` the ``sqrt(D)`` bounds of RMSNorm and PyTorch's LayerNorm hold for:
#: float32's smallest normal. A square ``x_j^2`` below it rounds to a subnormal or, on GPUs,
#: flushes to 0, so the computed mean of squares can fall short of the exact one by up to
#: that much; an ``eps`` at least as large makes up for it. (eps = 0 and D = 3, one element
#: 7.9e-23: the kernel returns 2.1 where sqrt(3) = 1.73; found by an adversarial trial.)
MIN_EPS = 2.0**-126


@register(aten.rms_norm)
def _rms_norm(c: RuleCall) -> Bound | None:
    """``x_i / sqrt(mean_j x_j^2 + eps)`` is at most ``sqrt(D)`` for ``eps >= MIN_EPS`` (no eps:
    the dtype's machine epsilon, always above it); a smaller or negative eps has no bound
    (measured: with ``eps < 0`` the denominator approaches 0, ``400`` for ``D = 16``)."""
    eps = c.get("eps")
    if eps is not None and not float(eps) >= MIN_EPS:
        raise Unbounded(f"eps={float(eps):g} is below {MIN_EPS:g} (float32's smallest normal): squares may underflow")
    d = math.prod(c["normalized_shape"])
    rn = math.sqrt(d) if len(c["normalized_shape"]) == 1 else INF
    return _affine(math.sqrt(d), rn, c.get("weight"), None)


def _bn_terms(var: Tensor, mean: Tensor, w: Tensor | None, b: Tensor | None, eps: float):
    """``(max_c |a_c|, max_c |a_c mu_c| + |beta_c|)`` with ``a_c = gamma_c / sqrt(var_c + eps)``."""
    a = 1.0 / torch.sqrt(var.detach().double() + eps)
    if w is not None:
        a = a * w.detach().double()
    beta = b.detach().double().abs() if b is not None else torch.zeros_like(a)
    a = a.abs()
    return a.max(), (a * mean.detach().double().abs() + beta).max()


@register(aten.batch_norm, aten._native_batch_norm_legit_no_training)
def _batch_norm(c: RuleCall):
    """Eval batch norm, per channel ``a_c (x - mean_c) + beta_c`` with ``a_c = gamma_c / sqrt(var_c + eps)``."""
    if c.get("training", False):
        return None
    x, mean, var = c["input"], c.get("running_mean"), c.get("running_var")
    w, b = c.get("weight"), c.get("bias")
    if not isinstance(mean, Arg) or mean.value is None or var.value is None:
        return None
    eps = float(c.get("eps", 1e-5))
    wv = w.value if isinstance(w, Arg) else None
    bv = b.value if isinstance(b, Arg) else None
    ts = (var.value, mean.value, wv, bv)
    a_max = const_float(lambda *t: _bn_terms(*t, eps)[0], *ts, key=("bn_a", eps))
    shift = const_float(lambda *t: _bn_terms(*t, eps)[1], *ts, key=("bn_shift", eps))
    am = fprod(a_max, x.bound.absmax) + shift
    out = Bound(am)
    if c.op == aten._native_batch_norm_legit_no_training.default:
        return (out, None, None)
    return out

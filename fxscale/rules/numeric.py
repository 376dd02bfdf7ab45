"""Numeric rules of the rule table: matmuls, elementwise ops, embedding, attention, gathers (the
reductions are in :mod:`fxscale.rules.reductions`, the normalisations in :mod:`fxscale.rules.normalisation`).

Each rule bounds an op's output from its inputs' bounds (see :mod:`fxscale.rules`). Imported
by :mod:`fxscale.rules`, which registers them; not imported directly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import ops as _ops  # noqa: F401  (registers torch.ops.fxscale.layer_norm)
from ..bound import INF, Bound, fmax, fmin, fprod, fsqrt
from .helpers import add_bias, as_matrix_lhs, as_matrix_rhs, bcast, const_float, matmul_bound
from .registry import Arg, RuleCall, Unbounded, register

aten = torch.ops.aten

# ============================================================================ matmuls
@register(aten.mm, aten.bmm, aten.matmul)
def _mm(c: RuleCall) -> Bound:
    a, b = c["self"], c[("mat2" if "mat2" in c.args else "other")]
    out = matmul_bound(as_matrix_lhs(a), as_matrix_rhs(b), a.shape[-1])
    if len(b.shape) == 1 and len(a.shape) >= 2:
        # (..., M, K) @ (K,) -> (..., M): the output's rows are the (M, 1) products' columns.
        return Bound(out.absmax, rownorm=out.colnorm)
    if len(a.shape) == 1 and len(b.shape) >= 3:
        # (K,) @ (..., K, N) -> (..., N): rows stack across the batch, so no column structure.
        return Bound(out.absmax, rownorm=out.rownorm)
    return out


@register(aten.linear)
def _linear(c: RuleCall) -> Bound:
    x, w = c["input"], c["weight"]
    if len(w.shape) == 1:
        # (..., K) . (K,) -> (...): one number per row of x, so the output's "rows" run across
        # x's rows: only |out_i| <= ||x_i|| ||w|| survives (its row norm needs x's columns).
        out = matmul_bound(as_matrix_lhs(x), as_matrix_rhs(w), x.shape[-1])
        out = Bound(out.absmax, rownorm=out.colnorm if len(x.shape) == 2 else INF)
    else:
        out = matmul_bound(as_matrix_lhs(x), w.bound.transposed(), x.shape[-1])
    return add_bias(out, c.get("bias"), c.out_shape)


@register(aten.addmm, aten.baddbmm)
def _addmm(c: RuleCall) -> Bound:
    a = c["mat1"] if "mat1" in c.args else c["batch1"]
    b = c["mat2"] if "mat2" in c.args else c["batch2"]
    beta, alpha = float(c.get("beta", 1)), float(c.get("alpha", 1))
    out = matmul_bound(a.bound, b.bound, a.shape[-1]).scaled(alpha)
    return add_bias(out, c["self"] if beta != 0 else None, c.out_shape, beta)


@register(aten.conv1d, aten.conv2d, aten.convolution, aten.conv_transpose1d, aten.conv_transpose2d,
          aten.conv_transpose3d)
def _conv(c: RuleCall) -> Bound:
    """``|y| <= max|x| * max_o ||W_o||_1 + max|b|`` (K = C_in/groups * kernel size)."""
    x, w = c["input"], c["weight"]
    transposed = bool(c.get("transposed", False)) or "conv_transpose" in str(c.op)
    if w.value is not None:
        l1 = const_float(_conv_t_l1 if transposed else _conv_l1, w.value)
    else:
        # (C_out, C_in/g, k...) or, transposed, (C_in, C_out/g, k...): an output reads dim 0 there
        k = math.prod(w.shape[2:]) * (w.shape[0] if transposed else w.shape[1])
        l1 = fprod(w.bound.absmax, k)
    out = Bound(fprod(x.bound.absmax, l1))
    return add_bias(out, c.get("bias"), (c.out_shape[1],)) if c.get("bias") is not None else out


# ============================================================================ elementwise
def _binary_inputs(c: RuleCall):
    return bcast(c["self"], c.out_shape), bcast(c["other"], c.out_shape)


@register(aten.add, aten.sub)
def _add(c: RuleCall) -> Bound:
    a, b = _binary_inputs(c)
    return a.plus(b.scaled(float(c.get("alpha", 1))))


@register(aten.mul)
def _mul(c: RuleCall) -> Bound:
    a, b = _binary_inputs(c)
    return Bound(
        fprod(a.absmax, b.absmax),
        fmin(fprod(a.rownorm, b.absmax), fprod(a.absmax, b.rownorm)),
        fmin(fprod(a.colnorm, b.absmax), fprod(a.absmax, b.colnorm)),
        fmin(fprod(a.rowsum, b.absmax), fprod(a.absmax, b.rowsum)),
        fmin(fprod(a.colsum, b.absmax), fprod(a.absmax, b.colsum)),
        fprod(a.spectral, b.spectral),  # Schur: ||A o B|| <= ||A|| ||B||
    )


@register(aten.div)
def _div(c: RuleCall) -> Bound | None:
    a, d = bcast(c["self"], c.out_shape), c["other"]
    if c.get("rounding_mode") is not None:
        raise Unbounded(f"division with rounding_mode={c.get('rounding_mode')!r}")
    if isinstance(d, Arg):
        if d.value is None:
            raise Unbounded("the divisor is a value known only at run time (no lower bound on its |x|)")
        m = const_float(_abs_min, d.value)
        if m == 0:
            raise Unbounded("the constant divisor has a zero element")
        return _keep_norms(a).scaled(1.0 / m)
    if float(d) == 0:
        raise Unbounded("division by 0")
    return a.scaled(1.0 / float(d))


def _keep_norms(b: Bound) -> Bound:
    """Elementwise ``|f(x)| <= |x|`` keeps every norm but the spectral one."""
    return Bound(b.absmax, b.rownorm, b.colnorm, b.rowsum, b.colsum)


#: Extra margin for transcendental kernels (erf, tanh, GELU, SiLU, ...): PyTorch's bf16 CPU
#: kernels evaluate them with bf16-rounded intermediates, ~1% off the exact function (erf near
#: 0 came out 0.5% above 2/sqrt(pi) |x| in tests/test_rules_kernels.py); 2^-5 covers it.
_APPROX = 1 + 2.0**-5


def _approx(b: Bound) -> Bound:
    return b.widen(_APPROX)


def _capped(b: Bound, cap: float, gain: float = 1.0) -> Bound:
    """Elementwise ``|f(x)| <= min(cap, gain |x|)``: the norms scale by ``gain``, max |x| is capped."""
    k = _keep_norms(b).scaled(gain) if gain != 1.0 else _keep_norms(b)
    return Bound(fmin(k.absmax, cap), k.rownorm, k.colnorm, k.rowsum, k.colsum)


@register(aten.neg, aten.abs, exact=True)
def _neg(c: RuleCall) -> Bound:
    return c["self"].bound


@register(aten.relu, aten.silu, aten.leaky_relu, aten.hardswish, aten.mish)
def _shrinking(c: RuleCall) -> Bound:
    """relu, silu (x sigmoid(x)), hardswish (x relu6(x + 3) / 6), mish (x tanh(softplus x)) and
    leaky_relu with |slope| <= 1 never grow |x|."""
    if c.op is aten.leaky_relu.default and abs(float(c.get("negative_slope", 0.01))) > 1:
        return None
    b = _keep_norms(c["self"].bound)
    return b if c.op in (aten.relu.default, aten.leaky_relu.default) else _approx(b)


def _clamped(b: Bound, lo: float | None, hi: float | None) -> Bound:
    """Bound of ``clamp(x, lo, hi)``: never grows |x| when the range holds 0, else within it."""
    ends = [abs(float(v)) for v in (lo, hi) if v is not None]
    if (lo is None or float(lo) <= 0) and (hi is None or float(hi) >= 0):
        return _capped(b, max(ends) if len(ends) == 2 else INF)  # both ends given: |out| <= the larger
    if lo is not None and hi is not None:
        return Bound(max(ends))
    return Bound(fmax(b.absmax, *ends))


@register(aten.hardtanh)
def _hardtanh(c: RuleCall) -> Bound:
    """hardtanh(x, min_val, max_val) (ReLU6 is hardtanh(0, 6)) is a clamp."""
    return _clamped(c["self"].bound, c.get("min_val", -1.0), c.get("max_val", 1.0))


@register(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(c: RuleCall) -> Bound:
    lo = c.get("min") if c.op is not aten.clamp_max.default else None
    hi = c.get("max") if c.op is not aten.clamp_min.default else None
    if isinstance(lo, Arg) or isinstance(hi, Arg):
        return None
    return _clamped(c["self"].bound, lo, hi)


@register(aten.elu)
def _elu(c: RuleCall) -> Bound:
    """``scale * (x if x > 0 else alpha (exp(input_scale x) - 1))``; ``|e^t - 1| <= |t|`` for t < 0."""
    scale, alpha = abs(float(c.get("scale", 1.0))), abs(float(c.get("alpha", 1.0)))
    input_scale = float(c.get("input_scale", 1.0))
    b = c["self"].bound
    if input_scale < 0:
        # x < 0 gives exp(|input_scale| |x|) - 1: it grows, bounded through max |x| only.
        t = fprod(abs(input_scale), b.absmax)
        grow = torch.expm1(t) if isinstance(t, Tensor) else (math.expm1(t) if t < 700 else INF)
        return Bound(fprod(scale, fmax(b.absmax, fprod(alpha, grow))))
    k = scale * max(1.0, alpha * input_scale)
    return _keep_norms(b).scaled(k)


@register(aten.erf)
def _erf(c: RuleCall) -> Bound:
    """``|erf(x)| <= min(1, 2/sqrt(pi) |x|)``."""
    return _approx(_capped(c["self"].bound, 1.0, 2.0 / math.sqrt(math.pi)))


@register(aten.sin, aten.tanh)
def _sin_tanh(c: RuleCall) -> Bound:
    """``|sin(x)|, |tanh(x)| <= min(1, |x|)``."""
    return _approx(_capped(c["self"].bound, 1.0))


@register(aten.cos)
def _cos(c: RuleCall) -> Bound:
    return Bound(1.0)


@register(aten.gelu)
def _gelu(c: RuleCall) -> Bound:
    """``|gelu(x)| = |x| Phi(x) <= |x|`` (the tanh form too)."""
    return _approx(_keep_norms(c["self"].bound))


@register(aten.dropout)
def _dropout(c: RuleCall) -> Bound | None:
    if c.get("train", False):
        return None  # training-mode dropout rescales by 1/(1-p): capture in eval mode
    return c["input"].bound


@register(aten.sigmoid)
def _sigmoid(c: RuleCall) -> Bound:
    return Bound(1.0)


@register(aten.sqrt)
def _sqrt(c: RuleCall) -> Bound:
    """``sqrt(|x|) <= sqrt(max |x|)`` (NaN below 0; a written-out LayerNorm's ``sqrt(var + eps)``)."""
    return Bound(c["self"].bound.absmax ** 0.5)


@register(aten.rsub)
def _rsub(c: RuleCall) -> Bound:
    """``other - alpha * self`` (``1.0 - mask``)."""
    a, b = _binary_inputs(c)
    return b.plus(a.scaled(float(c.get("alpha", 1))))


@register(aten.glu)
def _glu(c: RuleCall) -> Bound:
    """``a * sigmoid(b)`` of the two halves along ``dim``: ``|a| sigmoid(b) <= |a|``, elementwise, so
    every row of the output is at most as long as a row of the input."""
    b = c["self"].bound
    return Bound(b.absmax, b.rownorm)


@register(aten.pow)
def _pow(c: RuleCall) -> Bound | None:
    x, p = c.get("self"), c.get("exponent")
    if not isinstance(x, Arg) or isinstance(p, Arg):
        return None
    p = float(p)
    b = x.bound
    if p >= 1:
        g = b.absmax ** (p - 1) if p != 1 else 1.0
        return Bound(b.absmax**p, fprod(b.rownorm, g), fprod(b.colnorm, g), fprod(b.rowsum, g), fprod(b.colsum, g))
    if p > 0:
        return Bound(b.absmax**p)
    return None


@register(aten.softmax, aten._softmax)
def _softmax(c: RuleCall) -> Bound:
    dim, nd = int(c["dim"]), len(c.out_shape)
    dim = dim % nd if nd else 0
    if dim == nd - 1:
        return Bound(1.0, 1.0, INF, 1.0)
    if dim == nd - 2:
        return Bound(1.0, INF, 1.0, INF, 1.0)
    return Bound(1.0)


# ============================================================================ embedding, attention, conv helpers
def _conv_l1(w: Tensor) -> Tensor:
    return w.detach().abs().flatten(1).sum(1).max()


def _conv_t_l1(w: Tensor) -> Tensor:
    """Transposed conv, weight ``(C_in, C_out/g, k...)``: output channel ``o`` reads ``w[:, o]``
    (summing every kernel tap over-counts strided outputs, which is sound)."""
    return w.detach().abs().transpose(0, 1).flatten(1).sum(1).max()


def _abs_min(t: Tensor) -> Tensor:
    return t.detach().abs().min()


@register(aten.embedding)
def _embedding(c: RuleCall) -> Bound:
    w = c["weight"].bound
    return Bound(w.absmax, w.rownorm, INF, w.rowsum)


@register(aten.scaled_dot_product_attention)
def _sdpa(c: RuleCall) -> Bound:
    """Each output row is a convex combination of rows of V (softmax weights sum to 1)."""
    v = c["value"].bound
    out = Bound(v.absmax, v.rownorm, INF, v.rowsum)
    p = float(c.get("dropout_p", 0.0))
    if p > 0:  # dropout keeps weights scaled by 1/(1-p): rows are no longer convex mixes
        return Bound.zero() if p >= 1 else out.scaled(1.0 / (1.0 - p))
    return out


@register(aten.where)
def _where(c: RuleCall) -> Bound:
    a, b = bcast(c["self"], c.out_shape), bcast(c["other"], c.out_shape)
    return Bound(
        fmax(a.absmax, b.absmax),
        fsqrt(fprod(a.rownorm, a.rownorm) + fprod(b.rownorm, b.rownorm)),
        fsqrt(fprod(a.colnorm, a.colnorm) + fprod(b.colnorm, b.colnorm)),
        a.rowsum + b.rowsum,
        a.colsum + b.colsum,
    )


@register(aten.masked_fill)
def _masked_fill(c: RuleCall) -> Bound:
    v = c["value"]
    vb = v.bound.absmax if isinstance(v, Arg) else abs(float(v))
    return Bound(fmax(c["self"].bound.absmax, vb))


@register(aten.full, aten.full_like, aten.new_full, exact=True)
def _full(c: RuleCall) -> Bound:
    return Bound(abs(float(c["fill_value"])))


@register(aten.zeros, aten.zeros_like, aten.new_zeros, exact=True)
def _zeros(c: RuleCall) -> Bound:
    return Bound.zero()


@register(aten.ones, aten.ones_like, aten.new_ones, exact=True)
def _ones(c: RuleCall) -> Bound:
    return Bound(1.0)


@register(aten.scalar_tensor, exact=True)
def _scalar_tensor(c: RuleCall) -> Bound:
    return Bound(abs(float(c["s"])))



@register(aten.hardsigmoid)
def _hardsigmoid(c: RuleCall) -> Bound:
    """``hardsigmoid(x) = clamp(x / 6 + 1/2, 0, 1)``: within ``[0, min(1, (max|x| + 3) / 6)]``."""
    return Bound(fmin(1.0, (c["self"].bound.absmax + 3.0) / 6.0))


@register("transformers::grouped_mm_fallback", aten._grouped_mm)
def _grouped_mm(c: RuleCall) -> Bound | None:
    """Grouped (MoE expert) matmul: row ``i`` of ``x`` (S, K) times its group's ``W_e`` (K, N)
    of ``w`` (E, K, N); rows past the last offset are 0. Each row is bounded as by a matmul
    with any one expert: ``w``'s bound holds the max over experts of each column's norms."""
    x = c["input"] if "input" in c.args else c["self"]
    w = c["weight"] if "weight" in c.args else c["mat2"]
    if len(x.shape) != 2 or len(w.shape) != 3 or c.get("bias") is not None:
        return None
    wb = w.bound
    out = matmul_bound(x.bound, Bound(wb.absmax, INF, wb.colnorm, INF, wb.colsum, wb.spectral), x.shape[-1])
    return Bound(out.absmax, out.rownorm)


@register(aten.index.Tensor)
def _index(c: RuleCall) -> Bound:
    """Advanced indexing gathers entries: max |x| stays; where the last dim is not indexed, each
    output row is an input row, so the row norms stay too. (An index of ``k`` dims may be a
    boolean mask over ``k`` dims of ``x``: it is counted as consuming ``k``.)"""
    x, idx = c["self"], list(c["indices"])
    b = x.bound
    while idx and idx[-1] is None:
        idx.pop()
    consumed = sum(1 if i is None else max(1, len(i.shape)) for i in idx)
    if consumed < len(x.shape):
        return Bound(b.absmax, b.rownorm, INF, b.rowsum)
    return Bound(b.absmax)



# ============================================================================ exp
#: exp(x) overflows float32 (and bfloat16, fp16: no wider range) above ~88.72: past exp(88) the
#: bound is unknown (INF), never a finite number that no kernel result can reach.
_EXP_MAX_ARG = 88.0


@register(aten.exp)
def _exp(c: RuleCall) -> Bound:
    """``0 < exp(x) <= exp(max|x|)`` (exp increases, so ``|x| <= B`` gives ``exp(x) <= exp(B)``),
    widened by ``_approx`` for the kernel (bf16 rounds a float32 exp). ``B`` infinite, NaN or
    above 88 (float32 exp overflows at 88.72) gives INF: unknown, measured at run time.

    >>> from fxscale.rules import Arg, Bound, evaluate
    >>> evaluate(aten.exp.default, (Arg(Bound(1.0), (3,)),), {}, [(3,)])[0].absmax > math.e
    True
    >>> evaluate(aten.exp.default, (Arg(Bound(1e4), (3,)),), {}, [(3,)])[0].absmax
    inf
    """
    b = c["self"].bound.absmax
    if isinstance(b, Tensor):
        e = torch.where(b <= _EXP_MAX_ARG, torch.exp(torch.clamp(b, max=_EXP_MAX_ARG)), INF)
    else:
        b = float(b)
        e = math.exp(b) if b <= _EXP_MAX_ARG else INF  # (NaN compares False: INF)
    return _approx(Bound(e))

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

from .bound import INF, Bound, fmin, fprod, fsqrt

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


def _normalise(op, args, kwargs) -> dict[str, Any]:
    schema = op._schema
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
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


# ============================================================================ matmuls
@register(aten.mm, aten.bmm, aten.matmul)
def _mm(c: RuleCall) -> Bound:
    a, b = c["self"], c[("mat2" if "mat2" in c.args else "other")]
    out = matmul_bound(_as_matrix_lhs(a), _as_matrix_rhs(b), a.shape[-1])
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
    out = matmul_bound(_as_matrix_lhs(x), w.bound.transposed(), x.shape[-1])
    return _add_bias(out, c.get("bias"), c.out_shape)


@register(aten.addmm, aten.baddbmm)
def _addmm(c: RuleCall) -> Bound:
    a = c["mat1"] if "mat1" in c.args else c["batch1"]
    b = c["mat2"] if "mat2" in c.args else c["batch2"]
    beta, alpha = float(c.get("beta", 1)), float(c.get("alpha", 1))
    out = matmul_bound(a.bound, b.bound, a.shape[-1]).scaled(alpha)
    return _add_bias(out, c["self"] if beta != 0 else None, c.out_shape, beta)


@register(aten.conv1d, aten.conv2d, aten.convolution)
def _conv(c: RuleCall) -> Bound:
    """``|y| <= max|x| * max_o ||W_o||_1 + max|b|`` (K = C_in/groups * kernel size)."""
    x, w = c["input"], c["weight"]
    if w.value is not None:
        l1 = const_float(_conv_l1, w.value)
    else:
        l1 = fprod(w.bound.absmax, math.prod(w.shape[1:]))
    out = Bound(fprod(x.bound.absmax, l1))
    return _add_bias(out, c.get("bias"), (c.out_shape[1],)) if c.get("bias") is not None else out


# ============================================================================ elementwise
def _binary_inputs(c: RuleCall):
    return _bcast(c["self"], c.out_shape), _bcast(c["other"], c.out_shape)


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
    a, d = _bcast(c["self"], c.out_shape), c["other"]
    if c.get("rounding_mode") is not None:
        return None
    if isinstance(d, Arg):
        if d.value is None:
            return None  # dividing by a run-time tensor: no bound
        m = const_float(_abs_min, d.value)
        if m == 0:
            return None
        return _keep_norms(a).scaled(1.0 / m)
    if float(d) == 0:
        return None
    return a.scaled(1.0 / float(d))


def _keep_norms(b: Bound) -> Bound:
    """Elementwise ``|f(x)| <= |x|`` keeps every norm but the spectral one."""
    return Bound(b.absmax, b.rownorm, b.colnorm, b.rowsum, b.colsum)


@register(aten.neg, aten.abs, exact=True)
def _neg(c: RuleCall) -> Bound:
    return c["self"].bound


@register(aten.relu, aten.silu, aten.hardtanh, aten.leaky_relu)
def _shrinking(c: RuleCall) -> Bound:
    """relu, silu (x * sigmoid(x)), hardtanh, leaky_relu (slope <= 1) never grow |x|."""
    if c.op in (aten.leaky_relu.default,) and abs(float(c.get("negative_slope", 0.01))) > 1:
        return None
    return _keep_norms(c["self"].bound)


@register(aten.gelu)
def _gelu(c: RuleCall) -> Bound:
    """``|gelu(x)| = |x| Phi(x) <= |x|`` (the tanh form too)."""
    return _keep_norms(c["self"].bound)


@register(aten.dropout)
def _dropout(c: RuleCall) -> Bound | None:
    if c.get("train", False):
        return None  # training-mode dropout rescales by 1/(1-p): capture in eval mode
    return c["input"].bound


@register(aten.tanh)
def _tanh(c: RuleCall) -> Bound:
    b = _keep_norms(c["self"].bound)
    return Bound(fmin(b.absmax, 1.0), b.rownorm, b.colnorm, b.rowsum, b.colsum)


@register(aten.sigmoid)
def _sigmoid(c: RuleCall) -> Bound:
    return Bound(1.0)


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


# ============================================================================ normalisation
def _affine(xhat_abs: float, xhat_rn: float, weight, bias) -> Bound:
    """Bound of ``weight * xhat + bias`` given bounds on ``xhat``'s absmax and row norm."""
    g = weight.bound.absmax if isinstance(weight, Arg) else 1.0
    am, rn = fprod(xhat_abs, g), fprod(xhat_rn, g)
    if isinstance(bias, Arg):
        am, rn = am + bias.bound.absmax, rn + bias.bound.rownorm
    return Bound(am, rn)


@register(aten.layer_norm)
def _layer_norm(c: RuleCall) -> Bound:
    """A zero-mean row with unit RMS has ``||xhat|| <= sqrt(D)``, ``|xhat_i| <= sqrt(D - 1)``."""
    d = math.prod(c["normalized_shape"])
    if len(c["normalized_shape"]) != 1:
        return _affine(math.sqrt(max(d - 1, 1)), INF, c.get("weight"), c.get("bias"))
    return _affine(math.sqrt(max(d - 1, 1)), math.sqrt(d), c.get("weight"), c.get("bias"))


@register(aten.rms_norm)
def _rms_norm(c: RuleCall) -> Bound:
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


def _conv_l1(w: Tensor) -> Tensor:
    return w.detach().abs().flatten(1).sum(1).max()


def _abs_min(t: Tensor) -> Tensor:
    return t.detach().abs().min()


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


# ============================================================================ reductions / pools
def _dims(c: RuleCall, key: str, nd: int) -> list[int]:
    d = c.get(key)
    if d is None or (isinstance(d, (list, tuple)) and len(d) == 0):
        return list(range(nd))
    d = [d] if isinstance(d, int) else list(d)
    return sorted(x % nd for x in d)


@register(aten.mean, aten.amax, aten.amin, aten.max_pool2d, aten.max_pool1d, aten.avg_pool2d,
          aten.avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool1d)
def _averaging(c: RuleCall) -> Bound:
    """Means, maxima and pools stay within the inputs' max |x|."""
    return Bound(c["self"].bound.absmax)


@register(aten.sum)
def _sum(c: RuleCall) -> Bound:
    x = c["self"]
    nd = len(x.shape)
    dims = _dims(c, "dim", nd)
    n = math.prod(x.shape[i] for i in dims) if nd else 1
    am = fprod(x.bound.absmax, n)
    if dims == [nd - 1]:
        am = fmin(am, x.bound.rowsum)
    elif dims == [nd - 2]:
        am = fmin(am, x.bound.colsum)
    return Bound(am)


# ============================================================================ shape ops (exact)
def _same(c: RuleCall) -> Bound:
    return c[next(iter(c.args))].bound


register(aten.contiguous, aten.clone, aten.alias, aten.detach, aten.lift_fresh_copy, exact=True)(_same)


@register(aten._to_copy, aten.to)
def _to(c: RuleCall) -> Bound:
    return c[next(iter(c.args))].bound


def reshape_bound(b: Bound, s: tuple[int, ...], o: tuple[int, ...]) -> Bound:
    """Bound after a row-major reshape from shape ``s`` to ``o``."""
    s, o = tuple(s), tuple(o)
    if not s or not o:
        return Bound(b.absmax)
    if s[-1] == o[-1]:
        if len(s) >= 2 and len(o) >= 2 and s[-2] == o[-2]:
            return b
        return Bound(b.absmax, b.rownorm, INF, b.rowsum)
    for i in range(len(s)):  # trailing dims merged into the new last dim
        if math.prod(s[i:]) == o[-1] and o[-1] % s[-1] == 0:
            k = o[-1] // s[-1]
            return Bound(b.absmax, fprod(math.sqrt(k), b.rownorm), INF, fprod(k, b.rowsum))
    for j in range(len(o)):  # last dim split into new trailing dims
        if math.prod(o[j:]) == s[-1]:
            cn = b.rownorm if j <= len(o) - 2 else INF
            cs = b.rowsum if j <= len(o) - 2 else INF
            return Bound(b.absmax, b.rownorm, cn, b.rowsum, cs)
    if o[-1] == 1 and len(o) >= 2 and o[-2] == s[-1]:  # unsqueeze(-1): rows become columns
        return Bound(b.absmax, colnorm=b.rownorm, colsum=b.rowsum)
    return Bound(b.absmax)


@register(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.unsqueeze,
          aten.squeeze, aten.view_as, aten.reshape_as, exact=True)
def _reshape(c: RuleCall) -> Bound:
    x = c["self"]
    return reshape_bound(x.bound, x.shape, c.out_shape)


def permute_bound(b: Bound, perm: list[int]) -> Bound:
    nd = len(perm)
    if nd < 2:
        return b
    last, prev = perm[-1] % nd, perm[-2] % nd
    if last == nd - 1 and prev == nd - 2:
        return b
    if last == nd - 2 and prev == nd - 1:
        return b.transposed()
    if last == nd - 1:
        return Bound(b.absmax, b.rownorm, INF, b.rowsum)
    if prev == nd - 1:
        return Bound(b.absmax, colnorm=b.rownorm, colsum=b.rowsum)
    if last == nd - 2:
        return Bound(b.absmax, b.colnorm, INF, b.colsum)
    return Bound(b.absmax)


@register(aten.permute, exact=True)
def _permute(c: RuleCall) -> Bound:
    return permute_bound(c["self"].bound, list(c["dims"]))


@register(aten.transpose, aten.t, aten.swapaxes, exact=True)
def _transpose(c: RuleCall) -> Bound:
    x = c["self"]
    nd = len(x.shape)
    if nd < 2:
        return x.bound
    d0 = int(c.get("dim0", 0)) % nd
    d1 = int(c.get("dim1", 1)) % nd
    perm = list(range(nd))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return permute_bound(x.bound, perm)


@register(aten.expand, aten.expand_as, aten.broadcast_to, exact=True)
def _expand(c: RuleCall) -> Bound:
    return _bcast(c["self"], c.out_shape)


@register(aten.slice, aten.narrow, exact=True)
def _slice(c: RuleCall) -> Bound:
    """A sub-block: every norm (the spectral one too) can only shrink."""
    return c["self"].bound


@register(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, exact=True)
def _split(c: RuleCall):
    return tuple(c["self"].bound for _ in c.out_shapes)


def _drop_dim(b: Bound, nd: int, dim: int) -> Bound:
    dim %= nd
    if dim == nd - 1:
        return Bound(b.absmax, b.colnorm, INF, b.colsum)
    if dim == nd - 2:
        return Bound(b.absmax, b.rownorm, INF, b.rowsum)
    return b


@register(aten.select, exact=True)
def _select(c: RuleCall) -> Bound:
    x = c["self"]
    return _drop_dim(x.bound, len(x.shape), int(c["dim"]))


@register(aten.unbind, exact=True)
def _unbind(c: RuleCall):
    x = c["self"]
    b = _drop_dim(x.bound, len(x.shape), int(c.get("dim", 0)))
    return tuple(b for _ in c.out_shapes)


@register(aten.cat, aten.concat, aten.concatenate, exact=True)
def _cat(c: RuleCall) -> Bound:
    xs = [x for x in c["tensors"] if isinstance(x, Arg) and math.prod(x.shape) > 0]
    if not xs:
        return Bound.zero()
    nd = len(c.out_shape)
    dim = int(c.get("dim", 0)) % nd
    bs = [x.bound for x in xs]

    def mx(f):
        return _fmax([getattr(b, f) for b in bs])

    def l2(f):
        return fsqrt(sum(fprod(getattr(b, f), getattr(b, f)) for b in bs))

    def l1(f):
        return sum(getattr(b, f) for b in bs)

    if dim == nd - 1:
        return Bound(mx("absmax"), l2("rownorm"), mx("colnorm"), l1("rowsum"), mx("colsum"))
    if dim == nd - 2:
        return Bound(mx("absmax"), mx("rownorm"), l2("colnorm"), mx("rowsum"), l1("colsum"))
    return Bound(mx("absmax"), mx("rownorm"), mx("colnorm"), mx("rowsum"), mx("colsum"), mx("spectral"))


def _fmax(xs):
    if any(isinstance(x, Tensor) for x in xs):
        t = next(x for x in xs if isinstance(x, Tensor))
        out = None
        for x in xs:
            x = x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=t.dtype, device=t.device)
            out = x if out is None else torch.maximum(out, x)
        return out
    return max(float(x) for x in xs)


@register(aten.where)
def _where(c: RuleCall) -> Bound:
    a, b = _bcast(c["self"], c.out_shape), _bcast(c["other"], c.out_shape)
    return Bound(
        _fmax([a.absmax, b.absmax]),
        fsqrt(fprod(a.rownorm, a.rownorm) + fprod(b.rownorm, b.rownorm)),
        fsqrt(fprod(a.colnorm, a.colnorm) + fprod(b.colnorm, b.colnorm)),
        a.rowsum + b.rowsum,
        a.colsum + b.colsum,
    )


@register(aten.masked_fill)
def _masked_fill(c: RuleCall) -> Bound:
    v = c["value"]
    vb = v.bound.absmax if isinstance(v, Arg) else abs(float(v))
    return Bound(_fmax([c["self"].bound.absmax, vb]))


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

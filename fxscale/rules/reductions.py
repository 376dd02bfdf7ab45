"""Reduction rules of the rule table: means, maxima and pools, sums and prefix sums, vector norms,
and ``x / ||x||`` (the normalisations are in :mod:`fxscale.rules.normalisation`).

A reduction's bound grows with the size of the dims it reduces over (``passes/sizes.py`` lists
which ops do, so that a dynamic dim is bounded at its declared maximum). Imported by
:mod:`fxscale.rules`, which registers them; not imported directly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..bound import Bound, fmin, fprod
from .registry import Arg, RuleCall, Unbounded, register

aten = torch.ops.aten

def _dims(c: RuleCall, key: str, nd: int) -> list[int]:
    d = c.get(key)
    if d is None or (isinstance(d, (list, tuple)) and len(d) == 0):
        return list(range(nd))
    d = [d] if isinstance(d, int) else list(d)
    return sorted(x % nd for x in d)


@register(aten.mean, aten.amax, aten.amin, aten.max_pool2d, aten.max_pool1d, aten.avg_pool2d,
          aten.avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool1d)
def _averaging(c: RuleCall) -> Bound:
    """Means, maxima and pools stay within the inputs' max |x|; ``avg_pool2d`` with a
    ``divisor_override`` d is a window sum over d: ``max|x| * kernel size / d``."""
    am = c["self"].bound.absmax
    d = c.get("divisor_override") if c.op is aten.avg_pool2d.default else None
    if d is not None:
        ks = c["kernel_size"]
        ks = [int(ks)] * 2 if isinstance(ks, int) else [int(k) for k in ks] * (2 if len(ks) == 1 else 1)
        return Bound(fprod(am, math.prod(ks) / abs(float(d))))
    return Bound(am)


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


@register(aten.cumsum)
def _cumsum(c: RuleCall) -> Bound:
    """A prefix sum along ``dim`` is bounded by the whole sum of |x| there: the row sum
    (``dim`` last), the column sum (``dim`` second to last), or n max |x|."""
    x = c["self"]
    nd = len(x.shape)
    if nd == 0:
        return x.bound
    dim = int(c["dim"]) % nd
    am = fprod(x.bound.absmax, x.shape[dim])
    if dim == nd - 1:
        am = fmin(am, x.bound.rowsum)
    elif dim == nd - 2:
        am = fmin(am, x.bound.colsum)
    return Bound(am)


@register(aten.linalg_vector_norm, aten.norm.ScalarOpt_dim, aten.norm.Scalar)
def _vector_norm(c: RuleCall) -> Bound | None:
    """``||x||_p`` over ``dim`` (all dims if none), for ``p`` in 1, 2, inf: at most ``n^(1/p) max|x|``
    for ``n`` elements reduced, and the row norm / row sum where the reduction is the last dim.
    ``(n + 2) 2^-24`` relative covers the float32 accumulation of ``n`` non-negative terms (bf16
    and fp16 inputs accumulate in float32 too); an overflowing sum of squares gives Inf, which is
    the nonfinite policy's business. Other ``p``: no rule."""
    x = c["self"]
    p = c.get("ord" if "ord" in c.args else "p", 2)
    if isinstance(p, Arg):
        return None
    p = float(p)
    nd = len(x.shape)
    dims = _dims(c, "dim", nd)
    n = math.prod(x.shape[i] for i in dims) if nd else 1
    last = nd >= 1 and dims == [nd - 1]
    b = x.bound
    if p == math.inf:
        am = b.absmax
    elif p == 1:
        am = fprod(b.absmax, n)
        am = fmin(am, b.rowsum) if last else am
    elif p == 2:
        am = fprod(b.absmax, math.sqrt(n) * (1 + 2.0**-50))
        am = fmin(am, b.rownorm) if last else am
    else:
        return None
    return Bound(fprod(am, 1 + (n + 2) * 2.0**-24))


class _L2Normalised:
    """``x / ||x||_2`` along the last dim, what ``x / x.norm(dim=-1, keepdim=True)`` computes (CLIP's
    embeddings; ``F.normalize`` with the norm clamped below by ``eps``). The bounds pass
    (``passes/bounds.py``, ``_l2_normalise_idiom``) gives that idiom's division this op, so that
    the division has a rule; the graph is not changed and this op is never put in one."""

    _schema = torch._C.parse_schema("fxscale::l2_normalised(Tensor x) -> Tensor")

    def __call__(self, x: Tensor) -> Tensor:
        return x / torch.linalg.vector_norm(x, 2, -1, keepdim=True)

    def __repr__(self) -> str:
        return "fxscale.l2_normalised"

    def __reduce__(self) -> str:
        return "L2_NORMALISED"  # (pickled by name: the one instance, found in this module)


L2_NORMALISED = _L2Normalised()

#: Rounding of the norm and of the quotient: a float32 sqrt, the norm rounded to bf16 (or fp16)
#: when ``x`` is, and the quotient's rounding: ``(1 + 2^-8) / ((1 - 2^-8) (1 - 2^-24))`` ~ 1.0079
#: for bf16, less for float32; ``2^-6`` covers it with room for a fused or reciprocal division.
_L2_ROUNDING = 1 + 2.0**-6


@register(L2_NORMALISED)
def _l2_normalised(c: RuleCall) -> Bound:
    """``y = x / N`` with ``N`` the kernel's ``||x||_2`` over the last dim (``D`` elements).

    Exactly, ``|y_i| <= 1`` and ``||y|| = 1``. The kernel computes ``N = sqrt(S')``, ``S'`` the
    float32 sum of the float32 squares ``q_j = fl(x_j^2)`` (bf16 / fp16 inputs too: tested), and
    ``S'`` can come out below the true ``S = sum x_j^2``:

    * Every partial sum of non-negative floats rounds to at least each of its terms, so
      ``S' >= q_i`` in any summation order. A normal square has ``q_i >= x_i^2 (1 - 2^-24)``, so
      ``|y_i| <= 1`` up to rounding. A square below float32's smallest normal (``|x_i| < 2^-63``)
      is rounded to a multiple of ``2^-149``: ``q_i >= x_i^2 - 2^-150``. Then either ``S' = 0``
      (``y_i = x_i / 0``: Inf, or NaN for a zero row: non-finite, the nonfinite policy's business,
      as the float model's 0/0 is), or ``S' >= 2^-149`` and ``x_i^2 <= q_i + 2^-150 <= 1.5 S'``:
      ``|y_i| <= sqrt(1.5)``, reached (1.22) by ``x = [1.2247 * 2^-75, 0, ...]``. So
      ``max|y| <= sqrt(1.5) * (1 + 2^-6)``; with power-of-two scales (the default) it picks the
      same scale as a bound of 1.
    * Row norms: ``S <= S' / (1 - 2^-24)^D + D 2^-150`` (normal squares round by ``2^-24``
      relative, sums by ``2^-24`` each, subnormal squares by ``2^-150`` absolute), so
      ``||y||^2 <= (1 + (D + 2) 2^-24 + D 2^-150 / S') * rounding``. For rows with ``S' >=
      2^-126`` (``||x|| >~ 2^-63``: every row of a real model) that is ``1 + (2D + 2) 2^-24``;
      for a row of float32 dust (``S'`` near ``2^-149``) it is up to ``1 + D / 2``, reached by one
      entry whose square rounds up and ``D - 1`` whose squares round to 0 (``1 + D`` where the
      kernel flushes subnormals to zero: then ``S' >= 2^-126`` and each lost square is below
      ``2^-126``). The bound is the latter: ``sqrt(1 + D + (D + 2) 2^-24) * (1 + 2^-6)``: sound for
      every row, but ``sqrt(D)`` above the ``~1`` that every row with ``||x|| >= 2^-62`` meets.

    ``D`` is the last dim (its declared maximum where it is symbolic: the bound grows with D).
    """
    d = c.out_shape[-1] if c.out_shape else 1
    am = math.sqrt(1.5) * _L2_ROUNDING
    rn = math.sqrt(1 + d + (d + 2) * 2.0**-24) * _L2_ROUNDING
    return Bound(am, fmin(rn, math.sqrt(d) * am))


@register(aten.einsum)
def _einsum(c: RuleCall) -> Bound:
    """``|out| <= prod_i max|x_i| * K``, ``K`` the product of the sizes of the summed indices (those
    not in the output): every output element is a sum of K products, one factor per operand.
    (Computed in high precision: no float8 kernel for einsum; the bound spares its consumers a
    run-time amax.)"""
    eq = str(c["equation"]).replace(" ", "")
    ops = list(c["tensors"])
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ops) or any(not isinstance(a, Arg) for a in ops):
        raise Unbounded("an einsum operand without a bound")
    sizes: dict[str, int] = {}
    for term, a in zip(terms, ops):
        if "..." in term:  # the ellipsis stands for the dims the named letters leave
            head, _, tail = term.partition("...")
            shape = list(a.shape[:len(head)]) + list(a.shape[len(a.shape) - len(tail):] if tail else [])
            term = head + tail
        else:
            shape = list(a.shape)
        sizes.update({ch: int(n) for ch, n in zip(term, shape)})
    letters = "".join(t.replace("...", "") for t in terms)
    kept = set(out) if "->" in eq else {ch for ch in letters if letters.count(ch) == 1}
    k = math.prod(n for ch, n in sizes.items() if ch not in kept)
    return Bound(fprod(*(a.bound.absmax for a in ops), k))

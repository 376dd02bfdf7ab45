"""Shape rules of the rule table: ops that move values without arithmetic (exact, no margin).

Kept apart from the numeric policy, as in jax-scalify. Imported by :mod:`fxscale.rules`.
"""

from __future__ import annotations

import math

import torch

from ..bound import INF, Bound, fmax, fprod, fsqrt
from .helpers import bcast
from .registry import Arg, RuleCall, register

aten = torch.ops.aten

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
    d0 = int(c.get("dim0", c.get("axis0", 0))) % nd  # (swapaxes names them axis0 / axis1)
    d1 = int(c.get("dim1", c.get("axis1", 1))) % nd
    perm = list(range(nd))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return permute_bound(x.bound, perm)


@register(aten.expand, aten.expand_as, aten.broadcast_to, exact=True)
def _expand(c: RuleCall) -> Bound:
    return bcast(c["self"], c.out_shape)


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
    return cat_bound([x.bound for x in xs], nd, int(c.get("dim", 0)) % nd)


def cat_bound(bs: list[Bound], nd: int, dim: int) -> Bound:
    """Bound of the concatenation along ``dim`` (of ``nd``) of tensors bounded by ``bs``."""
    def mx(f):
        return fmax(*[getattr(b, f) for b in bs])

    def l2(f):
        return fsqrt(sum(fprod(getattr(b, f), getattr(b, f)) for b in bs))

    def l1(f):
        return sum(getattr(b, f) for b in bs)

    if dim == nd - 1:
        return Bound(mx("absmax"), l2("rownorm"), mx("colnorm"), l1("rowsum"), mx("colsum"))
    if dim == nd - 2:
        return Bound(mx("absmax"), mx("rownorm"), l2("colnorm"), mx("rowsum"), l1("colsum"))
    return Bound(mx("absmax"), mx("rownorm"), mx("colnorm"), mx("rowsum"), mx("colsum"), mx("spectral"))


@register(aten.stack, exact=True)
def _stack(c: RuleCall) -> Bound:
    """``stack`` is each tensor unsqueezed at ``dim``, then concatenated there (GPT-J's and
    Cohere's rotary ``rotate_every_two``: ``stack((-x2, x1), -1)``)."""
    xs = [x for x in c["tensors"] if isinstance(x, Arg) and math.prod(x.shape) > 0]
    if not xs:
        return Bound.zero()
    nd = len(c.out_shape)
    dim = int(c.get("dim", 0)) % nd
    bs = [reshape_bound(x.bound, x.shape, tuple(x.shape[:dim]) + (1,) + tuple(x.shape[dim:])) for x in xs]
    return cat_bound(bs, nd, dim)


register(aten.type_as)(_to)  # x.type_as(y): x cast to y's dtype


@register(aten.pad, aten.constant_pad_nd, exact=True)
def _pad(c: RuleCall) -> Bound:
    """Constant padding adds entries equal to ``value`` (0 by default): with 0, every norm of
    every row and column, and the spectral norm, stay; other values and modes (reflect,
    replicate, circular: copies of entries) keep max |x| only."""
    b = c["self"].bound
    mode = c.get("mode", "constant")
    value = abs(float(c.get("value", 0.0) or 0.0))
    if mode == "constant" and value == 0.0:
        return b
    return Bound(fmax(b.absmax, value) if mode == "constant" else b.absmax)

@register(aten.slice_scatter, aten.select_scatter, aten.index_put, exact=True)
def _scatter(c: RuleCall) -> Bound | None:
    """``self`` with some elements replaced by ``src`` / ``values``: within either's max |x|."""
    if c.get("accumulate", False):
        return None  # index_put(..., accumulate=True) adds into self
    src = c.get("src", c.get("values"))
    return Bound(fmax(c["self"].bound.absmax, src.bound.absmax if isinstance(src, Arg) else INF))


@register(aten.fill, exact=True)
def _fill(c: RuleCall) -> Bound:
    v = c["value"]
    return Bound(v.bound.absmax if isinstance(v, Arg) else abs(float(v)))


@register(aten.repeat_interleave, exact=True)
def _repeat_interleave(c: RuleCall) -> Bound | None:
    """Each element repeated ``repeats`` times along ``dim`` (all of it flattened without one):
    a row repeated along the last dim has its norm times ``sqrt(repeats)`` and its sum times
    ``repeats``; along another dim, rows are rows of the input. GPT-J's rotary sin / cos."""
    if "self" not in c.args:  # repeat_interleave(repeats): indices, not values
        return None
    x, r, dim = c["self"], c.get("repeats"), c.get("dim")
    b, nd = x.bound, len(x.shape)
    if dim is None or nd == 0:
        return Bound(b.absmax)
    if int(dim) % nd != nd - 1:
        return Bound(b.absmax, b.rownorm, INF, b.rowsum)
    if not isinstance(r, int):  # a tensor of counts: each row's norm is not bounded by a constant
        return Bound(b.absmax)
    return Bound(b.absmax, fprod(b.rownorm, fsqrt(float(r))), INF, fprod(b.rowsum, float(r)))


@register(aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten._upsample_nearest_exact1d,
          aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d, exact=True)
def _upsample_nearest(c: RuleCall) -> Bound:
    """Nearest-neighbour upsampling copies input elements: max |x| stays (rows repeat elements:
    their norms do not)."""
    return Bound((c["input"] if "input" in c.args else c["self"]).bound.absmax)


@register(aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_trilinear3d,
          aten._upsample_bilinear2d_aa)
def _upsample_linear(c: RuleCall) -> Bound:
    """(Bi/tri)linear upsampling, antialiased too: each output is a convex mix of inputs (weights
    >= 0 summing to 1), so max |x| stays, up to the arithmetic's rounding (the registry's margin).
    Bicubic's weights go negative (it overshoots): no rule."""
    return Bound((c["input"] if "input" in c.args else c["self"]).bound.absmax)


@register(aten.index_select, exact=True)
def _index_select(c: RuleCall) -> Bound:
    """Entries selected along ``dim``: max |x| stays; off the last dim each output row is an
    input row, so the row norms and sums stay too."""
    b, nd = c["self"].bound, len(c["self"].shape)
    if nd and int(c["dim"]) % nd != nd - 1:
        return Bound(b.absmax, b.rownorm, INF, b.rowsum)
    return Bound(b.absmax)


@register(aten.gather, aten.take_along_dim, aten.repeat, exact=True)
def _gathered(c: RuleCall) -> Bound:
    """Entries moved (``gather``, ``take_along_dim``) or copied (``repeat``): max |x| stays."""
    return Bound(c["self"].bound.absmax)

"""Helpers shared by the rule modules (:mod:`.numeric`, :mod:`.shape`): broadcasting,
matmul bounds, constants' norms computed once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ..bound import INF, Bound, fmin, fprod
from .registry import Arg

__all__ = ["add_bias", "as_matrix_lhs", "as_matrix_rhs", "bcast", "const_float", "matmul_bound"]


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
    # Version counters too: an in-place update (``load_state_dict`` copies into the same
    # tensors) must not reuse values computed from the old data (issue 11 case 9).
    versions = tuple(_version(t) for t in tensors)
    entries = _CONST_CACHE.setdefault(tensors[0], [])
    for k, others, ver, v in entries:
        if (k == ident and ver == versions and len(others) == len(tensors) - 1
                and all(a is b for a, b in zip(others, tensors[1:]))):
            return v
    v = float(fn(*tensors))
    entries[:] = [e for e in entries if e[0] != ident or e[2] == versions]  # drop stale values
    entries.append((ident, tensors[1:], versions, v))
    return v


def _version(t: Any) -> int:
    return t._version if isinstance(t, Tensor) else 0


def bcast(a: Any, out_shape: tuple[int, ...]) -> Bound:
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


def as_matrix_rhs(b: Arg) -> Bound:
    """Bound of a matmul right operand, treating a 1-D vector as a (K, 1) column."""
    if len(b.shape) == 1:
        v = b.bound
        return Bound(v.absmax, v.absmax, v.rownorm, v.absmax, v.rowsum, v.rownorm)
    return b.bound


def as_matrix_lhs(a: Arg) -> Bound:
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


def add_bias(out: Bound, bias: Any, out_shape, scale: float = 1.0) -> Bound:
    if bias is None:
        return out
    return out.plus(bcast(bias, out_shape).scaled(scale))

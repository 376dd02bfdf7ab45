"""Rules for the ops of a per-rank tensor-parallel graph: collectives and attention kernels.

A tensor-parallel model captured per rank (``passes.distributed``) holds
``_c10d_functional`` ops: ``all_reduce`` after a row-parallel matmul, ``all_gather_into_tensor``
and ``reduce_scatter_tensor`` around sequence-parallel regions, ``wait_tensor`` after each.
Their rules bound the result from *this rank's* input bound, which is sound because the
transform first makes every rank's bounds agree (``passes.distributed``): each rank's
bound of a value is then one number valid for every rank's local value, so

* a sum over ``R`` ranks is bounded by the sum of the ranks' bounds, ``R`` times the bound,
  for every norm (triangle inequality); a mean by the bound itself;
* a gather (concatenation along dim 0) keeps max |x|; rows stay whole, while columns and
  the spectral norm of a stacked 2-D matrix grow by ``sqrt(R)`` (``R`` for column sums).

Tracing through DTensor's dispatch also decomposes ``scaled_dot_product_attention`` into the
kernel it picks (``_scaled_dot_product_flash_attention_for_cpu``, ``..._flash_attention``,
``..._efficient_attention``, ``..._cudnn_attention``): their first output is, like SDPA's, a
convex mix of V's rows; the other outputs (log-sum-exp, seeds) get no bound.

A bound that depends on a run-time measurement (a 0-d tensor) is *not* agreed: the
measurement may be of a sharded value, which differs across ranks, and agreeing on it would
take a collective on every call. Such a collective's result is left unbounded, so its
consumers measure it (a replicated value: the same amax on every rank, no collective).

>>> import torch
>>> from fxscale.rules import Arg, Bound, evaluate
>>> op = torch.ops._c10d_functional.reduce_scatter_tensor.default
>>> x = Arg(Bound(2.0).tighten((8, 4)), (8, 4))
>>> evaluate(op, (x, "sum", 2, "0"), {}, [(4, 4)])[0].absmax   # 2 ranks: 2 * 2, plus the margin
4.03125
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..bound import INF, Bound
from .registry import RuleCall, register

c10d = torch.ops._c10d_functional

__all__ = ["COLLECTIVES", "group_size"]

#: The collectives these rules cover (``wait_tensor`` is their completion, not a collective).
COLLECTIVES = (c10d.all_reduce.default, c10d.all_gather_into_tensor.default, c10d.reduce_scatter_tensor.default)


def group_size(group_name: str) -> int:
    """Number of ranks in the process group named ``group_name`` (as the graph spells it)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name).size()


def _runtime(b: Bound) -> bool:
    return any(isinstance(getattr(b, f), Tensor) for f in b.__dataclass_fields__)


def _reduced(b: Bound, op: str, n: int) -> Bound:
    """Bound of the reduction ``op`` over ``n`` ranks whose values each satisfy ``b``."""
    if _runtime(b):
        return Bound.unknown()
    op = op.lower()
    if op == "sum":
        return b.scaled(float(n))
    if op == "avg":
        return b
    if op in ("max", "min"):
        # |max_r x_r| <= max_r |x_r| <= sum_r |x_r| elementwise: norms grow at most n-fold;
        # the spectral norm is not monotone in |x|, so it is left to the other norms.
        return Bound(b.absmax, b.rownorm * n, b.colnorm * n, b.rowsum * n, b.colsum * n, INF)
    return Bound.unknown()  # product, bitwise ops: no useful bound


@register(c10d.wait_tensor, exact=True)
def _wait(c: RuleCall) -> Bound:
    return c["tensor"].bound


@register(c10d.all_reduce)
def _all_reduce(c: RuleCall) -> Bound:
    return _reduced(c["input"].bound, c["reduce_op"], group_size(c["group_name"]))


@register(c10d.reduce_scatter_tensor)
def _reduce_scatter(c: RuleCall) -> Bound:
    # The result is a slice (along dim 0) of the reduction: a sub-tensor's norms are at most
    # the whole's, row by row and column by column.
    return _reduced(c["input"].bound, c["reduce_op"], int(c["group_size"]))


@register(c10d.all_gather_into_tensor, exact=True)
def _all_gather(c: RuleCall) -> Bound:
    x = c["input"]
    b, n = x.bound, int(c["group_size"])
    if _runtime(b):
        return Bound.unknown()
    nd = len(x.shape)
    if nd >= 3:  # dim 0 is a batch of whole trailing matrices
        return b
    if nd == 2:  # rows stacked: each row whole, each column n pieces
        r = math.sqrt(n) * (1 + 1e-12)  # (float rounding of the square root, upwards)
        return Bound(b.absmax, b.rownorm, b.colnorm * r, b.rowsum, b.colsum * n, b.spectral * r)
    return Bound(b.absmax, b.rownorm * math.sqrt(n) * (1 + 1e-12), INF, b.rowsum * n)  # a vector: one long row


_ATTENTION_KERNELS = (
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
    torch.ops.aten._scaled_dot_product_flash_attention,
    torch.ops.aten._scaled_dot_product_efficient_attention,
    torch.ops.aten._scaled_dot_product_cudnn_attention,
)


@register(*_ATTENTION_KERNELS)
def _attention_kernel(c: RuleCall) -> list:
    """Output 0: each row a convex combination of V's rows (softmax weights sum to 1)."""
    v = c["value"].bound
    out = Bound(v.absmax, v.rownorm, INF, v.rowsum)
    p = float(c.get("dropout_p", 0.0))
    if p > 0:  # kept weights are scaled by 1/(1-p): rows are no longer convex mixes
        out = Bound.zero() if p >= 1 else out.scaled(1.0 / (1.0 - p))
    return [out] + [None] * (len(c.out_shapes) - 1)

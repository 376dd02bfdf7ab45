"""Two-pass LayerNorm: ``aten.layer_norm`` becomes ``fxscale.layer_norm``, whose bound is proven.

PyTorch's kernels compute the variance by Welford's method; on rows within a few ulps of a
large constant it cancels to ~0 and ``(x - mean) / sqrt(eps)`` comes out far above the exact
``sqrt(D - 1)`` (issue 11 case 3), so the rule for ``aten.layer_norm`` must add a rounding term
that grows with the input's bound and ``1 / sqrt(eps)`` (BERT's eps = 1e-12 costs int8 bits).
``torch.ops.fxscale.layer_norm`` squares the same ``d = x - mean`` it scales, so its output is
bounded by ``sqrt(D)`` up to a relative ``(D + 16) u``, whatever the input (see its rule in
:mod:`fxscale.rules.numeric`). The outputs agree with PyTorch's to float32 rounding.

>>> import torch
>>> from passes.capture import capture
>>> gm = capture(torch.nn.LayerNorm(8), (torch.randn(2, 8),))
>>> two_pass_layer_norm(gm)
1
>>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
['fxscale.layer_norm.default']
"""

from __future__ import annotations

import torch
from torch import fx

import fxscale.ops  # noqa: F401  (registers torch.ops.fxscale.layer_norm)

__all__ = ["two_pass_layer_norm"]


def two_pass_layer_norm(gm: fx.GraphModule) -> int:
    """Retarget every ``aten.layer_norm.default`` node of ``gm``; returns how many."""
    count = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.layer_norm.default:
            a = list(n.args) + [None] * (5 - len(n.args))
            x, shape, w, b = a[0], a[1], n.kwargs.get("weight", a[2]), n.kwargs.get("bias", a[3])
            eps = n.kwargs.get("eps", a[4] if a[4] is not None else 1e-5)
            n.target = torch.ops.fxscale.layer_norm.default
            n.args, n.kwargs = (x, list(shape), w, b, float(eps)), {}
            count += 1
    if count:
        gm.recompile()
    return count

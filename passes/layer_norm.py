"""Two-pass LayerNorm: ``aten.layer_norm`` becomes ``fxscale.layer_norm``, whose bound is proven.

PyTorch's kernels compute the variance by Welford's method; on rows within a few ulps of a
large constant it cancels to ~0 and ``(x - mean) / sqrt(eps)`` comes out far above the exact
``sqrt(D - 1)`` (issue 11 case 3), so the rule for ``aten.layer_norm`` must add a rounding term
that grows with the input's bound and ``1 / sqrt(eps)`` (BERT's eps = 1e-12 costs int8 bits).
``torch.ops.fxscale.layer_norm`` squares the same ``d = x - mean`` it scales, so its output is
bounded by ``sqrt(D)`` up to a relative ``(D + 16) u``, whatever the input (see its rule in
:mod:`fxscale.rules.normalisation`). The outputs agree with PyTorch's to float32 rounding.

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

__all__ = ["group_norm_as_layer_norm", "two_pass_layer_norm"]


def group_norm_as_layer_norm(gm: fx.GraphModule) -> int:
    """``aten.group_norm(x, G, w, b, eps)`` on ``x`` (N, C, *S) -> ``x.reshape(-1, G, C // G * prod(S))``,
    a LayerNorm without affine over the last dim, ``.view(x.shape)``, ``* w[c] + b[c]``: the same
    function, through the two-pass LayerNorm's proven bound (GroupNorm has no rule of its own).
    Left as it is where a dimension after the batch is symbolic. Returns how many.

    >>> from passes.capture import capture
    >>> gm = capture(torch.nn.GroupNorm(2, 8), (torch.randn(3, 8, 5),))
    >>> group_norm_as_layer_norm(gm)
    1
    >>> [str(n.target).split(".")[1] for n in gm.graph.nodes if n.op == "call_function"]
    ['reshape', 'layer_norm', 'view', 'view', 'mul', 'view', 'add']
    """
    aten = torch.ops.aten
    count = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target is not aten.group_norm.default:
            continue
        a = list(n.args) + [None] * (6 - len(n.args))
        x, groups = a[0], int(a[1])
        w, b = n.kwargs.get("weight", a[2]), n.kwargs.get("bias", a[3])
        eps = float(n.kwargs.get("eps", a[4] if a[4] is not None else 1e-5))
        xv, out = x.meta.get("val"), n.meta.get("val")
        if xv is None or out is None or not all(isinstance(d, int) for d in xv.shape[1:]):
            continue
        c, rest = xv.shape[1], list(xv.shape[2:])
        per = c // groups
        for d in rest:
            per *= d
        ones = [1] * len(rest)
        g = gm.graph
        with g.inserting_before(n):
            # reshape, not view: a channels_last or transposed input is not contiguous (a VAE's
            # attention output: "view size is not compatible with input tensor's size and stride")
            y = g.call_function(aten.reshape.default, (x, [-1, groups, per]))
            y.meta["val"] = xv.reshape(-1, groups, per)
            ln = g.call_function(aten.layer_norm.default, (y, [per], None, None, eps))
            ln.meta["val"] = aten.layer_norm.default(y.meta["val"], [per], None, None, eps)
            z = g.call_function(aten.view.default, (ln, [-1, c, *rest]))
            z.meta["val"] = out
            for op, p in ((aten.mul.Tensor, w), (aten.add.Tensor, b)):  # the affine, per channel
                if p is None:
                    continue
                pv = g.call_function(aten.view.default, (p, [c, *ones]))
                pv.meta["val"] = p.meta["val"].reshape(c, *ones) if p.meta.get("val") is not None else None
                z = g.call_function(op, (z, pv))
                z.meta["val"] = out
        for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if k in n.meta:
                for m in (y, ln, z):
                    m.meta.setdefault(k, n.meta[k])
        n.replace_all_uses_with(z)
        g.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


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

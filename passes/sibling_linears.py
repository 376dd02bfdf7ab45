"""Sibling linears -> one GEMM: ``scaled_linear`` calls that read the same quantised input.

The q, k and v projections of an attention (and the gate and up projections of a gated MLP)
multiply one quantised activation by three weights. Three GEMMs read that activation three
times and, at decode sizes (M = 1..64 rows), each pays a kernel launch and a tail for a few MB of
weight: on an H200 the k and v GEMMs of a Llama-3-8B layer (4 MB each) take 7-10 us, of which
~1 us is reading the weight. This pass concatenates the weights along N and computes one
GEMM; each original node becomes a slice of its result, keeping its name, record and users.

The weights keep their values exactly: the common scale is the largest of the members' (all
powers of two), and a member is fused only if every one of its float8 values is representable
at that scale (``w * s_i / s`` loses no bit: no value falls below the format's subnormals);
else it stays a GEMM of its own, and its record says why.

>>> import torch, fxscale
>>> class QKV(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.q, self.k, self.v = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))
...     def forward(self, x):
...         return self.q(x) + self.k(x) * self.v(x)
>>> sm = fxscale.transform(QKV(), (torch.randn(4, 64),))
>>> sum(n.target is torch.ops.fxscale.scaled_linear.default for n in sm.graph.nodes)
1
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections import defaultdict
from typing import Any

import torch
from torch import fx

from fxscale.bound import Bound
from fxscale.nodeinfo import info

from .fusions import LinearCall

__all__ = ["fuse_sibling_linears"]

aten = torch.ops.aten


def _const(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return operator.attrgetter(node.target)(gm)
    return None


def _key(gm: fx.GraphModule, n: fx.Node) -> tuple | None:
    """What siblings share (same input data and scale, epilogue, output dtype), or None where
    the call cannot join a group: a quantised output, a residual, or a non-constant weight."""
    call = LinearCall.of(n)
    if any(u.op == "output" for u in n.users):  # a slice would be a non-contiguous model output
        return None
    if call is None or call.out_fmt is not None or call.out_scale is not None or call.residual is not None:
        return None
    w, ws = _const(gm, call.w), _const(gm, call.w_scale)
    if w is None or ws is None or ws.dim() != 0 or w.dim() != 2 or info(call.w).bound is None:
        return None
    if call.bias is not None and _const(gm, call.bias) is None:
        return None
    return (call.x, call.x_scale, call.bias is None, call.activation, call.out_dtype, w.dtype, w.shape[1])


def _rescaled(w: torch.Tensor, s_i: float, s: float) -> torch.Tensor | None:
    """``w`` (float8 data at scale ``s_i``) as data at scale ``s``, or None if a bit is lost."""
    if s_i == s:
        return w
    ratio = s_i / s
    v = w.to(torch.float32)
    out = (v * ratio).to(w.dtype)
    return out if torch.equal(out.to(torch.float32), v * ratio) else None


def fuse_sibling_linears(lw: Any) -> None:
    """Rewrite each group of sibling ``scaled_linear`` calls of ``lw.gm`` (see module doc)."""
    gm, g = lw.gm, lw.g
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for n in g.nodes:
        k = _key(gm, n)
        if k is not None:
            groups[k].append(n)
    for members in groups.values():
        if len(members) > 1:
            _fuse(lw, members)


def _fuse(lw: Any, members: list[fx.Node]) -> None:
    gm, g = lw.gm, lw.g
    calls = [LinearCall.of(n) for n in members]
    scales = [float(_const(gm, c.w_scale)) for c in calls]
    s = max(scales)
    datas, kept = [], []
    for n, c, s_i in zip(members, calls, scales):
        w = _rescaled(_const(gm, c.w), s_i, s)
        if w is None:
            info(n).reasons.append(f"not fused with its sibling linears: its weight loses bits at their scale {s:g}")
            continue
        datas.append(w)
        kept.append((n, c))
    if len(kept) < 2:
        return
    first = kept[0][0]
    wcat = torch.cat(datas, 0).contiguous()
    names = ", ".join(n.name for n, _ in kept)
    name = f"{kept[0][1].w.target.removesuffix('_' + lw.fmt.name)}_and_{len(kept) - 1}_siblings"
    wb = [info(c.w).bound for _, c in kept]  # rows are the members' rows: their largest bounds
    wnode, snode = lw.weight_buffers(name, wcat, s, Bound(max(b.absmax for b in wb), max(b.rownorm for b in wb)),
                                     f"the weights of {names}, concatenated (one GEMM)")
    bnode = None
    if kept[0][1].bias is not None:
        bcat = torch.cat([_const(gm, c.bias) for _, c in kept], 0).contiguous()
        bnode = lw._buffer(f"{name}_bias", bcat, lw._first())
    with g.inserting_before(first):
        call = dataclasses.replace(kept[0][1], w=wnode, w_scale=snode, bias=bnode)
        fused = g.create_node("call_function", first.target, call.args(), name=f"{first.name}_fused{len(kept)}")
    vals = [n.meta.get("val") for n, _ in kept]
    if all(isinstance(v, torch.Tensor) for v in vals):
        fused.meta["val"] = torch.cat(vals, -1)
    rec = info(fused)
    rec.kind = "plumbing"
    bounds = [info(n).bound for n, _ in kept]
    if all(b is not None for b in bounds):
        rec.bound = Bound(max(b.absmax for b in bounds), math.sqrt(sum(float(b.rownorm) ** 2 for b in bounds)))
    rec.reasons.append(f"one GEMM for the sibling linears {names} (same quantised input)")
    start = 0
    for (n, _), w in zip(kept, datas):
        end = start + w.shape[0]
        n.target, n.args, n.kwargs = aten.slice.Tensor, (fused, -1, start, end), {}
        info(n).reasons.append(f"computed by {fused.name} (columns {start}:{end})")
        start = end

"""Codegen: rewrite the analysed ATen graph into ``torch.ops.fxscale.*`` calls.

Each matmul-like node becomes a scaled op on (data, scale) pairs:

* weights, quantised once by the bounds pass, become buffers (``(N, K)`` row-major data + a
  0-d scale);
* each activation operand is quantised with a scale that is a constant buffer (its bound is
  proven statically), the output of a :class:`ScaleFn` (its bound depends on run-time
  measurements: the same rules, evaluated on 0-d tensors), or its own run-time amax (it is
  measured: a requantise point, an input without a declared bound, or a value after an op
  without a rule);
* then fusion (:mod:`passes.fusions`: (pattern, replacement) pairs matched by argument name):
  a linear whose (activation of its) output only feeds quantise nodes writes the
  low-precision data itself (``scaled_linear(..., out_scale, out_fmt)``), a requantise
  point produced by a linear becomes ``scaled_linear_requantise`` (amax in the epilogue), and
  on request (``fuse_residual``) a residual add of a linear's high-precision output
  (``x + proj(a)``) moves into the linear (``scaled_linear(..., residual=x)``).

Matmul-like nodes are rewritten in place: each keeps its name, meta (shapes, source) and
record, and a fused op takes the name of the value it computes, so the report read from the
final graph names nodes as the model's graph did. Writes ``computes``, ``stores``, ``scale``
and ``scale_from`` of the records. Everything else stays as it was, in the model's precision.
"""

from __future__ import annotations

import operator
from typing import Any

import networkx as nx
import torch
from torch import Tensor, fx

from fxscale.bound import Bound
from fxscale.formats import Format
from fxscale.nodeinfo import info
from fxscale.runtime import Analysis, ScaleFn, Step, opaque_call, refs

from . import fusions
from .bounds import is_grouped
from .fusions import LinearCall
from .requantise import dependency_graph

aten = torch.ops.aten
fxops = torch.ops.fxscale

class Lowering:
    def __init__(self, gm: fx.GraphModule, an: Analysis, steps: dict[str, Step], fmt: Format):
        self.gm, self.an, self.steps, self.fmt = gm, an, steps, fmt
        self.g = gm.graph
        self.dep = dependency_graph(gm)
        self.order = {n.name: i for i, n in enumerate(self.g.nodes)}
        self.nodes = {n.name: n for n in self.g.nodes}
        self.stats_nodes: dict[str, fx.Node] = {}
        self.lowp: dict[str, tuple[fx.Node, fx.Node]] = {}
        self.weights: dict[tuple[str, bool], tuple[fx.Node, fx.Node]] = {}
        self.n_scale_fns = 0

    # ------------------------------------------------------------------ helpers
    def _buffer(self, name: str, value: Tensor, before: fx.Node, kind: str = "plumbing") -> fx.Node:
        name = name.replace(".", "_")
        base, i = name, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.register_buffer(name, value)
        with self.g.inserting_before(before):
            node = self.g.get_attr(name)
        node.meta["val"] = value
        info(node).kind = kind
        return node

    def _first(self) -> fx.Node:
        return next(iter(self.g.nodes))

    def stats_of(self, name: str) -> fx.Node:
        """The run-time ``[amax, rownorm]`` measurement of node ``name`` (created once)."""
        if name not in self.stats_nodes:
            src = self.nodes[name]
            with self.g.inserting_after(src):
                st = self.g.call_function(fxops.stats.default, (src,))
            self.stats_nodes[name] = st
            info(src).scale_from = "amax"
        return self.stats_nodes[name]

    def weight(self, node: fx.Node, transpose: bool) -> tuple[fx.Node, fx.Node]:
        key = (node.name, transpose)
        if key not in self.weights:
            data, scale, wb = self.an.quantised_consts[node.name]
            if transpose:
                data, wb = data.t(), wb.transposed()
            per_group = isinstance(scale, Tensor)  # a grouped (MoE) weight: one scale per expert
            how = (f"quantised once, one scale per expert (2^{int(scale.log2().min())}..2^{int(scale.log2().max())})"
                   if per_group else "quantised once")
            self.weights[key] = self.weight_buffers(
                node.name, data.contiguous(), scale, wb,
                f"{how} at transform time{' (stored transposed)' if transpose else ''}")
        return self.weights[key]

    def weight_buffers(self, name: str, data: Tensor, scale: float | Tensor, bound, reason: str) -> tuple[fx.Node, fx.Node]:
        """Buffers ``<name>_<format>`` (the quantised data) and ``<name>_scale`` (a float, or a
        tensor of per-expert scales), read at the top of the graph, with the data's record."""
        first = self._first()
        d = self._buffer(f"{name}_{self.fmt.name}", data, first, kind="weight")
        per_group = isinstance(scale, Tensor)
        s = self._buffer(f"{name}_scale", scale.to(torch.float32) if per_group else _scalar(scale, data.device), first)
        rec = info(d)
        rec.stores, rec.scale, rec.scale_from = self.fmt.name, (None if per_group else scale), "static"
        rec.bound = bound
        rec.observed = (float(bound.absmax), float(bound.rownorm))  # exact for a constant
        rec.reasons.append(reason)
        return d, s

    def scale_node(self, a: fx.Node) -> fx.Node:
        """A node computing the scale of low-precision operand ``a`` (before its consumers)."""
        an, name = self.an, a.name
        b = an.bounds[name]
        if name in an.measured:
            amax = self._getitem_after(self.stats_of(name), 0)
            with self.g.inserting_after(amax):
                sc = self.g.call_function(fxops.scale_from_amax.default, (amax, self.fmt.name))
            return sc
        deps = sorted(an.deps.get(name, ()), key=self.order.__getitem__)
        if not deps:
            scale = self.fmt.scale_for(float(b.absmax))
            info(a).scale, info(a).scale_from = scale, "static"
            return self._buffer(f"{name}_scale", _scalar(scale, a.meta["val"].device), self._first())
        # Dynamic: re-evaluate the rules between the measured sources and ``a`` at run time.
        region = (nx.ancestors(self.dep, name) | {name}) - set(deps)
        # Only nodes that depend on these sources alone: a node upstream of a measured source
        # depends on other measurements, and the source's measurement already stands for it.
        steps = [
            self.steps[n]
            for n in sorted(region, key=self.order.__getitem__)
            if n in self.steps and an.deps.get(n) and an.deps[n] <= set(deps)
        ]
        needed: set[str] = set()
        for s in steps:
            needed |= {r.name for r in refs(s.args) + refs(s.kwargs)}
        static = {k: an.bounds[k] for k in needed if k not in deps and not an.deps.get(k) and k in an.bounds}
        fn = ScaleFn(an, name, deps, steps, {k: _floats(v) for k, v in static.items()})
        mod_name = f"fxscale_scale_{self.n_scale_fns}"
        self.n_scale_fns += 1
        self.gm.add_submodule(mod_name, fn)
        stats = [self.stats_of(d) for d in deps]
        with self.g.inserting_after(a):
            sc = self.g.call_function(opaque_call(fn, mod_name), tuple(stats))
        info(a).scale_from = "rules"
        return sc

    def _getitem_after(self, node: fx.Node, i: int) -> fx.Node:
        with self.g.inserting_after(node):
            return self.g.call_function(operator.getitem, (node, i))

    def operand(self, a: fx.Node) -> tuple[fx.Node, fx.Node]:
        """(data, scale) of activation ``a`` in the low-precision format (created once)."""
        if a.name not in self.lowp:
            sc = self.scale_node(a)
            anchor = _latest(self.g, [a, sc])
            with self.g.inserting_after(anchor):
                q = self.g.call_function(fxops.quantise.default, (a, sc, self.fmt.name))
            info(a).stores = self.fmt.name
            self.lowp[a.name] = (q, sc)
        return self.lowp[a.name]

    def conv(self, n: fx.Node, a: fx.Node, b: fx.Node, dtype: torch.dtype) -> tuple[Any, tuple] | None:
        """``(target, args)`` of the fxscale op of convolution ``n`` (transposed or not, constant
        weight ``b``), or None with the reason recorded. A 1-D one is the 2-D op over a height of
        1, ``(.., C, L) -> (.., C, 1, L)``, then back: ``n`` (its name and record) stays the result."""
        t = n.target
        transposed = t in (aten.conv_transpose2d.input, aten.conv_transpose1d.default)
        args = list(n.args) + [None] * (8 - len(n.args))
        if transposed:
            _, _, cbias, stride, padding, out_pad, groups, dilation = args
        else:
            _, _, cbias, stride, padding, dilation, groups, out_pad = args
        if t in (aten.conv2d.padding, aten.conv1d.padding):
            padding = _explicit_padding(padding or "valid", b.meta["val"].shape[2:], dilation or 1)
            if padding is None:
                info(n).reasons.append('padding="same" with an even kernel (padded more on one side): high precision')
                return None
        xd, xs = self.operand(a)
        wd, ws = self.weight(b, False)
        geo = [stride or 1, padding or 0, dilation or 1, out_pad or 0]
        one_d = t in (aten.conv1d.default, aten.conv1d.padding, aten.conv_transpose1d.default)
        if one_d:  # the height's stride, padding, dilation, output padding: 1, 0, 1, 0
            geo = [[h, _pair(v)[0]] for h, v in zip((1, 0, 1, 0), geo)]
            with self.g.inserting_before(n):
                xd = self.g.call_function(aten.unsqueeze.default, (xd, -2))
                wd = self.g.call_function(aten.unsqueeze.default, (wd, -2))
        stride, padding, dilation, out_pad = (_pair(v) for v in geo)
        if transposed:
            target = fxops.scaled_conv_transpose2d.default
            args = (xd, xs, wd, ws, cbias, stride, padding, out_pad, int(groups or 1), dilation, dtype)
        else:
            target = fxops.scaled_conv2d.default
            args = (xd, xs, wd, ws, cbias, stride, padding, dilation, int(groups or 1), dtype)
        if not one_d:
            return target, tuple(args)
        with self.g.inserting_before(n):
            conv = self.g.call_function(target, args)
        info(conv).kind = "plumbing"
        return aten.squeeze.dim, (conv, -2)

    # ------------------------------------------------------------------ rewrite
    def lower_node(self, n: fx.Node, positions: tuple[int, ...]) -> None:
        t = n.target
        dtype = n.meta["val"].dtype
        pa, pb = positions
        a, b = n.args[pa], n.args[pb]
        const_b = b.name in self.an.consts
        const_a = a.name in self.an.consts
        bias = None
        if t is aten.linear.default:
            bias = n.args[2] if len(n.args) > 2 else None
            wt = False
        elif t is aten.addmm.default:
            bias = n.args[0]
            wt = True
        elif t in (aten.mm.default, aten.matmul.default) and b.meta["val"].dim() == 2:
            wt = True
        else:
            wt = None
        alpha, beta = float(n.kwargs.get("alpha", 1)), float(n.kwargs.get("beta", 1))  # addmm / baddbmm
        if (alpha, beta) != (1.0, 1.0):
            wt = None  # beta * bias + alpha * product: the product, then the sum (below)
        if is_grouped(t):
            offs = n.args[2] if len(n.args) > 2 else None
            if not const_b or const_a or offs is None or (len(n.args) > 3 and n.args[3] is not None):
                info(n).reasons.append("grouped matmul without a constant weight, offsets, or with a bias: high precision")
                return
            xd, xs = self.operand(a)
            wd, ws = self.weight(b, False)
            target, args = fxops.scaled_grouped_mm.default, (xd, xs, wd, ws, offs, dtype)
        elif t in _CONVS:
            if not const_b:
                info(n).reasons.append(f"{t.__name__.split('.')[0]} with a run-time weight: high precision")
                return
            lowered = self.conv(n, a, b, dtype)
            if lowered is None:
                return
            target, args = lowered
        elif wt is not None and const_b and not const_a:
            xd, xs = self.operand(a)
            wd, ws = self.weight(b, wt)
            target, args = fxops.scaled_linear.default, LinearCall(xd, xs, wd, ws, bias, out_dtype=dtype).args()
        else:
            ad, as_ = self.weight(a, False) if const_a else self.operand(a)
            if t is aten.linear.default:
                bd, bs = self.weight(b, True) if const_b else (None, None)
                if bd is None:
                    info(n).reasons.append("linear with a run-time weight: high precision")
                    return
            else:
                bd, bs = self.weight(b, False) if const_b else self.operand(b)
            target, args = fxops.scaled_matmul.default, (ad, as_, bd, bs, dtype)
            if t in (aten.addmm.default, aten.baddbmm.default):
                # the product, then the bias added in high precision: ``n`` (its name and record) stays the sum
                with self.g.inserting_before(n):
                    mm = self.g.call_function(target, args)
                    mm.meta["val"] = n.meta["val"]
                    info(mm).kind = "plumbing"
                    if alpha != 1.0:
                        mm = self.g.call_function(aten.mul.Tensor, (mm, alpha))
                        mm.meta["val"], info(mm).kind = n.meta["val"], "plumbing"
                    addend = n.args[0]
                    if beta not in (0.0, 1.0):
                        addend = self.g.call_function(aten.mul.Tensor, (addend, beta))
                        addend.meta["val"], info(addend).kind = n.args[0].meta["val"], "plumbing"
                # beta = 0: the bias is not read (as torch: even NaN or Inf in it)
                target, args = (aten.add.Tensor, (mm, addend)) if beta != 0.0 else (aten.mul.Tensor, (mm, 1.0))
        # Rewritten in place: the node keeps its name, its meta (shapes, source) and its record.
        n.target, n.args, n.kwargs = target, args, {}
        rec = info(n)
        rec.computes = self.fmt.name
        lin = n if target is fxops.scaled_linear.default else None
        if lin is not None and self.fmt.is_float and self.fmt.bits == 8:
            n_out, k = lin.args[2].meta["val"].shape
            if k % 16 or n_out % 16:
                rec.reasons.append(f"K={k}, N={n_out} not multiples of 16: no cuBLAS fp8 on the GPU, "
                                   "the masked Triton kernel runs (pad the layer for full speed)")

    def erase_chain(self, node: fx.Node) -> None:
        """Erase ``node`` if unused, and the measurement / scale plumbing that only it used."""
        if node.graph is None or node.users:
            return
        ins = node.all_input_nodes
        self.g.erase_node(node)
        for i in ins:
            if i.op == "call_function" and i.target in (operator.getitem, fxops.scale_from_amax.default, fxops.stats.default):
                self.erase_chain(i)


def _floats(b: Any) -> Any:
    if isinstance(b, Bound):
        return b.as_floats()
    if isinstance(b, list):
        return [_floats(x) for x in b]
    return b


def _scalar(v: float, device) -> Tensor:
    """A static scale: a 0-d float32 buffer on the device the graph runs on."""
    return torch.tensor(v, dtype=torch.float32, device=device)


#: The convolutions lowered by :meth:`Lowering.conv`.
_CONVS = (aten.conv2d.default, aten.conv1d.default, aten.conv2d.padding, aten.conv1d.padding,
          aten.conv_transpose2d.input, aten.conv_transpose1d.default)


def _explicit_padding(padding: str, kernel, dilation) -> list[int] | None:
    """``padding="valid"`` / ``"same"`` as the symmetric padding per dim, or None where "same"
    pads one side more (an odd total ``dilation * (kernel - 1)``: torch pads the end more)."""
    if padding == "valid":
        return [0] * len(kernel)
    dil = [int(dilation)] * len(kernel) if isinstance(dilation, int) else [int(d) for d in dilation]
    total = [d * (int(k) - 1) for d, k in zip(dil, kernel)]
    return None if padding != "same" or any(t % 2 for t in total) else [t // 2 for t in total]


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _latest(g: fx.Graph, nodes: list[fx.Node]) -> fx.Node:
    pos = {n: i for i, n in enumerate(g.nodes)}
    return max(nodes, key=lambda n: pos[n])


def lower(gm: fx.GraphModule, an: Analysis, *, fuse_residual: bool = False, fuse_siblings: bool = True) -> fx.GraphModule:
    """Rewrite the analysed ``gm`` in place into fxscale ops (see module docstring); returns it.
    ``fuse_residual``: also move residual adds into the linears (:meth:`Lowering.fuse_residual`);
    ``fuse_siblings``: linears reading the same quantised input become one GEMM
    (:mod:`passes.sibling_linears`)."""
    steps = an.steps
    lw = Lowering(gm, an, steps, an.fmt)
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.name in steps and steps[n.name].quantised:
            lw.lower_node(n, steps[n.name].quantised)
    fusions.apply(lw, fusions.EPILOGUE)
    if fuse_residual:
        fusions.apply(lw, fusions.RESIDUAL)
    if fuse_siblings:
        from .sibling_linears import fuse_sibling_linears

        fuse_sibling_linears(lw)
    for name in an.measured:  # a measurement nothing low-precision depends on is never emitted
        if name not in lw.stats_nodes and name in lw.nodes:
            ni = info(lw.nodes[name])
            if ni.kind == "input":
                ni.reasons.append("no low-precision value depends on it: not measured")
    gm.graph.eliminate_dead_code(is_impure_node=_impure)
    _drop_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _impure(node: fx.Node) -> bool:
    return node.op in ("placeholder", "output") or (node.op == "call_module" and "guards" in str(node.target)) or node.is_impure()


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Free the high-precision copies of weights that only quantised ops read."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = gm.get_submodule(mod_name) if mod_name else gm
        if attr in mod._parameters:
            del mod._parameters[attr]
        elif attr in mod._buffers:
            del mod._buffers[attr]

"""Codegen: rewrite the analysed ATen graph into ``torch.ops.fxscale.*`` calls.

Each matmul-like node becomes a scaled op on (data, scale) pairs:

* weights, quantised once by the bounds pass, become buffers (``(N, K)`` row-major data + a
  0-d scale);
* each activation operand is quantised with a scale that is a constant buffer (its bound is
  proven statically), the output of a :class:`ScaleFn` (its bound depends on run-time
  measurements: the same rules, evaluated on 0-d tensors), or its own run-time amax (it is
  measured: a requantise point, an input without a declared bound, or a value after an op
  without a rule);
* then fusion: a linear whose (activation of its) output only feeds quantise nodes writes the
  low-precision data itself (``scaled_linear(..., out_scale, out_fmt)``), a requantise
  point produced by a linear becomes ``scaled_linear_requantise`` (amax in the epilogue), and
  on request (``fuse_residual``) a residual add of a linear's high-precision output
  (``x + proj(a)``) moves into the linear (``scaled_linear(..., residual=x)``).

Everything else stays as it was, in the model's precision.
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

from .bounds import is_grouped
from .requantise import dependency_graph

aten = torch.ops.aten
fxops = torch.ops.fxscale

_ACTIVATIONS = {
    aten.relu.default: lambda n: "relu",
    aten.silu.default: lambda n: "silu",
    aten.gelu.default: lambda n: "gelu_tanh" if n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none") == "tanh" else "gelu",
}


class Lowering:
    def __init__(self, gm: fx.GraphModule, an: Analysis, steps: dict[str, Step], fmt: Format):
        self.gm, self.an, self.steps, self.fmt = gm, an, steps, fmt
        self.g = gm.graph
        self.dep = dependency_graph(gm)
        self.order = {n.name: i for i, n in enumerate(self.g.nodes)}
        self.nodes = {n.name: n for n in self.g.nodes}
        # A lowered node's replacement has a new name; the analysis knows it by the old one.
        self.alias: dict[str, str] = {}
        self.stats_nodes: dict[str, fx.Node] = {}
        self.lowp: dict[str, tuple[fx.Node, fx.Node]] = {}
        self.weights: dict[tuple[str, bool], tuple[fx.Node, fx.Node]] = {}
        self.n_scale_fns = 0

    # ------------------------------------------------------------------ helpers
    def _buffer(self, name: str, value: Tensor, before: fx.Node) -> fx.Node:
        name = name.replace(".", "_")
        base, i = name, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.register_buffer(name, value)
        with self.g.inserting_before(before):
            node = self.g.get_attr(name)
        node.meta["val"] = value
        info(node).kind = "weight"
        return node

    def key(self, node: fx.Node) -> str:
        """The name the analysis knows ``node`` by (a lowered matmul's replacement: the original)."""
        return self.alias.get(node.name, node.name)

    def _first(self) -> fx.Node:
        return next(iter(self.g.nodes))

    def stats_of(self, name: str) -> fx.Node:
        """The run-time ``[amax, rownorm]`` measurement of node ``name`` (created once)."""
        if name not in self.stats_nodes:
            src = self.nodes[name]
            with self.g.inserting_after(src):
                st = self.g.call_function(fxops.stats.default, (src,))
            self.stats_nodes[name] = st
        return self.stats_nodes[name]

    def weight(self, node: fx.Node, transpose: bool) -> tuple[fx.Node, fx.Node]:
        key = (node.name, transpose)
        if key not in self.weights:
            data, scale, _ = self.an.quantised_consts[node.name]
            if transpose:
                data = data.t()
            data = data.contiguous()
            first = self._first()
            d = self._buffer(f"{node.name}_{self.fmt.name}", data, first)
            per_group = isinstance(scale, Tensor)  # a grouped (MoE) weight: one scale per expert
            sv = scale.to(torch.float32) if per_group else _scalar(scale, data.device)
            s = self._buffer(f"{node.name}_scale", sv, first)
            how = (f"quantised once, one scale per expert (2^{int(sv.log2().min())}..2^{int(sv.log2().max())})"
                   if per_group else "quantised once")
            info(d).format = self.fmt.name
            info(d).scale = None if per_group else scale
            wb = self.an.quantised_consts[node.name][2]
            info(d).bound = wb.transposed() if transpose else wb
            info(d).note = f"{node.name} {how}{' (transposed)' if transpose else ''}"
            src = info(node)
            src.format, src.scale = self.fmt.name, info(d).scale
            src.note = f"{how} at transform time{' (stored transposed)' if transpose else ''}"
            self.weights[key] = (d, s)
        return self.weights[key]

    def scale_node(self, a: fx.Node) -> fx.Node:
        """A node computing the scale of low-precision operand ``a`` (before its consumers)."""
        an, name = self.an, self.key(a)
        b = an.bounds[name]
        if name in an.measured:
            amax = self._getitem_after(self.stats_of(name), 0)
            with self.g.inserting_after(amax):
                sc = self.g.call_function(fxops.scale_from_amax.default, (amax, self.fmt.name))
            return sc
        deps = sorted(an.deps.get(name, ()), key=self.order.__getitem__)
        if not deps:
            scale = self.fmt.scale_for(float(b.absmax))
            info(a).scale = scale
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
        return sc

    def _getitem_after(self, node: fx.Node, i: int) -> fx.Node:
        with self.g.inserting_after(node):
            return self.g.call_function(operator.getitem, (node, i))

    def operand(self, a: fx.Node) -> tuple[fx.Node, fx.Node]:
        """(data, scale) of activation ``a`` in the low-precision format (created once)."""
        name = self.key(a)
        if name not in self.lowp:
            sc = self.scale_node(a)
            anchor = _latest(self.g, [a, sc])
            with self.g.inserting_after(anchor):
                q = self.g.call_function(fxops.quantise.default, (a, sc, self.fmt.name))
            info(a).format = self.fmt.name
            self.lowp[name] = (q, sc)
        return self.lowp[name]

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
        if is_grouped(t):
            offs = n.args[2] if len(n.args) > 2 else None
            if not const_b or const_a or offs is None or (len(n.args) > 3 and n.args[3] is not None):
                info(n).kind = "high"
                info(n).note = "grouped matmul without a constant weight, offsets, or with a bias: high precision"
                return
            xd, xs = self.operand(a)
            wd, ws = self.weight(b, False)
            with self.g.inserting_before(n):
                new = self.g.call_function(fxops.scaled_grouped_mm.default, (xd, xs, wd, ws, offs, dtype))
        elif t in (aten.conv2d.default, aten.conv1d.default):
            args = list(n.args) + [None] * (7 - len(n.args))
            _, _, cbias, stride, padding, dilation, groups = args
            if isinstance(padding, str) or not const_b:
                info(n).kind = "high"
                info(n).note = f"{t.__name__.split('.')[0]} with string padding or a run-time weight: high precision"
                return
            xd, xs = self.operand(a)
            wd, ws = self.weight(b, False)
            one_d = t is aten.conv1d.default
            if one_d:  # conv1d(x, w) = conv2d over a height of 1: (.., C, L) -> (.., C, 1, L)
                stride, padding, dilation = ([k, _pair(v)[0]] for k, v in ((1, stride or 1), (0, padding or 0), (1, dilation or 1)))
            with self.g.inserting_before(n):
                if one_d:
                    xd = self.g.call_function(aten.unsqueeze.default, (xd, -2))
                    wd = self.g.call_function(aten.unsqueeze.default, (wd, -2))
                new = self.g.call_function(
                    fxops.scaled_conv2d.default,
                    (xd, xs, wd, ws, cbias, _pair(stride or 1), _pair(padding or 0), _pair(dilation or 1), int(groups or 1), dtype),
                )
                if one_d:
                    new = self.g.call_function(aten.squeeze.dim, (new, -2))
        elif wt is not None and const_b and not const_a:
            xd, xs = self.operand(a)
            wd, ws = self.weight(b, wt)
            with self.g.inserting_before(n):
                new = self.g.call_function(
                    fxops.scaled_linear.default, (xd, xs, wd, ws, bias, "none", None, None, dtype)
                )
        else:
            ad, as_ = self.weight(a, False) if const_a else self.operand(a)
            if t is aten.linear.default:
                bd, bs = self.weight(b, True) if const_b else (None, None)
                if bd is None:
                    info(n).kind = "high"
                    info(n).note = "linear with a run-time weight: high precision"
                    return
            else:
                bd, bs = self.weight(b, False) if const_b else self.operand(b)
            with self.g.inserting_before(n):
                new = self.g.call_function(fxops.scaled_matmul.default, (ad, as_, bd, bs, dtype))
                if t in (aten.addmm.default, aten.baddbmm.default):
                    new = self.g.call_function(aten.add.Tensor, (new, n.args[0]))
        new.meta["val"] = n.meta["val"]
        new.meta["fxscale"] = info(n)
        self.alias[new.name] = self.key(n)
        self.nodes[self.key(n)] = new
        info(n).kind = "quantised"
        if new.target is fxops.scaled_linear.default and self.fmt.is_float and self.fmt.bits == 8:
            n_out, k = new.args[2].meta["val"].shape
            if k % 16 or n_out % 16:
                info(n).note = (info(n).note + f"; K={k}, N={n_out} not multiples of 16: no cuBLAS fp8 on the GPU, "
                                "the masked Triton kernel runs (pad the layer for full speed)").lstrip("; ")
        n.replace_all_uses_with(new)
        self.g.erase_node(n)

    def fuse(self) -> None:
        """Fold quantise-after-linear into the linear's epilogue (static, dynamic, requantise)."""
        for lin in list(self.g.nodes):
            if lin.op != "call_function" or lin.target is not fxops.scaled_linear.default:
                continue
            if lin.args[7] is not None or lin.args[5] != "none":
                continue
            y, act = lin, "none"
            if len(lin.users) == 1:
                u = next(iter(lin.users))
                if u.op == "call_function" and u.target in _ACTIVATIONS and u.args[0] is lin:
                    y, act = u, _ACTIVATIONS[u.target](u)
            users = list(y.users)
            quants = [u for u in users if u.op == "call_function" and u.target is fxops.quantise.default]
            yname = self.key(y)
            if not quants or yname not in self.lowp:
                continue
            q, sc = self.lowp[yname]
            stats = self.stats_nodes.get(yname)
            others = [u for u in users if u is not q and u is not stats]
            if others:
                continue
            x, xs, w, ws, bias, _, _, _, dtype = lin.args
            if yname in self.an.measured:
                if stats is None:
                    continue
                with self.g.inserting_before(lin):
                    r = self.g.call_function(
                        fxops.scaled_linear_requantise.default, (x, xs, w, ws, bias, act, self.fmt.name)
                    )
                    data = self.g.call_function(operator.getitem, (r, 0))
                    scale = self.g.call_function(operator.getitem, (r, 1))
                    st = self.g.call_function(operator.getitem, (r, 2))
                r.meta["fxscale"] = info(lin)
                q.replace_all_uses_with(data)
                sc.replace_all_uses_with(scale)
                stats.replace_all_uses_with(st)
                for dead in (q, sc):
                    self._erase_chain(dead)
                self._erase_chain(stats)
            else:
                if not _defined_before(sc, lin, self.g):
                    if sc.op == "get_attr" or all(_defined_before(i, lin, self.g) for i in sc.all_input_nodes):
                        lin.prepend(sc)
                    else:
                        continue
                with self.g.inserting_before(lin):
                    r = self.g.call_function(
                        fxops.scaled_linear.default, (x, xs, w, ws, bias, act, sc, self.fmt.name, dtype)
                    )
                r.meta["fxscale"] = info(lin)
                q.replace_all_uses_with(r)
                self.g.erase_node(q)
            info(lin).note = (info(lin).note + f"; {act} + cast fused into epilogue").lstrip("; ")
            if y is not lin:
                info(y).note = "fused into the matmul epilogue"
                self.g.erase_node(y)
            self.g.erase_node(lin)

    def fuse_residual(self) -> None:
        """``add(scaled_linear(...), r)`` -> ``scaled_linear(..., residual=r)`` where the linear's
        plain output feeds only that add and ``r`` has the same shape and dtype (no broadcast)."""
        for lin in list(self.g.nodes):
            if (lin.op != "call_function" or lin.target is not fxops.scaled_linear.default
                    or lin.args[7] is not None or len(lin.args) > 9 or len(lin.users) != 1):
                continue
            add = next(iter(lin.users))
            if add.op != "call_function" or add.target is not aten.add.Tensor or add.kwargs or len(add.args) != 2:
                continue
            r = add.args[1] if add.args[0] is lin else add.args[0]
            if not isinstance(r, fx.Node) or r is lin:
                continue
            vals = [n.meta.get("val") for n in (lin, r, add)]
            # shapes compared as text: symbolic batch sizes compare without guards
            if not all(isinstance(v, Tensor) for v in vals) or len({(str(v.shape), v.dtype) for v in vals}) != 1:
                continue
            with self.g.inserting_before(add):
                new = self.g.call_function(fxops.scaled_linear.default, (*lin.args, r))
            new.meta["val"] = add.meta["val"]
            new.meta["fxscale"] = info(lin)
            info(lin).note = (info(lin).note + "; residual add fused into epilogue").lstrip("; ")
            info(add).note = "fused into the matmul epilogue"
            add.replace_all_uses_with(new)
            self.g.erase_node(add)
            self.g.erase_node(lin)

    def _erase_chain(self, node: fx.Node) -> None:
        if node.graph is None or node.users:
            return
        ins = node.all_input_nodes
        self.g.erase_node(node)
        for i in ins:
            if i.op == "call_function" and i.target in (operator.getitem, fxops.scale_from_amax.default, fxops.stats.default):
                self._erase_chain(i)


def _floats(b: Any) -> Any:
    if isinstance(b, Bound):
        return b.as_floats()
    if isinstance(b, list):
        return [_floats(x) for x in b]
    return b


def _scalar(v: float, device) -> Tensor:
    """A static scale: a 0-d float32 buffer on the device the graph runs on."""
    return torch.tensor(v, dtype=torch.float32, device=device)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _latest(g: fx.Graph, nodes: list[fx.Node]) -> fx.Node:
    pos = {n: i for i, n in enumerate(g.nodes)}
    return max(nodes, key=lambda n: pos[n])


def _defined_before(a: fx.Node, b: fx.Node, g: fx.Graph) -> bool:
    for n in g.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def lower(gm: fx.GraphModule, an: Analysis, *, fuse_residual: bool = False) -> fx.GraphModule:
    """Rewrite the analysed ``gm`` in place into fxscale ops (see module docstring); returns it.
    ``fuse_residual``: also move residual adds into the linears (:meth:`Lowering.fuse_residual`)."""
    steps = an.steps
    lw = Lowering(gm, an, steps, an.fmt)
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.name in steps and steps[n.name].quantised:
            lw.lower_node(n, steps[n.name].quantised)
    lw.fuse()
    if fuse_residual:
        lw.fuse_residual()
    for name in an.measured:  # a measurement nothing low-precision depends on is never emitted
        if name not in lw.stats_nodes and name in lw.nodes:
            ni = info(lw.nodes[name])
            ni.extra["runtime_amax"] = False
            if ni.kind == "input":
                ni.note = "no low-precision value depends on it: not measured"
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

"""Functionalise: in-place ATen ops (``relu_``, ``add_``, ``mul_``, ``silu_``, ...) become their
out-of-place forms, where that changes nothing but the names.

``torch.export`` keeps a model's in-place ops (``nn.ReLU(inplace=True)``, ``y += x``,
``y.mul_(2)``): the op returns its first argument, mutated, and later readers of that
argument read the mutated value. The rules are written for values, not for storage, so an
in-place op had no rule, ran in high precision and cost the matmul after it a run-time amax
(torchvision's resnet18 / mobilenet_v3 / efficientnet: 18-82 such fallbacks).

Here ``y = op_(x, ...)`` becomes ``y = op(x, ...)`` (cast back to ``x``'s dtype where the
out-of-place form would promote), and every later reader of ``x`` reads ``y``. Only where
``x`` is storage of the graph's own making that nothing else can see: the output of a
non-aliasing op, never an input, a parameter or buffer, nor a tensor with a view taken of
it before the mutation (a view would see the new value). Everywhere else the op stays
in-place and in high precision, and its report row says so.

``passes.capture`` now functionalises torch.export's graphs that mutate anything itself
(``run_decompositions``: issue 11 cases 5, 6), so this pass acts on the graphs that reach it with
in-place ops still in them (the tensor-parallel capture, hand-built graphs):

>>> import torch
>>> class M(torch.nn.Module):
...     def forward(self, x):
...         y = torch.relu_(x * 2)
...         y.add_(1.0)
...         return y * 3
>>> gm = torch.export.export(M(), (torch.randn(2, 4),), strict=False).module()
>>> functionalise(gm)
['relu_', 'add_']
>>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
['aten.mul.Tensor', 'aten.relu.default', 'aten.add.Tensor', 'aten.mul.Tensor']
"""

from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

__all__ = ["functional_variant", "functionalise"]


def functional_variant(target) -> torch._ops.OpOverload | None:
    """``aten.add.Tensor`` for ``aten.add_.Tensor`` (an in-place overload); None otherwise."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    schema = target._schema
    name = schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_") or not schema.arguments:
        return None
    first = schema.arguments[0].alias_info
    if first is None or not first.is_write:
        return None
    packet = getattr(aten, name[:-1], None)
    overload = target._overloadname
    f = getattr(packet, overload, None) if packet is not None else None
    if f is None or f._schema.is_mutable:
        return None
    return f


def _aliases(node: fx.Node) -> bool:
    """Whether ``node``'s output may share storage with an input (a view, an in-place op)."""
    t = node.target
    if t is operator.getitem:
        return _aliases(node.args[0]) if isinstance(node.args[0], fx.Node) else True
    if not isinstance(t, torch._ops.OpOverload):
        return True
    return any(r.alias_info is not None for r in t._schema.returns)


def _owned(base: fx.Node) -> bool:
    """Storage the graph made itself: the output of a non-aliasing op."""
    return base.op == "call_function" and not _aliases(base)


def functionalise(gm: fx.GraphModule) -> list[str]:
    """Rewrite in-place ops into out-of-place ones where safe (module docstring); returns the
    names of the nodes rewritten, in graph order."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    done: list[str] = []
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        f = functional_variant(n.target)
        base = n.args[0] if n.args else None
        if f is None or not isinstance(base, fx.Node) or not _owned(base):
            continue
        here = order[n]
        readers = [u for u in base.users if u is not n]
        if any(_aliases(u) and order[u] < here for u in readers):
            continue  # a view taken before the mutation would see it
        later = [u for u in readers if order[u] > here]
        val = n.meta.get("val")
        with g.inserting_before(n):
            m = g.call_function(f, n.args, n.kwargs)
            m.meta = dict(n.meta)
            out = m
            bval = base.meta.get("val")
            if isinstance(bval, torch.Tensor) and isinstance(val, torch.Tensor) and _promotes(n, bval.dtype):
                out = g.call_function(aten._to_copy.default, (m,), {"dtype": bval.dtype})
                out.meta = dict(n.meta)
        order[m] = order[out] = here
        n.replace_all_uses_with(out)
        for u in later:
            u.replace_input_with(base, out)
        done.append(n.name)
        g.erase_node(n)
    if done:
        g.lint()
        gm.recompile()
    return done


def _promotes(n: fx.Node, dtype: torch.dtype) -> bool:
    """Whether the out-of-place form may return another dtype than the mutated tensor's."""
    for a in list(n.args[1:]) + list(n.kwargs.values()):
        v = a.meta.get("val") if isinstance(a, fx.Node) else None
        if isinstance(v, torch.Tensor) and v.dtype != dtype:
            return True
        if isinstance(a, float) and not dtype.is_floating_point:
            return True
    return False

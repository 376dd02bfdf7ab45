"""Inline the grad-mode and disabled-autocast regions that ``torch.export`` wraps in submodules.

A ``@torch.no_grad()`` method or a ``with torch.autocast(..., enabled=False)`` block inside the
model (transformers 5.17's rotary embedding has both) is exported as a higher-order op,
``wrap_with_set_grad_enabled(False, submod, *args)`` or ``wrap_with_autocast(device, dtype,
False, cache, submod, *args)``, whose body lives in a child ``GraphModule``. fxscale transforms
for inference, without an outer autocast, so both regions compute the same ops as their body:
the body is copied into the parent graph (its nodes keep their ``meta["val"]``) and every later
pass sees ordinary ATen nodes. Without this, the region's outputs had no bound (the rotary
cos/sin of a Llama and every K value after them).

An autocast region that is *enabled* changes dtypes of the ops inside it at run time; it is
left wrapped (nothing else in fxscale handles it: its outputs stay unbounded and the report
shows them).

>>> import torch
>>> class M(torch.nn.Module):
...     @torch.no_grad()
...     def inner(self, x):
...         return x.cos(), x.sin()
...     def forward(self, x):
...         c, s = self.inner(x)
...         return c * s
>>> gm = torch.export.export(M(), (torch.randn(4),), strict=False).module()
>>> inline_regions(gm)
1
>>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
['aten.cos.default', 'aten.sin.default', 'aten.mul.Tensor']
"""

from __future__ import annotations

import operator

import torch
from torch import fx

__all__ = ["inline_regions"]


def _region(node: fx.Node) -> tuple[fx.Node, tuple] | None:
    """``(submodule get_attr node, operands)`` of a region that computes what its body does."""
    if node.op != "call_function":
        return None
    hop = torch.ops.higher_order
    if node.target is getattr(hop, "wrap_with_set_grad_enabled", None):
        return node.args[1], tuple(node.args[2:])
    if node.target is getattr(hop, "wrap_with_autocast", None) and node.args[2] is False:
        return node.args[4], tuple(node.args[5:])
    return None


def _inline_one(gm: fx.GraphModule, node: fx.Node, sub_attr: fx.Node, operands: tuple) -> None:
    sub: fx.GraphModule = getattr(gm, sub_attr.target)
    env: dict[fx.Node, object] = {}
    placeholders = iter(operands)
    result = None
    with gm.graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
            elif n.op == "output":
                result = fx.map_arg(n.args[0], lambda a: env[a])
            elif n.op == "get_attr":  # the body's constants / nested regions: move them up
                name = f"{sub_attr.target}_{n.target}".replace(".", "_")
                setattr(gm, name, operator.attrgetter(n.target)(sub))
                new = gm.graph.get_attr(name)
                new.meta = dict(n.meta)
                env[n] = new
            else:
                env[n] = gm.graph.node_copy(n, lambda a: env[a])
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(result[user.args[1]])
            gm.graph.erase_node(user)
    if node.users:  # a region whose single value is used directly
        node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    if not sub_attr.users:
        gm.graph.erase_node(sub_attr)


def inline_regions(gm: fx.GraphModule) -> int:
    """Inline every no-op region of ``gm`` (nested ones too); returns how many were inlined."""
    count = 0
    while True:
        found = next(((n, *r) for n in gm.graph.nodes if (r := _region(n)) is not None), None)
        if found is None:
            break
        _inline_one(gm, *found)
        count += 1
    if count:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return count

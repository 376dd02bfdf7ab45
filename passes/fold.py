"""Fold: shape ops on constants (``weight.T``, ``weight.t()``, a slice of a fused weight)
become constants, so that a matmul reading them reads a weight, quantised once.

``x @ self.weight.T`` (Falcon, hand-written attention) captures as
``matmul(x, numpy_T(weight))``: the matmul's operand was a run-time value, measured and
quantised again on every call. Here a chain of shape-only ops (transpose, permute, view,
slice, select, unsqueeze, contiguous, a dtype cast) whose only tensor input is a parameter
or buffer is evaluated once and replaced by a ``get_attr`` of the result (a view of the
weight where the op is one: no copy). A buffer that the graph mutates is left alone.

>>> import torch
>>> from passes.capture import capture
>>> class M(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.w = torch.nn.Parameter(torch.randn(8, 4))
...     def forward(self, x):
...         return x @ self.w.T
>>> gm = capture(M(), (torch.randn(2, 4),))
>>> fold(gm)
['numpy_t']
>>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
['aten.matmul.default']
"""

from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

__all__ = ["FOLDABLE", "FOLDABLE_FACTORIES", "FOLDABLE_ON_CONSTANTS", "FOLDABLE_SPLITS", "fold"]

#: Ops folded on constants: they move values without arithmetic (a dtype cast rounds, once).
FOLDABLE = {
    aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default, aten.view.default,
    aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.contiguous.default, aten.clone.default,
    aten.detach.default, aten.alias.default, aten.slice.Tensor, aten.select.int, aten.flatten.using_ints,
    aten.to.dtype, aten._to_copy.default,
}


#: Arithmetic folded where every tensor operand is a constant: the weight a weight-normalised
#: conv reads (Wav2Vec2's positional conv: ``_weight_norm(v, g, dim)``), DoRA's column norms of
#: ``W + s B A`` (peft: ``eye`` through both LoRA linears, ``linalg_norm``, a division of the
#: magnitude vector), Gemma's ``1 + weight``: computed once, by the kernel the call would run
#: (the same values), so a matmul reading them reads a weight, quantised once, and no run-time
#: value is left without a rule (DoRA's made the K/V bound unprovable; found by a user trial).
FOLDABLE_ON_CONSTANTS = {
    aten._weight_norm.default, aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default,
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.mul.Tensor,
    aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.abs.default, aten.sqrt.default,
    aten.rsqrt.default, aten.reciprocal.default, aten.pow.Tensor_Scalar, aten.linalg_norm.default,
    aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim, aten.clamp_min.default, aten.clamp.default,
}
#: Splits of a constant, folded where each part is taken by index: ``nn.MultiheadAttention``'s
#: ``in_proj_weight`` split into q / k / v when query, key and value differ (cross-attention,
#: attention pooling: its projections read run-time weights, in float32; found by a user trial).
FOLDABLE_SPLITS = {aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, aten.unbind.int,
                   aten.tensor_split.sections, aten.tensor_split.indices}
#: Factories folded where their arguments are static (DoRA's ``eye(r)``).
FOLDABLE_FACTORIES = {aten.eye.default, aten.eye.m}
#: The largest constant folding makes (elements): a folded value is kept as a buffer.
MAX_FOLDED = 1 << 24


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _mutated(node: fx.Node) -> bool:
    return any(isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable for u in node.users)


def _static(a) -> bool:
    if isinstance(a, fx.Node):
        return False
    if isinstance(a, (list, tuple)):
        return all(_static(x) for x in a)
    return not isinstance(a, (torch.SymInt, torch.SymFloat))


def fold(gm: fx.GraphModule) -> list[str]:
    """Replace shape ops on constants by constants (module docstring); returns the names of
    the nodes folded, in graph order."""
    g = gm.graph
    done: list[str] = []
    for n in list(g.nodes):
        by_value = n.target in FOLDABLE_ON_CONSTANTS or n.target in FOLDABLE_FACTORIES
        if n.op == "call_function" and by_value and _fold_on_constants(gm, n):
            done.append(n.name)
            continue
        if n.op == "call_function" and n.target in FOLDABLE_SPLITS and _fold_split(gm, n):
            done.append(n.name)
            continue
        if n.op != "call_function" or n.target not in FOLDABLE or not n.args:
            continue
        src = n.args[0]
        if not (isinstance(src, fx.Node) and src.op == "get_attr") or _mutated(src):
            continue
        if not (_static(n.args[1:]) and _static(tuple(n.kwargs.values()))):
            continue
        if n.target in (aten._to_copy.default,) and set(n.kwargs) - {"dtype"}:
            continue  # a device or layout change: left to run
        value = _attr(gm, src.target)
        if not isinstance(value, torch.Tensor):
            continue
        with torch.no_grad():
            out = n.target(value.detach(), *n.args[1:], **n.kwargs)
        if not isinstance(out, torch.Tensor):
            continue
        _replace_by_constant(gm, n, out, [src])
        done.append(n.name)
    if done:
        g.lint()
        gm.recompile()
    return done


def _fold_split(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Each ``getitem`` of a split of an unmutated constant becomes a constant (a view of it)."""
    src = n.args[0] if n.args else None
    if not (isinstance(src, fx.Node) and src.op == "get_attr") or _mutated(src):
        return False
    if not (_static(n.args[1:]) and _static(tuple(n.kwargs.values()))) or not n.users:
        return False
    if not all(u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int) for u in n.users):
        return False
    value = _attr(gm, src.target)
    if not isinstance(value, torch.Tensor):
        return False
    with torch.no_grad():
        parts = n.target(value.detach(), *n.args[1:], **n.kwargs)
    for u in list(n.users):
        _replace_by_constant(gm, u, parts[u.args[1]], [src])
    gm.graph.erase_node(n)
    if not src.users:
        gm.graph.erase_node(src)
    return True


def _fold_on_constants(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Evaluate ``n`` once if each of its node operands is an unmutated constant (a factory: if
    its arguments are static), and the result is a tensor of at most :data:`MAX_FOLDED` elements."""
    srcs = [a for a in n.args if isinstance(a, fx.Node)]
    if not srcs and n.target not in FOLDABLE_FACTORIES:
        return False
    if any(a.op != "get_attr" or _mutated(a) for a in srcs) or not _static(tuple(n.kwargs.values())):
        return False  # (a node among the kwargs is not static either)
    if not all(_static(a) for a in n.args if not isinstance(a, fx.Node)):
        return False
    values = {a: _attr(gm, a.target) for a in srcs}
    if not all(isinstance(v, torch.Tensor) for v in values.values()):
        return False
    with torch.no_grad():
        out = n.target(*[values[a].detach() if isinstance(a, fx.Node) else a for a in n.args], **n.kwargs)
    if not isinstance(out, torch.Tensor) or out.numel() > MAX_FOLDED:
        return False
    _replace_by_constant(gm, n, out, srcs)
    return True


def _replace_by_constant(gm: fx.GraphModule, n: fx.Node, value: torch.Tensor, srcs: list[fx.Node]) -> None:
    """``n`` -> a ``get_attr`` of ``value`` (a buffer named after its first source); sources
    left without users go."""
    name = f"{srcs[0].target.replace('.', '_')}_{n.name}" if srcs else f"_folded_{n.name}"
    while hasattr(gm, name):
        name += "_"
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(n):
        c = gm.graph.get_attr(name)
    c.meta = dict(n.meta)
    n.replace_all_uses_with(c)
    gm.graph.erase_node(n)
    for a in srcs:
        if not a.users:
            gm.graph.erase_node(a)

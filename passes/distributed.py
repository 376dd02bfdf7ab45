"""Tensor parallelism: capture a DTensor-parallel model per rank, and make ranks agree.

**Capture.** ``torch.export`` of a module parallelised with ``parallelize_module`` fails in
torch 2.13 (``DTensorSpec`` is not a pytree type, pytorch#175467); registering it as a pytree
constant gets through, but the graph then stays at the DTensor level (``flat_apply`` of DTensor
constructors, linears on DTensors), which no rewrite into scaled local matmuls can use. Tracing
with ``make_fx`` goes *through* DTensor's dispatch instead: the result is this rank's graph of
local ATen ops on its weight shards, with the functional collectives (``_c10d_functional``
``all_reduce`` + ``wait_tensor``) that the parallel styles issue. Symbolic tracing keeps the
sizes symbolic, and ``torch.export`` of that graph then gives the usual form (dynamic batch,
constants as ``get_attr``), so the rest of the pipeline is the single-process one.

**Agreement.** Each rank proves bounds for its own shards, and the collective rules
(:mod:`fxscale.rules.parallel`) need every rank's bound of a value to be one number valid
for all ranks. Three small collectives on the graph's own process group make it so, once at
transform time: :func:`agree_observed` maxes the calibration statistics over ranks (the
precision pass and requantise placement decide on them), :func:`agree_amax` gives each weight
shard the scale of the whole (unsharded) weight (the max of the shards' max |w|), and
:func:`agree_bounds` makes every constant's bound the max over ranks of each norm. Given the same graph (checked: same ops, same shapes on every rank),
the analysis is then the same computation on the same numbers on every rank: every rank
derives identical scales and places requantises identically, and the transformed graph holds
no collective beyond the model's own.

>>> import torch
>>> from passes.distributed import has_dtensor
>>> has_dtensor(torch.nn.Linear(2, 2))
False
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from fxscale.bound import Bound
from fxscale.nodeinfo import info
from fxscale.rules.parallel import COLLECTIVES

__all__ = ["agree_amax", "agree_bounds", "agree_observed", "capture_local", "collectives", "has_dtensor", "process_group"]

_c10d = torch.ops._c10d_functional


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def has_dtensor(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a DTensor (it was parallelised)."""
    if not dist.is_available():
        return False
    return any(_is_dtensor(t) for t in list(model.parameters()) + list(model.buffers()))


def capture_local(model: nn.Module, args: tuple, dynamic_batch: bool = True) -> fx.GraphModule:
    """This rank's ATen graph of ``model`` (parallelised with DTensor), collectives included.

    Constants keep the names of the parameters they are shards of (``layers.0.wq.weight`` ->
    ``layers_0_wq_weight``), so the report reads like the single-process one.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    if dynamic_batch:
        warnings.warn(
            f"{type(model).__name__} is tensor-parallel (DTensor): captured with the example's static shapes "
            "(symbolic tracing through DTensor takes ~15x longer), so other shapes raise; transform once per "
            "shape (prefill, decode step)",
            stacklevel=4,
        )
    leaves = pytree.tree_leaves(args)
    with torch.no_grad():
        traced = make_fx(
            lambda *xs: model(*pytree.tree_unflatten(list(xs), pytree.tree_structure(args))),
            tracing_mode="fake",
            _allow_non_fake_inputs=True,  # the shards are real tensors
        )(*leaves)
    _name_constants(traced, model)
    _name_inputs(traced, model, len(leaves))
    _out_of_place(traced)
    return torch.export.export(traced, tuple(leaves), strict=False).module()


def _out_of_place(gm: fx.GraphModule) -> None:
    """In-place ops on a temporary that nothing else reads (``mean(x**2).add_(eps)`` in a
    decomposed RMSNorm) replaced by their out-of-place form, which the rules cover.

    (``torch.func.functionalize`` would do it, but it rejects DTensor's autograd functions.)
    """
    for n in list(gm.graph.nodes):
        t = n.target
        if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or not t._schema.name.endswith("_"):
            continue
        base = t._schema.name.split("::")[-1][:-1]
        packet = getattr(torch.ops.aten, base, None) if t.namespace == "aten" else None
        functional = getattr(packet, t._overloadname, None) if packet is not None else None
        src = n.args[0] if n.args else None
        if functional is None or not isinstance(src, fx.Node) or src.op != "call_function" or len(src.users) != 1:
            continue
        n.target = functional
    gm.recompile()


def _name_inputs(gm: fx.GraphModule, model: nn.Module, n: int) -> None:
    """make_fx's ``arg0_1``... renamed after ``model.forward``'s parameters, where there is one per input."""
    import inspect

    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    except (TypeError, ValueError):
        return
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    if len(placeholders) != n or len(params) < n:
        return
    for p, name in zip(placeholders, params):
        p.target = name
        p.name = name
    gm.recompile()


def _name_constants(gm: fx.GraphModule, model: nn.Module) -> None:
    """Rename make_fx's ``_tensor_constantN`` to the parameter / buffer each one holds, as buffers."""
    by_id: dict[int, str] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        local = t.to_local() if _is_dtensor(t) else t
        by_id.setdefault(id(local), name)
        by_id.setdefault(local.data_ptr(), name)
    for n in gm.graph.nodes:
        if n.op != "get_attr" or not n.target.startswith("_tensor_constant"):
            continue
        value = getattr(gm, n.target)
        fqn = by_id.get(id(value)) or (by_id.get(value.data_ptr()) if isinstance(value, Tensor) and value.numel() else None)
        if fqn is None:
            continue
        new = fqn.replace(".", "_")
        while hasattr(gm, new):
            new += "_"
        delattr(gm, n.target)
        gm.register_buffer(new, value)
        n.target = new
    gm.recompile()


def collectives(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's collective calls (``_c10d_functional`` ops other than ``wait_tensor``)."""
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and getattr(n.target, "namespace", None) == "_c10d_functional"
        and n.target is not _c10d.wait_tensor.default
    ]


def process_group(gm: fx.GraphModule):
    """The process group of the graph's collectives, or None for a graph without any.

    Raises ``NotImplementedError`` for a graph whose collectives use several groups (2-D
    meshes) or ops the collective rules do not cover, naming the node.
    """
    nodes = collectives(gm)
    if not nodes:
        return None
    names = []
    for n in nodes:
        if n.target not in COLLECTIVES:
            raise NotImplementedError(
                f"node {n.format_node()}: fxscale has no bound rule for {n.target}; covered are "
                f"{', '.join(str(c) for c in COLLECTIVES)}. Parallelise with ColwiseParallel / RowwiseParallel "
                "(/ SequenceParallel) styles, or transform the model before parallelising it."
            )
        name = n.args[-1]
        if name not in names:
            names.append(name)
    if len(names) > 1:
        raise NotImplementedError(
            f"the graph's collectives use {len(names)} process groups ({names}): fxscale agrees bounds over "
            "one group (a 1-D tensor-parallel mesh); parallelise over one mesh dimension"
        )
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(names[0])


def _signature(gm: fx.GraphModule, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    return [f"{n.name} {n.op} {n.target} {shapes.get(n.name)}" for n in gm.graph.nodes]


def agree_observed(gm: fx.GraphModule) -> None:
    """After calibration: every node's observed statistics maxed over ranks (in place).

    The precision pass and requantise placement decide on these statistics, so ranks must
    see the same ones to build the same graph. One collective, which also checks that every
    rank captured the same graph (ops and shapes): ``ValueError`` naming the first node that
    differs otherwise. A graph without collectives is left alone.
    """
    from .bounds import concrete_shape

    group = process_group(gm)
    if group is None:
        return
    sig = [f"{n.name} {n.op} {n.target} {concrete_shape(n.meta.get('val'))}" for n in gm.graph.nodes]
    nodes = [n for n in gm.graph.nodes if info(n).observed is not None]
    obs = [tuple(float(v) for v in info(n).observed) for n in nodes]
    gathered: list[Any] = [None] * group.size()
    dist.all_gather_object(gathered, (hashlib.sha256("\n".join(sig).encode()).hexdigest(), sig, obs), group=group)
    for r, (h, other, _) in enumerate(gathered):
        if h != gathered[0][0]:
            first = next((f"{a!r} on rank 0, {b!r} on rank {r}" for a, b in zip(gathered[0][1], other) if a != b), "different lengths")
            raise ValueError(
                f"the ranks captured different graphs ({first}); fxscale needs every rank's graph to be the same "
                "up to its shards' values: shard evenly (each sharded size divisible by the number of ranks) and "
                "pass the same example inputs on every rank"
            )
    for i, n in enumerate(nodes):
        info(n).observed = tuple(max(g[2][i][j] for g in gathered) for j in range(len(obs[i])))


def agree_amax(group, amax: dict[str, float]) -> dict[str, float]:
    """Max over ranks of each weight's max |w| (the unsharded weight's): one collective."""
    keys = sorted(amax)
    t = torch.tensor([amax[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(keys, t.tolist()))


def agree_bounds(group, an) -> None:
    """Max over ranks of every norm of every constant's bound: one collective.

    ``an`` is the bounds pass's :class:`fxscale.runtime.Analysis` with its constants filled
    in; updated in place (``an.bounds``, ``an.quantised_consts``).
    """
    consts = [k for k in sorted(an.consts) if isinstance(an.bounds.get(k), Bound)]
    qconsts = sorted(an.quantised_consts)
    flat: list[float] = []
    for k in consts:
        flat += list(_fields(an.bounds[k]))
    for k in qconsts:
        flat += list(_fields(an.quantised_consts[k][2]))
    t = torch.tensor(flat, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    vals = t.tolist()
    i = 0
    for k in consts:
        an.bounds[k] = Bound(*vals[i : i + 6])
        i += 6
    for k in qconsts:
        data, scale, _ = an.quantised_consts[k]
        an.quantised_consts[k] = (data, scale, Bound(*vals[i : i + 6]))
        i += 6


def _fields(b: Bound) -> tuple[float, ...]:
    return tuple(float(getattr(b, f)) for f in ("absmax", "rownorm", "colnorm", "rowsum", "colsum", "spectral"))

"""Which dims of the example inputs torch.export keeps dynamic, and warnings where the model's
code fixed one anyway.

By default dim 0 of every tensor input is the batch (``Dim.AUTO``); a user's
``dynamic_shapes`` (one entry per parameter of ``forward``, as torch.export takes it) is
overlaid on that. After capture, a declared dim (or the batch) that came out as a constant is
warned about: the model's code depends on it, and other sizes will fail.

>>> import torch
>>> model = torch.nn.Linear(4, 4)
>>> spec = batch_dims(model, (torch.randn(2, 4),))     # one entry per parameter of forward
>>> len(spec), spec[0][0] is torch.export.Dim.AUTO
(1, True)
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["as_auto", "batch_dims", "has_batched_tensor", "merge_dims", "warn_if_declared_dims_specialised",
           "warn_if_static_batch"]


def batch_dims(model: nn.Module, args: tuple) -> tuple:
    """``dynamic_shapes`` for export: dim 0 of every tensor with at least one dim is AUTO.

    One entry per parameter of ``forward``: the arguments a ``*args`` parameter collects
    share one entry, a tuple (export matches the spec to the signature, not to ``args``).
    """

    def one(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return {0: torch.export.Dim.AUTO}
        return None

    specs = tuple(pytree.tree_map(one, a) if not isinstance(a, torch.Tensor) else one(a) for a in args)
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read: one entry per argument
        return specs
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for i, p in enumerate(params):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return specs[:i] + (specs[i:],)
        if p.kind not in positional:
            break
    return specs


def merge_dims(model: nn.Module, args: tuple, dynamic_batch: bool, dynamic_shapes: Any) -> tuple:
    """The batch dims (where ``dynamic_batch``) overlaid with the user's ``dynamic_shapes``
    (one entry per parameter of ``forward``, as torch.export takes them)."""
    base = batch_dims(model, args) if dynamic_batch else tuple(None for _ in args)
    user = _by_position(model, len(base), dynamic_shapes)
    if len(user) != len(base):
        raise ValueError(
            f"dynamic_shapes has {len(user)} entries but the model takes {len(base)} inputs; give one "
            "per parameter of forward (a dict {dim: torch.export.Dim(...)}, a tuple of them for "
            "*args or a tuple input, or None)"
        )
    return tuple(_overlay(b, u) for b, u in zip(base, user))


def _by_position(model: nn.Module, n: int, dynamic_shapes: Any) -> tuple:
    """The user's spec, one entry per positional input: a dict keyed by forward's parameter names
    (torch.export's form) is matched by name, in any order, absent names None (its values were
    taken in order: a spec for GPT-2's input_ids and attention_mask missed the parameters between
    them, and keys out of forward's order put the dims on the wrong input; found by a user trial)."""
    if not isinstance(dynamic_shapes, dict):
        return tuple(dynamic_shapes)
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    if not dynamic_shapes or not set(dynamic_shapes) <= set(params):
        return tuple(dynamic_shapes.values())  # not keyed by parameter names
    names = params[:n]
    late = [k for k in dynamic_shapes if k not in names and dynamic_shapes[k] is not None]
    if late:
        raise ValueError(f"dynamic_shapes names {late}, which the example inputs do not give (they fill "
                         f"forward's first {n} parameters: {', '.join(names)}); pass those inputs too")
    return tuple(dynamic_shapes.get(k) for k in names)


def _overlay(base: Any, user: Any) -> Any:
    """``user``'s spec over ``base``'s, structure by structure: a dim dict (int keys) takes both
    dicts' dims; a dict input's (``{"input_ids": {1: seq}}``) or a tuple's entries are overlaid
    one by one, so the batch dims of the entries stay (they were dropped: a dict input got a
    static batch; found by a user trial on SentenceTransformer's features)."""
    if user is None:
        return base
    if isinstance(base, dict) and isinstance(user, dict):
        if all(isinstance(k, int) for k in (*base, *user)):
            return {**base, **user}
        return {k: _overlay(base.get(k), v) for k, v in user.items()} | {k: v for k, v in base.items() if k not in user}
    if isinstance(base, (list, tuple)) and isinstance(user, (list, tuple)) and len(base) == len(user):
        return type(user)(_overlay(b, u) for b, u in zip(base, user))
    return user


def as_auto(spec: Any) -> Any:
    """``spec`` with each named ``Dim`` replaced by ``Dim.AUTO`` over the same range."""
    from torch.export.dynamic_shapes import _Dim

    def one(d):
        if isinstance(d, _Dim) or type(d).__name__ in ("Dim", "_Dim"):
            lo, hi = getattr(d, "min", None), getattr(d, "max", None)
            kw = {k: v for k, v in (("min", lo), ("max", hi)) if isinstance(v, int) and abs(v) < 2**62}
            return torch.export.Dim.AUTO(**kw)
        return d

    if isinstance(spec, dict):
        return {k: as_auto(v) if isinstance(v, (dict, list, tuple)) else one(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(as_auto(v) for v in spec)
    return one(spec)


def declared_dims(arg: Any, spec: Any):
    """``(tensor leaf index, dim)`` of each dim ``spec`` declares for ``arg`` (leaves in pytree order)."""
    count = [0]

    def walk(a, sp):
        if isinstance(a, torch.Tensor):
            i = count[0]
            count[0] += 1
            if isinstance(sp, dict):
                yield from ((i, int(d)) for d in sp)
        elif isinstance(a, (list, tuple)):
            subs = sp if isinstance(sp, (list, tuple)) and len(sp) == len(a) else [None] * len(a)
            for x, y in zip(a, subs):
                yield from walk(x, y)
        elif isinstance(a, dict):
            for k in a:
                yield from walk(a[k], sp.get(k) if isinstance(sp, dict) else None)

    return list(walk(arg, spec))


def warn_if_declared_dims_specialised(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, dynamic_shapes) -> None:
    """A dim declared in ``dynamic_shapes`` that the model's code fixed to the example's size
    (export with ``Dim.AUTO`` may specialise it: a Python loop over ``x.shape[1]``, say)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    user = tuple(dynamic_shapes.values()) if isinstance(dynamic_shapes, dict) else tuple(dynamic_shapes)
    tensors = [(n.meta["shown_name"], n.meta.get("val")) for n in gm.graph.nodes
               if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]
    fixed = []
    for i, d in declared_dims(tuple(args), tuple(user)):
        if i < len(tensors):
            nm, v = tensors[i]
            if d < v.dim() and is_concrete_int(v.shape[d]):
                fixed.append(f"dim {d} of {nm!r} (fixed at {int(v.shape[d])})")
    if fixed:
        warnings.warn(
            f"{type(model).__name__}: dynamic_shapes declares {', '.join(fixed)} dynamic, but the model's code "
            "fixed it to the example's size while torch.export traced it (a Python loop or branch over that "
            "size, e.g. a scan); other sizes will fail. Transform once per size you run, or make that code "
            "size-independent.",
            stacklevel=4,
        )


def has_batched_tensor(args: tuple) -> bool:
    return any(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in pytree.tree_leaves(args))


def warn_if_static_batch(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    static = []
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    dim0 = [v.shape[0] for v in vals if isinstance(v, torch.Tensor) and v.dim() >= 1]
    # A (1,)-shaped argument beside a batch (a broadcast scale) has no batch dimension. (Never
    # int() a symbolic size here: that would specialise it.)
    others = any(not is_concrete_int(d) or int(d) != 1 for d in dim0)
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        batched = n.op == "placeholder" and isinstance(v, torch.Tensor) and v.dim() >= 1
        if batched and is_concrete_int(v.shape[0]) and int(v.shape[0]) == 1 and others:
            continue
        if batched and is_concrete_int(v.shape[0]):  # a SymInt specialised to a constant counts
            static.append(f"{n.meta['shown_name']} (batch {int(v.shape[0])})")
    if static:
        warnings.warn(
            f"{type(model).__name__}: the batch dimension of input(s) {', '.join(static)} was "
            "specialised to the example's size (the model's code depends on it, or the example batch "
            "is 0 or 1); other batch sizes will fail. Use an example batch of at least 2.",
            stacklevel=4,
        )

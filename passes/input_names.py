"""A model's inputs: example inputs given by name mapped to forward's positions
(:func:`example_args`, :func:`positional_inputs`), and the names messages use for a graph's
inputs: forward's parameters where torch.export renamed them (``input`` -> ``input_1``), kept
on each placeholder as ``meta["shown_name"]``."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["example_args", "forward_signature", "name_inputs", "positional_inputs", "shown_names"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """``model.forward``'s signature (None where Python cannot read one)."""
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def example_args(model: nn.Module, example_inputs: Any, what: str = "example_inputs") -> tuple:
    """``example_inputs`` as the tuple of ``model.forward``'s positional arguments: a tensor, a
    tuple or list of them, or a mapping of parameter names to values (a tokenizer's output, say),
    whose names are put in their positions and the parameters between filled with their defaults
    (a mapping none of whose names is a parameter of a one-argument forward is that argument).

    >>> m = torch.nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1)
    >>> src, tgt = torch.zeros(3, 2, 8), torch.zeros(4, 2, 8)
    >>> [a.shape if a is not None else a for a in example_args(m, {"src": src, "tgt": tgt, "src_mask": None})]
    [torch.Size([3, 2, 8]), torch.Size([4, 2, 8]), None]
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, Mapping):
        sig = forward_signature(model)
        if sig is None:
            raise TypeError(f"{what} is a mapping, but {type(model).__name__}.forward has no signature to map its "
                            "names to positions; pass a tuple of forward's positional arguments")
        positional = [p.name for p in sig.parameters.values() if p.kind in _POSITIONAL]
        if len(positional) == 1 and not any(k in sig.parameters for k in example_inputs):
            return (example_inputs,)  # forward(features: dict), e.g. a SentenceTransformer's
        args, rest = positional_inputs(sig, (), dict(example_inputs), what=what)
        if rest:
            name = type(model).__name__
            stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
            varargs = [stars[p.kind] + p.name for p in sig.parameters.values() if p.kind in stars]
            unknown = sorted(k for k in rest if k not in sig.parameters)
            if unknown and varargs:
                raise TypeError(
                    f"{what}: {name}.forward takes {', '.join(varargs)} (a wrapper passing its "
                    f"inputs on), so the names {unknown} have no position to go to: pass a tuple in the order it "
                    "passes them on, e.g. (input_ids,), or transform the wrapped model (a peft PeftModel: "
                    "get_peft_model(..., task_type=...) or model.get_base_model())")
            how = (f"has no parameter {unknown}" if unknown else f"takes {sorted(rest)} only by keyword, and the "
                   "graph is captured with positional inputs")
            raise TypeError(f"{what}: {name}.forward {how} (its positional parameters: {positional}); leave them "
                            "out, or wrap the model in a module whose forward takes them by position")
        return args
    raise TypeError(
        f"{what} must be a tuple of the model's positional arguments (or a dict of them by name), got "
        f"{type(example_inputs).__name__}; e.g. fxscale.transform(model, (x,))"
    )


def positional_inputs(signature: inspect.Signature | None, args: tuple = (), kwargs: dict | None = None, *,
                      upto: int | None = None, what: str = "the inputs") -> tuple[tuple, dict]:
    """``(args, kwargs)`` with each keyword argument that ``forward`` also takes by position moved
    into its place and the positional parameters skipped over filled with their defaults, up to
    the last one given (or the ``upto``-th). What is left in ``kwargs``: names not positional.

    >>> def f(a, b=None, c=2, *, d=0): ...
    >>> positional_inputs(inspect.signature(f), (1,), {"c": 3, "d": 4})
    ((1, None, 3), {'d': 4})
    """
    kwargs = dict(kwargs or {})
    if signature is None:
        return tuple(args), kwargs
    params = []
    for p in signature.parameters.values():
        if p.kind not in _POSITIONAL:
            break
        params.append(p)
    names = [p.name for p in params]
    last = max([len(args), upto or 0] + [names.index(k) + 1 for k in kwargs if k in names])
    out = list(args)
    for p in params[len(args):last]:
        if p.name in kwargs:
            out.append(kwargs.pop(p.name))
        elif p.default is not inspect.Parameter.empty:
            out.append(p.default)
        else:
            raise TypeError(f"{what}: no value for {p.name!r}, which forward needs")
    return tuple(out), kwargs


def name_inputs(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Each input placeholder's ``meta["shown_name"]``: the name messages use for it."""
    sig = forward_signature(model)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    shown = shown_names(names, sig)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            n.meta["shown_name"] = shown[n.name]


def shown_names(inputs: list[str], signature: inspect.Signature | None) -> dict[str, str]:
    """Graph input name -> the name to show in messages: forward's parameter where torch.export
    renamed it (``input`` -> ``input_1``, a Python builtin).

    >>> import inspect
    >>> shown_names(["input_1", "x"], inspect.Signature([inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD)]))
    {'input_1': 'input', 'x': 'x'}
    """
    params = set(signature.parameters) if signature is not None else set()
    out = {}
    for n in inputs:
        m = re.fullmatch(r"(.+)_\d+", n)
        out[n] = m.group(1) if n not in params and m and m.group(1) in params and m.group(1) not in inputs else n
    return out

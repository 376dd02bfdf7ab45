"""The names messages use for a graph's inputs: forward's parameters where torch.export renamed
them (``input`` -> ``input_1``), kept on each placeholder as ``meta["shown_name"]``."""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

__all__ = ["name_inputs", "shown_names"]


def name_inputs(gm: torch.fx.GraphModule, model: nn.Module) -> None:
    """Each input placeholder's ``meta["shown_name"]``: the name messages use for it."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        sig = None
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

"""Comparison points that users would pick instead of fxscale.

:func:`linear_only_baseline` quantises what torchao-style tools quantise: the operands of
``nn.Linear`` / ``nn.Conv*`` modules (and transformers' ``Conv1D``, GPT-2's linear), each
per tensor with its own run-time amax; everything else (attention matmuls, embeddings,
normalisation, activations) runs in the model's precision. (``fxscale.dynamic_baseline``
is the other point: per-tensor dynamic scaling of every matmul-like op fxscale quantises.)

>>> import torch, fxscale
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
>>> run = fxscale.linear_only_baseline(model, (torch.randn(2, 16),), format="int8")
>>> x = torch.randn(3, 16)
>>> run(x).shape, fxscale.sqnr_db(model(x), run(x)) > 20
(torch.Size([3, 4]), True)
>>> run.modules                      # what it quantises, by qualified name
['0', '2']
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .formats import Format, get_format

__all__ = ["LinearOnly", "linear_only_baseline"]


def fake_quant(t: Tensor, fmt: Format) -> Tensor:
    """``t`` rounded to ``fmt`` with a per-tensor power-of-two scale from its own amax, back in ``t.dtype``."""
    s = fmt.scale_for(float(t.detach().abs().max()) if t.numel() else 0.0)
    return (fmt.cast(t.float() / s).float() * s).to(t.dtype)


def _is_linear_like(mod: nn.Module) -> bool:
    """nn.Linear, nn.Conv1d/2d/3d (and transposed), and transformers' ``Conv1D`` (x @ W + b)."""
    if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
        return True
    cls = type(mod)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


class LinearOnly:
    """The callable :func:`linear_only_baseline` returns: ``run(*inputs)`` is ``model(*inputs)``
    with each listed module's input and weight fake-quantised per tensor.

    ``modules``: the qualified names of the modules it quantises (those of a linear-like
    type that ran on the example inputs).
    """

    def __init__(self, model: nn.Module, names: list[str], fmt: Format):
        self.model = model
        self.fmt = fmt
        self.modules = names
        mods = dict(model.named_modules())
        self._mods = [mods[n] for n in names]
        # Weights are fixed at inference: quantised once (per tensor, as at run time).
        with torch.no_grad():
            self._weights = [nn.Parameter(fake_quant(m.weight, fmt), requires_grad=False) for m in self._mods]

    def _quantise_input(self, mod: nn.Module, args: tuple, kwargs: dict):
        if args and isinstance(args[0], Tensor) and args[0].is_floating_point():
            return (fake_quant(args[0], self.fmt), *args[1:]), kwargs
        if isinstance(kwargs.get("input"), Tensor) and kwargs["input"].is_floating_point():
            return args, {**kwargs, "input": fake_quant(kwargs["input"], self.fmt)}
        return args, kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        hooks = [m.register_forward_pre_hook(self._quantise_input, with_kwargs=True) for m in self._mods]
        swapped: list[tuple[nn.Module, Any]] = []
        try:
            # Swapped per module, not per Parameter: a weight tied elsewhere (an embedding
            # sharing the LM head's weight) keeps its full precision there.
            for m, w in zip(self._mods, self._weights):
                if parametrize.is_parametrized(m, "weight"):
                    # A computed weight (weight norm): one more parametrization, returning
                    # the quantised value, appended for the call and popped after.
                    m.parametrizations["weight"].append(_Constant(w))
                    swapped.append((m, None))
                else:
                    swapped.append((m, m._parameters["weight"]))
                    m._parameters["weight"] = w
            return self.model(*args, **kwargs)
        finally:
            for m, w in swapped:
                if w is None:
                    del m.parametrizations["weight"][-1]
                else:
                    m._parameters["weight"] = w
            for h in hooks:
                h.remove()


class _Constant(nn.Module):
    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value

    def forward(self, _x: Tensor) -> Tensor:
        return self.value


def linear_only_baseline(
    model: nn.Module,
    example_inputs: Any,
    *,
    format: str | torch.dtype | Format = torch.float8_e4m3fn,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> LinearOnly:
    """Linear-only per-tensor dynamic quantisation of ``model`` (torchao-style), as a callable.

    Each ``nn.Linear`` / ``nn.Conv*`` / transformers ``Conv1D`` module that runs on
    ``example_inputs`` (one eager call finds them) gets its input quantised to ``format``
    with the input's own run-time amax, and its weight with the weight's amax (power-of-two
    scales, as fxscale's). ``filter_fn(module, qualified_name)`` can exclude modules, as
    torchao's does. The model itself is not modified; nothing is captured or traced.
    Warns where nothing is quantised (a model without such modules, or whose linear layers
    are called functionally, as ``nn.MultiheadAttention``'s in-projection is).
    """
    from passes.input_names import example_args

    fmt = get_format(format)
    args = example_args(model, example_inputs)  # a dict (a tokenizer's output) as transform takes it
    candidates = {
        name: m
        for name, m in model.named_modules()
        if _is_linear_like(m) and isinstance(getattr(m, "weight", None), Tensor)
        and (filter_fn is None or filter_fn(m, name))
    }
    ran: list[str] = []
    by_id = {id(m): name for name, m in candidates.items()}

    def seen(mod, _args):
        name = by_id[id(mod)]
        if name not in ran:
            ran.append(name)

    hooks = [m.register_forward_pre_hook(seen) for m in candidates.values()]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in hooks:
            h.remove()
    order = list(candidates)
    names = sorted(ran, key=order.index)
    if not names:
        warnings.warn(
            f"linear_only_baseline: no nn.Linear / nn.Conv module of {type(model).__name__} ran on the "
            "example inputs, so nothing is quantised (the baseline equals the model)",
            stacklevel=2,
        )
    return LinearOnly(model, names, fmt)

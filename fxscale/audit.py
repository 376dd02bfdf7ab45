"""``audit``: measure how close every scale of a transformed graph comes to saturating.

Runs a transformed GraphModule under a ``torch.fx.Interpreter`` and, for every
``fxscale.quantise`` node and every ``fxscale.scaled_linear`` that writes low-precision data
(``out_fmt`` set), measures the *saturation ratio*

    max |high-precision value| / (scale * format max)

on the given inputs. A ratio above 1 means the value was clamped by its scale. For a static
scale (a constant buffer, proven at compile time) that is a soundness bug whenever the inputs
are within their declared bounds; a run-time scale (``ScaleFn`` or a run-time amax) should
never exceed 1 either. ``fxscale.scaled_linear_requantise`` rows (scale from the result's
own amax) are included as run-time rows.

>>> import torch, fxscale
>>> from fxscale.api import transform
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
>>> sm = transform(model, (torch.randn(4, 8),), input_bounds=3.0)
>>> rows = fxscale.audit(sm, torch.full((2, 8), 3.0))
>>> all(r["ratio"] <= 1 for r in rows), sorted({r["static"] for r in rows})
(True, [True])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, fx

from .formats import get_format
from .ops import _linear_ref

__all__ = ["audit"]

_fx = torch.ops.fxscale


def _amax(x: Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return float(x.detach().to(torch.float32).abs().amax())


class _Auditor(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.rows: list[dict[str, Any]] = []

    def _row(self, n: fx.Node, kind: str, value: Tensor, scale: Tensor, fmt: str, scale_node: Any) -> None:
        f = get_format(fmt)
        s = float(scale)
        amax = _amax(value)
        ratio = amax / (s * f.max) if s > 0 else (0.0 if amax == 0 else math.inf)
        static = isinstance(scale_node, fx.Node) and scale_node.op == "get_attr"
        self.rows.append(
            {
                "node": n.name,
                "op": kind,
                "format": f.name,
                "scale": s,
                "amax": amax,
                "ratio": ratio,
                "static": static,
                "scale_source": "static" if static else "run-time",
            }
        )

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op != "call_function":
            return out
        if n.target is _fx.quantise.default:
            x, scale, fmt = self.fetch_args_kwargs_from_env(n)[0][:3]
            self._row(n, "quantise", x, scale, fmt, n.args[1])
        elif n.target is _fx.scaled_linear.default:
            args = self.fetch_args_kwargs_from_env(n)[0]
            x, xs, w, ws, bias, act, out_scale, out_fmt = args[:8]
            if out_fmt is not None:
                y = _linear_ref(x, xs, w, ws, bias, act)
                self._row(n, "scaled_linear", y, out_scale, out_fmt, n.args[6])
        elif n.target is _fx.scaled_linear_requantise.default:
            x, xs, w, ws, bias, act, out_fmt = self.fetch_args_kwargs_from_env(n)[0][:7]
            y = _linear_ref(x, xs, w, ws, bias, act)
            self._row(n, "scaled_linear_requantise", y, out[1], out_fmt, None)
        return out


def audit(sm: fx.GraphModule, *inputs: Any) -> list[dict[str, Any]]:
    """Saturation ratios of every low-precision store of ``sm`` on ``inputs``.

    ``sm``: a GraphModule from :func:`fxscale.api.transform`; ``inputs``: its positional
    inputs (flattened like the graph's placeholders). The input-bound check of
    ``ScaledGraphModule.__call__`` is not applied: the graph runs on the inputs as given.

    Returns one dict per ``fxscale.quantise`` / low-precision ``scaled_linear`` node executed:
    ``node``, ``op``, ``format``, ``scale`` (float), ``amax`` (max |high-precision value|),
    ``ratio`` (``amax / (scale * format max)``; > 1: saturated; NaN if the value held NaN),
    ``static`` (bool: the scale is a compile-time constant) and ``scale_source``
    (``"static"`` or ``"run-time"``).
    """
    leaves = list(torch.utils._pytree.tree_leaves(inputs))
    placeholders = [n for n in sm.graph.nodes if n.op == "placeholder"]
    args = leaves if len(leaves) == len(placeholders) else list(inputs)
    interp = _Auditor(sm)
    with torch.no_grad():
        try:
            interp.run(*args)
        except AssertionError as e:  # export's input guard: the module's own call says what is off
            if "Guard failed" not in str(e):
                raise
            sm(*inputs)
            raise
    return interp.rows

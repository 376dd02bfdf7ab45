"""Calibrate: record what each node of a captured graph really holds on sample inputs.

:class:`Calibrator` is a ``torch.fx.Interpreter`` that, for every node whose output is a
floating-point tensor, records ``(max |x|, max L2 norm of a row along the last dim)`` as
Python floats, maxed over all batches, in ``fxscale.nodeinfo.info(node).observed``. Nodes
with several outputs (a tuple / list of tensors) also get ``observed_list``: one
pair per element (``None`` for non-float elements), and ``observed`` is then the
elementwise max over the float elements. Integer, boolean and SymInt outputs, and the
output node, record nothing. A 0-d tensor's row norm is its absolute value; an empty
tensor records ``(0.0, 0.0)``. ±Inf produced by a node is recorded as ``inf``; NaN raises
``ValueError`` naming the first node that produced it (or the input that carried it), and so
does ±Inf in an input.

>>> import torch
>>> from passes.capture import capture
>>> from fxscale.nodeinfo import info
>>> gm = capture(torch.nn.Sequential(torch.nn.ReLU()), (torch.tensor([[3.0, -4.0]]),))
>>> calibrate(gm, [(torch.tensor([[3.0, -4.0]]),)])
>>> [(n.name, info(n).observed) for n in gm.graph.nodes if n.op != "output"][-1]
('relu', (3.0, 3.0))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from fxscale.nodeinfo import info

__all__ = ["CalibrationError", "Calibrator", "calibrate", "tensor_stats"]


class CalibrationError(RuntimeError):
    """A node failed while running the calibration inputs; the message names it."""


def tensor_stats(t: torch.Tensor) -> tuple[float, float]:
    """``(max |t|, max L2 norm along the last dim)`` of a floating-point tensor, as floats.

    NaN propagates (the caller checks). Norms are computed in float32, and again in float64
    where float32 overflows on finite values.

    >>> tensor_stats(torch.tensor([[3.0, -4.0], [1.0, 0.0]]))
    (4.0, 5.0)
    """
    t = t.detach()
    if t.numel() == 0:
        return 0.0, 0.0
    x = t if t.dtype in (torch.float32, torch.float64) else t.float()
    a = x.abs()
    if x.dim() == 0:
        v = float(a)
        return v, v
    absmax = float(a.amax())
    if math.isnan(absmax):
        return absmax, absmax
    rownorm = float(torch.linalg.vector_norm(x, dim=-1).amax())
    if (math.isinf(rownorm) or rownorm < absmax) and math.isfinite(absmax):
        # float32 squares over- or underflowed (|x| > 1e19 or < 1e-19): float64, scaled
        s = absmax if absmax > 0 else 1.0
        rownorm = s * float(torch.linalg.vector_norm(x.double() / s, dim=-1).amax())
    return absmax, rownorm


def _is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _maxpair(a: tuple[float, float] | None, b: tuple[float, float] | None):
    if a is None:
        return b
    if b is None:
        return a
    return (max(a[0], b[0]), max(a[1], b[1]))


class Calibrator(Interpreter):
    """An fx Interpreter that records observed statistics per node (see the module docstring).

    Call :meth:`run` once per batch; statistics accumulate as a max over runs.
    """

    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # we name the node ourselves

    def run_node(self, n: Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:
            raise CalibrationError(
                f"calibration failed at node {n.format_node()}: {type(e).__name__}: {e}"
                f"{_where(n)}\nCheck that the calibration batches have the example inputs' structure, "
                "dtypes and non-batch shapes."
            ) from e
        if n.op == "output":
            return out
        if n.op == "get_attr":
            # Constants: the bounds pass measures them exactly (and only once); no need here.
            return out
        if _in_flight(n):
            return out  # a collective's result is valid only after its wait_tensor
        self._record(n, out)
        return out

    def _record(self, n: Node, out: Any) -> None:
        if _is_float_tensor(out):
            stats = tensor_stats(out)
            self._check(n, stats)
            ni = info(n)
            ni.observed = _maxpair(ni.observed, stats)
        elif isinstance(out, (tuple, list)) and any(_is_float_tensor(o) for o in out):
            ni = info(n)
            prev = ni.observed_list or [None] * len(out)
            cur = []
            for i, o in enumerate(out):
                s = None
                if _is_float_tensor(o):
                    s = tensor_stats(o)
                    self._check(n, s, index=i)
                cur.append(_maxpair(prev[i] if i < len(prev) else None, s))
            ni.observed_list = cur
            total = None
            for s in cur:
                total = _maxpair(total, s)
            ni.observed = total

    @staticmethod
    def _check(n: Node, stats: tuple[float, float], index: int | None = None) -> None:
        if n.op == "placeholder" and math.isinf(stats[0]):
            raise ValueError(
                f"calibration input {n.meta.get('shown_name', n.name)!r} holds Inf: the example and calibration inputs must be "
                "finite (they project wasted bits and feed the self-check); drop or clean that batch. "
                "At run time, Inf inputs propagate (or raise with nonfinite='raise')."
            )
        if math.isnan(stats[0]) or math.isnan(stats[1]):
            what = "input" if n.op == "placeholder" else "node"
            elem = "" if index is None else f" (output element {index})"
            raise ValueError(
                f"NaN in calibration at {what} {n.format_node()}{elem}{_where(n)}\n"
                + (
                    "The calibration data contains NaN: clean it or drop that batch."
                    if n.op == "placeholder"
                    else "This node produced NaN from finite inputs: check the model on these "
                    "inputs (run it in float32 eagerly) or drop that batch."
                )
            )


def _in_flight(n: Node) -> bool:
    """A functional collective (``_c10d_functional.all_reduce`` ...), before its ``wait_tensor``."""
    return (
        n.op == "call_function"
        and getattr(n.target, "namespace", None) == "_c10d_functional"
        and n.target is not torch.ops._c10d_functional.wait_tensor.default
    )


def _where(n: Node) -> str:
    st = n.meta.get("stack_trace")
    if not st:
        return ""
    lines = [ln.strip() for ln in st.strip().splitlines() if ln.strip()]
    return f"\n(model code: {' / '.join(lines[-2:])})" if lines else ""


def calibrate(gm: GraphModule, batches: Iterable[tuple], *, reset: bool = True) -> None:
    """Run ``gm`` on each batch (a tuple of positional inputs) and record per-node statistics.

    With ``reset=True`` (default) earlier observations are cleared first; otherwise the new
    batches extend them (max). Writes only ``node.meta["fxscale"]``.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate needs at least one batch, e.g. calibrate(gm, [example_inputs])")
    if reset:
        for n in gm.graph.nodes:
            ni = info(n)
            ni.observed = None
            ni.observed_list = None
    # A forward that updates buffers (a step counter, running stats) must leave them as they
    # were: calibration observes the model, it does not run it for real (issue 11 case 18).
    saved = {k: v.detach().clone() for k, v in gm.named_buffers()}
    try:
        _run_batches(gm, batches, lambda: _restore_buffers(gm, saved))
    finally:
        _restore_buffers(gm, saved)


def _restore_buffers(gm: GraphModule, saved: dict[str, torch.Tensor]) -> None:
    for name, v in saved.items():
        mod_name, _, attr = name.rpartition(".")
        mod = gm.get_submodule(mod_name) if mod_name else gm
        cur = mod._buffers.get(attr)
        if cur is not None and cur.shape == v.shape and cur.dtype == v.dtype:
            with torch.no_grad():
                cur.copy_(v)
        else:
            mod._buffers[attr] = v


def _run_batches(gm: GraphModule, batches: list, reset_state) -> None:
    interp = Calibrator(gm)
    with torch.no_grad():
        for i, b in enumerate(batches):
            if isinstance(b, torch.Tensor):
                b = (b,)
            elif isinstance(b, list):
                b = tuple(b)
            if not isinstance(b, tuple):
                raise TypeError(
                    f"calibration batch {i} must be a tuple of the model's positional inputs, "
                    f"got {type(b).__name__}"
                )
            reset_state()  # every batch starts from the state the model had
            interp.run(*b)
    # A tensor-parallel graph: the same statistics on every rank (a no-op without collectives).
    from .distributed import agree_observed

    agree_observed(gm)

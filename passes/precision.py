"""Precision demand: which matmuls may compute on low-precision operands (DESIGN decision 9).

A backward walk over the calibrated graph. Each consumer states the *absolute* error it
tolerates in each of its inputs, given what its own output tolerates; a value's demand is
the smallest tolerance over its consumers (``max |x|`` below is the calibration's observed
value, ``s`` the format's relative rounding step, 2^-4 in e4m3, 2^-8 in int8):

* a graph output, and a matmul operand, tolerate the format's step: ``s * max|x|``;
* ``sin`` / ``cos`` pass on the absolute error their output tolerates (``|d sin| <= |dx|``),
  ``exp`` divides it by its output's max (``exp(x + d) = exp(x) (1 + d)``), softmax by twice
  its output's max; so an argument bounded by ``B`` needs a relative error below ~``1/B``;
* integer, index and selection arithmetic (casts to integers, ``floor``/``round``,
  ``remainder``, ``argmax``/``topk``/``sort``) tolerates none;
* additions, shape ops and exact moves pass the error on;
* every other op (products, ReLU, GELU, normalisations, reductions, ...) keeps the *relative*
  error: ``tolerance(in) = tolerance(out) * max|in| / max|out|`` (a product ``x * y`` adds
  its factors' relative errors, elementwise: a gated MLP's ``act(gate) * up`` asks of ``up``
  what its output is asked, not that divided by ``max |act(gate)|``).

Normalisation statistics (LayerNorm, RMSNorm, BatchNorm) and softmax are computed inside
their ops in the model's precision, and fxscale stores only matmul operands in the low-precision
format: the values feeding them are never rounded, and their demand reaches the matmuls before.

A matmul-like node is then quantised only where it pays and where its output tolerates what
low-precision operands do to it (about ``s * max|out|``, within a factor :data:`SLACK`):
an outer product (K = 1) never pays; a rotary embedding's ``inv_freq @ positions`` feeds
``cos``/``sin`` of angles up to the sequence length and stays high precision; so do
attention scores feeding a softmax where they exceed ~1. The decision and its reason go
into each matmul's record (``precision``, ``precision_why``); every float value gets its
``demand`` (tolerated error relative to its observed max |x|).

>>> import torch
>>> from passes.capture import capture
>>> from passes.calibrate import calibrate
>>> from fxscale.formats import get_format
>>> class Rotary(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16.0))
...     def forward(self, pos):  # pos: (B, S) float positions
...         f = self.inv_freq[None, :, None] @ pos[:, None, :]      # (B, 8, S), K = 1
...         return f.transpose(1, 2).cos()
>>> gm = capture(Rotary(), (torch.arange(64.0).expand(2, 64),))
>>> calibrate(gm, [(torch.arange(64.0).expand(2, 64),)])
>>> decisions = decide(gm, get_format("e4m3"))
>>> [(name, why.split(":")[0]) for name, why in decisions.items()]
[('matmul', 'high precision')]
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor, fx

from fxscale.formats import Format
from fxscale.nodeinfo import info
from fxscale.rules import lookup

from .bounds import concrete_shape, operand_names, operand_positions

aten = torch.ops.aten

__all__ = ["SLACK", "decide", "matmul_k"]

#: A matmul is quantised where its output tolerates at least ``s * max|out| / SLACK``:
#: the worst-case rounding of the operands, within a factor 2 (rounding errors of a dot
#: product partly cancel; a factor of 2047, as in a rotary embedding, does not).
SLACK = 2.0

#: Consumers that turn a float into an integer or a selection: they tolerate no error.
_EXACT = {
    aten.floor.default, aten.ceil.default, aten.round.default, aten.round.decimals, aten.trunc.default,
    aten.frac.default, aten.remainder.Tensor, aten.remainder.Scalar, aten.fmod.Tensor, aten.fmod.Scalar,
    aten.floor_divide.default, aten.floor_divide.Scalar, aten.argmax.default, aten.argmin.default,
    aten.topk.default, aten.sort.default, aten.sort.stable, aten.argsort.default, aten.argsort.stable,
    aten.max.dim, aten.min.dim, aten.kthvalue.default, aten.bucketize.Tensor, aten.searchsorted.Tensor,
}
_SHAPE_QUERIES = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default}
_PERIODIC = {aten.sin.default, aten.cos.default}
_EXP = {aten.exp.default, aten.exp2.default, aten.expm1.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_LOG_SOFTMAX = {aten.log_softmax.int, aten._log_softmax.default}
_ADDITIVE = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar,
             aten.rsub.Tensor, aten._to_copy.default, aten.to.dtype, aten.type_as.default}
_DIV = {aten.div.Tensor, aten.div.Scalar}
#: 1-Lipschitz selections: what passes through is the input itself, so an error in it passes at
#: most as large; they tolerate the larger of that and the relative rule (a ``masked_fill(mask,
#: finfo.min)`` output's max |x| is the fill: the relative rule alone made attention scores
#: tolerate 1e-41 and kept every DeBERTa score matmul in float32)
_SELECTION = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther,
              aten.where.ScalarSelf, aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default,
              aten.clamp_max.default, aten.maximum.default, aten.minimum.default, aten.relu.default,
              aten.hardtanh.default}


def matmul_k(node: fx.Node) -> int | None:
    """The contraction length of a matmul-like node (C_in/groups * kernel size for a conv)."""
    names = operand_names(node.target)
    if names is None:
        return None
    schema = [a.name for a in node.target._schema.arguments]
    i = schema.index(names[0])
    a = node.args[i] if i < len(node.args) else None
    shape = concrete_shape(a.meta.get("val")) if isinstance(a, fx.Node) else None
    if node.target in (aten.conv2d.default, aten.conv2d.padding, aten.conv_transpose2d.input,
                       aten.conv_transpose1d.default):
        w = node.args[1] if len(node.args) > 1 else None
        ws = concrete_shape(w.meta.get("val")) if isinstance(w, fx.Node) else None
        if not ws:
            return None
        # (C_out, C_in/g, k...); transposed (C_in, C_out/g, k...): every input channel, all taps (at most)
        return math.prod(ws[1:]) if "transpose" not in str(node.target) else ws[0] * math.prod(ws[2:])
    return shape[-1] if shape else None


def _amax(node: Any) -> float | None:
    if not isinstance(node, fx.Node):
        return None
    obs = info(node).observed
    return None if obs is None else float(obs[0])


def _div(a: float, b: float | None) -> float:
    if b is None or math.isnan(b):
        return a
    if b == 0:
        return math.inf
    return a / b if math.isfinite(b) else (0.0 if math.isfinite(a) else a)


def _tolerance(n: fx.Node, a: fx.Node, e_out: float, fmt: Format) -> tuple[float, str]:
    """(absolute error ``n`` tolerates in its input ``a``, a short reason) given ``e_out``."""
    t = n.target
    if operand_names(t) is not None and a in _operands(n):
        return fmt.rel_rounding * (_amax(a) or 0.0), "matmul operand"
    if t in _SHAPE_QUERIES:
        return math.inf, ""
    if t in _EXACT:
        return 0.0, "integer / selection arithmetic"
    if t is operator.getitem:
        return e_out, ""
    rule = lookup(t)
    if t in _ADDITIVE or (rule is not None and rule.exact):
        return e_out, ""
    if t in _PERIODIC:
        return e_out, "periodic"
    if t in _EXP:
        return _div(e_out, _amax(n)), "exp"
    if t in _SOFTMAX:  # p_i (1 + d_i - sum_j p_j d_j): relative 2 max|d|
        return _div(e_out, 2 * (_amax(n) or 0.0)), "softmax"
    if t in _LOG_SOFTMAX:
        return e_out / 2, "log_softmax"
    if t in _DIV and n.kwargs.get("rounding_mode") is not None:
        return 0.0, "integer / selection arithmetic"
    # Everything else keeps the relative error: tolerance(in) = tolerance(out) * max|in| / max|out|.
    if math.isinf(e_out):
        return e_out, ""
    relative = _div(e_out * (_amax(a) or 0.0), _amax(n))
    if t in _SELECTION:  # what passes through is the input: its error passes at most as large
        return max(relative, e_out), ""
    return relative, ""


def _operands(n: fx.Node) -> list[fx.Node]:
    names = operand_names(n.target)
    schema = [x.name for x in n.target._schema.arguments]
    return [n.args[i] for i, s in enumerate(schema) if s in names and i < len(n.args) and isinstance(n.args[i], fx.Node)]


def _is_int_cast(n: fx.Node) -> bool:
    val = n.meta.get("val")
    return (n.target in (aten._to_copy.default, aten.to.dtype) and isinstance(val, Tensor)
            and not val.dtype.is_floating_point)


def decide(gm: fx.GraphModule, fmt: Format) -> dict[str, str]:
    """Write each float node's ``demand`` and each matmul's ``precision`` decision; returns
    ``{matmul name: why}`` for the matmuls kept in high precision.

    Needs calibration (``observed`` on every float node); a node without one passes demands on.
    """
    nodes = list(gm.graph.nodes)
    err: dict[fx.Node, float] = {}
    source: dict[fx.Node, tuple[fx.Node, str]] = {}  # the consumer that set the demand, and why

    def demand(v: fx.Node, e: float, by: fx.Node, why: str) -> None:
        if e < err.get(v, math.inf):
            err[v] = e
            source[v] = (by, why)

    for n in reversed(nodes):
        if n.op == "output":
            for a in n.all_input_nodes:
                demand(a, fmt.rel_rounding * (_amax(a) or 0.0), n, "graph output")
            continue
        if n.op != "call_function":
            continue
        e_out = err.get(n, math.inf)
        for a in n.all_input_nodes:
            if _is_int_cast(n):
                demand(a, 0.0, n, "integer / selection arithmetic")
                continue
            e, why = _tolerance(n, a, e_out, fmt)
            if math.isnan(e):
                e = 0.0
            demand(a, e, n, why)

    for n in nodes:
        amax = _amax(n)
        if n in err and amax is not None:
            info(n).demand = _div(err[n], amax)

    high: dict[str, str] = {}
    for n in nodes:
        if n.op == "call_function" and "conv_transpose3d" in str(n.target):  # said, not silently left
            why = "high precision: no float8 kernel for a 3-D transposed convolution yet (its bound is proven)"
            info(n).precision, info(n).precision_why = "high", why
            high[n.name] = why
            continue
        if n.op != "call_function" or not operand_positions(n):
            continue
        ni = info(n)
        k = matmul_k(n)
        amax = _amax(n)
        if amax is not None and not math.isfinite(amax):
            amax = None  # -inf from a mask added in the op (baddbmm): the product's own rounding is finite
        e = err.get(n, math.inf)
        if k == 1:
            why = ("high precision: an outer product (K=1) never pays: nothing to reduce, and the operands' "
                   "rounding goes straight to the output")
        elif amax is not None and e < fmt.rel_rounding * amax / SLACK:
            why = (f"high precision: {_chain(n, source)} tolerates an error of {e:.3g} in this output "
                   f"(max |x| {amax:.3g}); {fmt.name} operands would err by ~{fmt.rel_rounding * amax:.3g}")
        else:
            ni.precision, ni.precision_why = "low", ""
            continue
        ni.precision, ni.precision_why = "high", why
        high[n.name] = why
    return high


_ORIGINS = ("matmul operand", "graph output", "integer / selection arithmetic")


def _chain(n: fx.Node, source: dict[fx.Node, tuple[fx.Node, str]], limit: int = 12) -> str:
    """Where ``n``'s demand comes from: ``topk (integer / selection arithmetic) via softmax``."""
    via: list[str] = []
    cur = n
    for _ in range(limit):
        if cur not in source:
            break
        by, why = source[cur]
        name = by.name if by.op != "output" else "the graph output"
        if why in _ORIGINS or by not in source:
            return f"{name} ({why or 'consumer'})" + (f" via {', '.join(via)}" if via else "")
        via.append(f"{name} ({why})" if why else name)
        cur = by
    return "its consumers" + (f" (via {', '.join(via)})" if via else "")

"""The custom ops that transformed graphs call: ``torch.ops.fxscale.*``.

Each op has a reference implementation (used on the CPU, and on any device without a
faster kernel) and a fake implementation, so graphs that call them can be exported and
``torch.compile``d. Faster device kernels register themselves in :mod:`fxscale.kernels`.

Conventions shared by every op:

* a scaled value travels as ``data`` (a tensor in a low-precision format) and ``scale``
  (a 0-d float32 tensor): the value is ``data * scale``;
* ``fmt`` is a format name from :data:`fxscale.formats.FORMATS`;
* weights are stored ``(N, K)`` row-major like ``nn.Linear.weight`` (so ``w.t()`` is the
  column-major ``(K, N)`` operand that ``torch._scaled_mm`` wants);
* ``activation`` is one of :data:`ACTIVATIONS`, applied after bias, before the output cast;
* matmuls accumulate in float32 (float64 on the CPU for integer formats: exact).

>>> import torch, fxscale.ops
>>> x = torch.tensor([[1.0, -2.0]])
>>> d = torch.ops.fxscale.quantise(x, torch.tensor(0.5), "float8_e4m3fn")
>>> torch.ops.fxscale.dequantise(d, torch.tensor(0.5), torch.float32)
tensor([[ 1., -2.]])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .formats import get_format

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")


def apply_activation(y: Tensor, activation: str) -> Tensor:
    """Apply one of :data:`ACTIVATIONS` to ``y``."""
    if activation == "none":
        return y
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "silu":
        return F.silu(y)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _upcast(data: Tensor) -> Tensor:
    """Data to the type the reference accumulates in (exact for every format)."""
    return data.to(torch.float32 if data.dtype.is_floating_point else torch.float64)


def row_stats(y: Tensor) -> Tensor:
    """``[max |y|, max L2 norm along the last dim]`` over the *finite* elements of ``y``, as a
    float32 tensor of 2.

    NaN / Inf elements are left out: a scale measured from them would turn every row NaN, where
    float32 keeps the other rows (issue 11 case 16); the non-finite elements themselves stay
    non-finite through the quantise (NaN in e4m3fn, Inf in e5m2; integer formats raise). Each
    row is scaled by a power of two near its own max before squaring, so row norms neither
    underflow (|y| ~ 1e-25: case 12) nor overflow (|y| ~ 1e20).
    """
    y32 = y.detach().to(torch.float32)
    if y32.numel() == 0:
        return torch.zeros(2, dtype=torch.float32, device=y.device)
    if y32.dim() == 0:
        y32 = y32.reshape(1)
    a = torch.where(torch.isfinite(y32), y32.abs(), 0.0)
    rmax = a.amax(dim=-1)
    # 2^-e with 2^e <= rmax (exponent clamped into float32's normal range): a * s < 2, so the
    # squares sum to at most 4 D, and the rescale happens in float64 on one number per row.
    e = torch.floor(torch.log2(rmax)).clamp(-126, 126)
    s = torch.exp2(-e)
    ss = (a * s.unsqueeze(-1)).square().sum(dim=-1)
    rn = (ss.double().sqrt() / s.double()).amax()
    return torch.stack([rmax.amax(), rn.to(torch.float32)])


# ---------------------------------------------------------------------------- quantise
# quantise / dequantise / stats are CompositeImplicitAutograd: they show up by name in the
# transformed GraphModule, and decompose into plain aten ops when exported or compiled, so
# inductor fuses them into their neighbours (the cast into the producer's epilogue).
_lib = torch.library.Library("fxscale", "FRAGMENT")
_lib.define("quantise(Tensor x, Tensor scale, str fmt) -> Tensor")
_lib.define("dequantise(Tensor data, Tensor scale, ScalarType out_dtype) -> Tensor")
_lib.define("stats(Tensor x) -> Tensor")
_lib.define("scale_from_amax(Tensor amax, str fmt) -> Tensor")


def quantise(x: Tensor, scale: Tensor, fmt: str) -> Tensor:
    """``data = cast(x / scale)`` into ``fmt`` (saturating; NaN/Inf stay non-finite)."""
    return get_format(fmt).cast(x.to(torch.float32) / scale)


def dequantise(data: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``data * scale`` in ``out_dtype``."""
    return (data.to(torch.float32) * scale).to(out_dtype)


def stats(x: Tensor) -> Tensor:
    """Run-time ``[max |x|, max row L2 norm]`` (one pass): the measurement behind a dynamic scale."""
    return row_stats(x)


def scale_from_amax(amax: Tensor, fmt: str) -> Tensor:
    """The power-of-two scale that fits ``amax`` into ``fmt`` (computed on device, no sync)."""
    return get_format(fmt).scale_tensor(amax)


_lib.impl("quantise", quantise, "CompositeImplicitAutograd")
_lib.impl("scale_from_amax", scale_from_amax, "CompositeImplicitAutograd")
_lib.impl("dequantise", dequantise, "CompositeImplicitAutograd")
_lib.impl("stats", stats, "CompositeImplicitAutograd")


# ---------------------------------------------------------------------------- linear
def _linear_ref(x, x_scale, w, w_scale, bias, activation) -> Tensor:
    acc = torch.matmul(_upcast(x), _upcast(w).t()).to(torch.float32)
    y = acc * (x_scale * w_scale)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return apply_activation(y, activation)


@torch.library.custom_op("fxscale::scaled_linear", mutates_args=())
def scaled_linear(
    x: Tensor,
    x_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    activation: str,
    out_scale: Tensor | None,
    out_fmt: str | None,
    out_dtype: torch.dtype,
    residual: Tensor | None = None,
) -> Tensor:
    """``act(x @ w.T * x_scale * w_scale + bias) + residual``; x ``(..., K)``, w ``(N, K)``,
    residual (optional) of the result's shape.

    With ``out_fmt`` the result is quantised with the static ``out_scale`` and returned as
    data in ``out_fmt``; otherwise it is returned in ``out_dtype``.
    """
    y = _linear_ref(x, x_scale, w, w_scale, bias, activation)
    if residual is not None:
        y = y + residual.to(torch.float32)
    if out_fmt is not None:
        return get_format(out_fmt).cast(y / out_scale)
    return y.to(out_dtype)


@scaled_linear.register_fake
def _(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual=None):
    dt = get_format(out_fmt).dtype if out_fmt is not None else out_dtype
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dt)


@torch.library.custom_op("fxscale::scaled_linear_requantise", mutates_args=())
def scaled_linear_requantise(
    x: Tensor,
    x_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    activation: str,
    out_fmt: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`scaled_linear`, but the output scale comes from the result's own amax.

    Returns ``(data, scale, stats)``: the result quantised into ``out_fmt`` with the power of
    two scale that fits its max |value|, that scale, and ``stats = [amax, max row norm]`` of
    the high-precision result (the measurement a requantise restarts the bounds from).
    This is the requantise fused into its producer: the bits are never lost to a loose scale.
    """
    y = _linear_ref(x, x_scale, w, w_scale, bias, activation)
    f = get_format(out_fmt)
    st = row_stats(y)
    scale = f.scale_tensor(st[0])
    return f.cast(y / scale), scale, st


@scaled_linear_requantise.register_fake
def _(x, x_scale, w, w_scale, bias, activation, out_fmt):
    data = x.new_empty((*x.shape[:-1], w.shape[0]), dtype=get_format(out_fmt).dtype)
    return data, x.new_empty((), dtype=torch.float32), x.new_empty(2, dtype=torch.float32)


@torch.library.custom_op("fxscale::gated_requantise", mutates_args=())
def gated_requantise(gate: Tensor, up: Tensor, activation: str, out_fmt: str) -> tuple[Tensor, Tensor, Tensor]:
    """A gated MLP's product, requantised: ``h = act(gate) * up`` (SwiGLU, GeGLU), computed in
    the inputs' dtype as eager computes it, then ``(cast(h / s), s, stats)`` with ``s`` the
    scale that fits ``max |h|`` and ``stats = [amax, max row norm]`` (as ``fxscale.stats``).

    The requantise a Llama MLP needs (the product of two bounds wastes many bits), in one op:
    on CUDA two passes that never write ``h`` (:mod:`fxscale.kernels.triton_gated`).

    >>> g, u = torch.randn(4, 8), torch.randn(4, 8)
    >>> data, scale, st = torch.ops.fxscale.gated_requantise(g, u, "silu", "e4m3")
    >>> bool((data.float() * scale - torch.nn.functional.silu(g) * u).abs().max() <= st[0] / 16)
    True
    """
    return gated_requantise_ref(gate, up, activation, out_fmt)


def gated_requantise_ref(gate: Tensor, up: Tensor, activation: str, out_fmt: str) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gated_requantise`'s reference body (any device, any dtype)."""
    h = apply_activation(gate, activation) * up
    f = get_format(out_fmt)
    st = row_stats(h)
    scale = f.scale_tensor(st[0])
    return f.cast(h.to(torch.float32) / scale), scale, st


@gated_requantise.register_fake
def _(gate, up, activation, out_fmt):
    data = gate.new_empty(gate.shape, dtype=get_format(out_fmt).dtype)
    return data, gate.new_empty((), dtype=torch.float32), gate.new_empty(2, dtype=torch.float32)


# ---------------------------------------------------------------------------- matmul / conv
@torch.library.custom_op("fxscale::scaled_matmul", mutates_args=())
def scaled_matmul(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``(a @ b) * a_scale * b_scale`` for two scaled activations (broadcasting batch dims)."""
    acc = torch.matmul(_upcast(a), _upcast(b)).to(torch.float32)
    return (acc * (a_scale * b_scale)).to(out_dtype)


@scaled_matmul.register_fake
def _(a, a_scale, b, b_scale, out_dtype):
    shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    return a.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("fxscale::scaled_conv2d", mutates_args=())
def scaled_conv2d(
    x: Tensor,
    x_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """2-D convolution of scaled input and weight, accumulated in float32 (reference only)."""
    acc = F.conv2d(_upcast(x), _upcast(w), None, stride, padding, dilation, groups)
    return _conv_epilogue(acc, x_scale * w_scale, bias, out_dtype)


def _conv_epilogue(acc: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """A reference convolution's float32 result: scaled, the per-channel bias added, cast."""
    y = acc.to(torch.float32) * scale
    if bias is not None:
        y = y + bias.to(torch.float32).reshape(1, -1, 1, 1)
    return y.to(out_dtype)


@scaled_conv2d.register_fake
def _(x, x_scale, w, w_scale, bias, stride, padding, dilation, groups, out_dtype):
    h, wd = x.shape[-2:]
    kh, kw = w.shape[-2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((*x.shape[:-3], w.shape[0], oh, ow), dtype=out_dtype)


@torch.library.custom_op("fxscale::scaled_conv_transpose2d", mutates_args=())
def scaled_conv_transpose2d(
    x: Tensor,
    x_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    output_padding: list[int],
    groups: int,
    dilation: list[int],
    out_dtype: torch.dtype,
) -> Tensor:
    """Transposed 2-D convolution (weight ``(C_in, C_out/groups, kh, kw)``) of scaled input and
    weight, accumulated in float32 (reference only), as ``aten.conv_transpose2d``."""
    acc = F.conv_transpose2d(_upcast(x), _upcast(w), None, stride, padding, output_padding, groups, dilation)
    return _conv_epilogue(acc, x_scale * w_scale, bias, out_dtype)


@scaled_conv_transpose2d.register_fake
def _(x, x_scale, w, w_scale, bias, stride, padding, output_padding, groups, dilation, out_dtype):
    size = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1
            for n, s, p, d, k, op in zip(x.shape[-2:], stride, padding, dilation, w.shape[-2:], output_padding)]
    return x.new_empty((*x.shape[:-3], w.shape[1] * groups, *size), dtype=out_dtype)


@torch.library.custom_op("fxscale::scaled_grouped_mm", mutates_args=())
def scaled_grouped_mm(x: Tensor, x_scale: Tensor, w: Tensor, w_scales: Tensor, offs: Tensor,
                      out_dtype: torch.dtype) -> Tensor:
    """Grouped (MoE expert) matmul of scaled data: rows ``offs[e-1]:offs[e]`` of ``x`` (S, K)
    times expert ``e``'s ``w[e]`` (K, N), scaled by ``x_scale * w_scales[e]`` (or a 0-d
    ``w_scales`` shared by all experts); rows past the
    last offset are 0 (as transformers' ``grouped_mm_fallback``). Reference: one host sync
    for the offsets, one matmul per non-empty group, accumulated in float32."""
    out = torch.zeros(x.shape[0], w.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            acc = _upcast(x[start:end]) @ _upcast(w[e])
            ws = w_scales if w_scales.dim() == 0 else w_scales[e]  # one scale for all, or one per expert
            out[start:end] = acc.to(torch.float32) * (x_scale * ws)
        start = end
    return out.to(out_dtype)


@scaled_grouped_mm.register_fake
def _(x, x_scale, w, w_scales, offs, out_dtype):
    return x.new_empty((x.shape[0], w.shape[-1]), dtype=out_dtype)


_lib.define("layer_norm(Tensor x, int[] normalized_shape, Tensor? weight, Tensor? bias, float eps) -> Tensor")


def layer_norm(x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None,
               eps: float) -> Tensor:
    """LayerNorm in two passes, ``d = x - mean(x)``, ``xhat = d * rsqrt(sum(d * d) / D + eps)``,
    in float32 (float64 for float64 inputs), cast back to ``x``'s dtype.

    The same ``d`` feeds the sum of squares and the product, so ``|xhat_i| <= sqrt(D)`` holds up
    to a relative ``(D + 16) u`` whatever the mean's rounding and the summation order (a sum of
    non-negative terms): the bound that fxscale's rule proves (``fxscale.rules.normalisation``),
    which PyTorch's Welford kernel does not satisfy on near-constant rows.

    CompositeImplicitAutograd, as ``quantise``: the node keeps its name in the transformed graph
    (its rule applies there) and decomposes into these ATen ops under torch.compile, where
    inductor fuses the whole normalisation into one kernel (an opaque custom op ran a dozen
    eager passes over the activation: ~0.5 ms per LayerNorm at 8192 x 4096 on an H200).
    """
    dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
    xf = x if x.dtype == torch.float64 else x.float()
    d = xf - xf.mean(dims, keepdim=True)
    n = 1
    for s in normalized_shape:
        n *= int(s)
    y = d * torch.rsqrt((d * d).sum(dims, keepdim=True) / n + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


_lib.impl("layer_norm", layer_norm, "CompositeImplicitAutograd")

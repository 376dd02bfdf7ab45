"""CUDA implementations of the fxscale ops, registered with ``torch.library.register_kernel``.

``scaled_linear`` picks, per shape, the fastest of these candidates (each computes exactly the
op's contract; the choice is measured once per key -- CUDA-graph replays, so launch overhead
does not decide -- and cached, see :func:`choices`):

* ``cublas``: ``torch._scaled_mm`` (fp8, K and N multiples of 16) with bias and fast
  accumulation; for an fp8 output the output scale is folded into ``scale_a`` and the bias
  (torch 2.11 ignores ``scale_result``) and cuBLAS saturates; ReLU then runs on the fp8 data
  (exact), other activations on a bf16/fp32 result;
* ``triton``: the fp8 (or int8) matmul of :mod:`fxscale.kernels.triton_fp8` with bias,
  activation, output scale and saturating cast fused into its epilogue, in several tilings
  (persistent TMA tiles for large M, split-K pointer tiles for decode);
* ``intmm``: int8 through ``torch._int_mm`` with the epilogue in torch;
* ``reference``: the CPU reference code, run on the GPU (always correct, slow).

Under ``torch.compile``, :mod:`fxscale.kernels.lowering` lowers the ``scaled_linear`` calls
that cuBLAS fuses completely to ``torch._scaled_mm`` inside the compiled code, which saves the
custom op's Python dispatch per call; the rest stay custom-op calls.

``scaled_linear_requantise`` measures the result's ``max |y|`` and row norms in the Triton
epilogue (atomics), then chooses the scale and casts in one light second pass.
``scaled_matmul`` (activation x activation) upcasts the 8-bit data to bf16 exactly and uses the
bf16 tensor cores with float32 accumulation. ``scaled_conv2d`` and ``quantise`` / ``dequantise`` / ``stats`` keep their
reference / composite implementations (the latter decompose and fuse under torch.compile).

Nothing here synchronises with the host except the one-time autotuning of a new shape
(:mod:`fxscale.kernels.autotune`), which
is skipped while a CUDA graph is being captured (the first candidate that runs is used then),
so a warmed-up model runs under CUDA graphs. ``FXSCALE_AUTOTUNE=0`` turns autotuning off;
:func:`force` pins one candidate family (for benchmarks and tests).
"""

from __future__ import annotations

import weakref

import torch

from .. import ops as _ops
from ..formats import Format, get_format
from . import autotune as _at
from .autotune import Choice, choices, clear_cache, failures, force, warn_once

try:
    from . import triton_elementwise as _te
    from . import triton_fp8 as _tk
except Exception:  # noqa: BLE001  (triton missing or too old: cuBLAS and the reference remain)
    _tk = _te = None
try:
    from . import triton_gated as _tg
except Exception:  # noqa: BLE001  (triton or torch.library.triton_op missing: the reference remains)
    _tg = None

__all__ = ["HAS_TRITON", "Choice", "choices", "clear_cache", "failures", "force", "linear_choice"]

HAS_TRITON = _tk is not None
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


_DERIVED: dict = {}


def _derived(tag: str, fn, *ts: torch.Tensor) -> torch.Tensor:
    """``fn(*ts)``, cached while each of ``ts`` is alive and unmodified. Used only for scales
    handed over on the CPU (the copy would otherwise sync every call). Not during a CUDA graph
    capture, and not for values computed on the device: torch.compile's CUDA-graph trees
    require every live tensor of their memory pool to be a graph output."""
    try:
        ver = tuple((t._version, t.data_ptr()) for t in ts)
    except RuntimeError:  # inference tensors have no version counter
        return fn(*ts)
    key = (tag, *(id(t) for t in ts))
    hit = _DERIVED.get(key)
    if hit is not None and hit[1] == ver and all(r() is t for r, t in zip(hit[0], ts)):
        return hit[2]
    if torch.cuda.is_current_stream_capturing():
        return fn(*ts)
    if len(_DERIVED) > 512:
        _DERIVED.clear()
    val = fn(*ts)
    _DERIVED[key] = (tuple(weakref.ref(t) for t in ts), ver, val)
    return val


def _bias16(bias: torch.Tensor | None) -> torch.Tensor | None:
    """``bias`` in bf16 for cuBLAS (one tiny kernel a call; see :func:`_derived` for why not cached)."""
    if bias is None or bias.dtype == torch.bfloat16:
        return bias
    return bias.to(torch.bfloat16)


def _on_device(t, device):
    """A scale or bias given on the CPU: copied to the GPU once (cached), with a warning."""
    if t is None or t.device == device:
        return t
    warn_once(("cpu", t.dtype), "fxscale: a scale or bias tensor lives on the CPU while the data is on "
               f"{device}; it is copied once and cached, but keep scales on the device (module buffers) "
               "to avoid the copy and to allow CUDA graphs")
    return _derived("dev", lambda u: u.to(device), t)


def _relu_fp8(d: torch.Tensor) -> torch.Tensor:
    if _te is not None:
        return _te.relu_fp8(d)
    v = d.view(torch.uint8)
    nan_lo = 0xFF if d.dtype == torch.float8_e4m3fn else 0xFD
    return torch.where((v < 128) | (v >= nan_lo), v, torch.zeros_like(v)).view(d.dtype)


# ------------------------------------------------------------------------------ candidates
def _finish(y: torch.Tensor, activation: str, out_scale, fmt: Format | None, out_dtype) -> torch.Tensor:
    y = _ops.apply_activation(y, activation)
    if fmt is not None:
        return fmt.cast(y.to(torch.float32) / out_scale)
    return y.to(out_dtype)


_SAT: dict[torch.dtype, bool] = {}


def _cublas_saturates(dtype: torch.dtype, device) -> bool:
    """Does ``_scaled_mm`` saturate finite overflow of an fp8 output (as the contract wants)?"""
    if dtype not in _SAT:
        if torch.cuda.is_current_stream_capturing():
            return False  # cannot probe now; the float32-output path is always correct
        a = torch.full((16, 16), 448.0, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        out = torch._scaled_mm(a, a.t(), one, one, out_dtype=dtype)
        v = out.to(torch.float32)
        _SAT[dtype] = bool(torch.isfinite(v).all()) and float(v.max()) == torch.finfo(dtype).max
    return _SAT[dtype]


def _cublas(x2, xs, w, ws, bias, activation, out_scale, fmt, out_dtype):
    wt = w.t()
    if fmt is not None and fmt.dtype in _FP8 and activation in ("none", "relu") \
            and _cublas_saturates(fmt.dtype, x2.device):
        # D = scale_a * scale_b * (x @ w.T) + bias, saturated into fp8: the output scale goes
        # into scale_a and the bias (``scale_result`` is ignored by torch 2.11's _scaled_mm).
        inv = torch.reciprocal(out_scale)
        sa = xs * inv
        b = None if bias is None else (bias.to(torch.float32) * inv).to(torch.bfloat16)
        out = torch._scaled_mm(x2, wt, sa, ws, bias=b, out_dtype=fmt.dtype, use_fast_accum=True)
        return _relu_fp8(out) if activation == "relu" else out
    if fmt is None and out_dtype == torch.bfloat16:
        y = torch._scaled_mm(x2, wt, xs, ws, bias=_bias16(bias), out_dtype=torch.bfloat16, use_fast_accum=True)
        if activation == "none":
            return y
        return _finish(y.to(torch.float32), activation, None, None, out_dtype)
    y = torch._scaled_mm(x2, wt, xs, ws, out_dtype=torch.float32, use_fast_accum=True)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return _finish(y, activation, out_scale, fmt, out_dtype)


def _intmm(x2, xs, w, ws, bias, activation, out_scale, fmt, out_dtype):
    y = torch._int_mm(x2, w.t()).to(torch.float32) * (xs * ws)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return _finish(y, activation, out_scale, fmt, out_dtype)


def _triton(cfg):
    def run(x2, xs, w, ws, bias, activation, out_scale, fmt, out_dtype, res=None):
        if fmt is not None and fmt.dtype not in _FP8:  # int8 etc.: fp32 out, cast in torch
            y = _tk.linear(x2, xs, w, ws, bias, activation, None, torch.float32, cfg, residual=res)
            return fmt.cast(y / out_scale)
        dt = fmt.dtype if fmt is not None else out_dtype
        return _tk.linear(x2, xs, w, ws, bias, activation, out_scale, dt, cfg, residual=res)

    return run


def _residual_after(impl):
    """``impl`` (which has no residual) followed by the residual add: in the output dtype where
    the result is plain (as the unfused graph adds), else in float32 before the cast."""

    def run(x2, xs, w, ws, bias, activation, out_scale, fmt, out_dtype, res=None):
        if res is None:
            return impl(x2, xs, w, ws, bias, activation, out_scale, fmt, out_dtype)
        if fmt is None and res.dtype == out_dtype:
            return impl(x2, xs, w, ws, bias, activation, None, None, out_dtype) + res
        y = impl(x2, xs, w, ws, bias, activation, None, None, torch.float32) + res.to(torch.float32)
        return _finish(y, "none", out_scale, fmt, out_dtype)

    return run


def _reference(x2, xs, w, ws, bias, activation, out_scale, fmt, out_dtype):
    y = _ops._linear_ref(x2, xs, w, ws, bias, activation)
    if fmt is not None:
        return fmt.cast(y / out_scale)
    return y.to(out_dtype)


def _candidates(x2, w, fmt, out_dtype, activation):
    """Every implementation that applies, heuristic default first."""
    M, K = x2.shape
    N = w.shape[0]
    fp8_in = x2.dtype in _FP8 and w.dtype in _FP8
    int_in = x2.dtype == torch.int8 and w.dtype == torch.int8
    aligned = K % 16 == 0 and N % 16 == 0
    cands = []
    cublas_ok = fp8_in and aligned and not (x2.dtype == w.dtype == torch.float8_e5m2)
    tri = []
    if _tk is not None and (fp8_in or int_in):
        kdt = fmt.dtype if fmt is not None and fmt.dtype in _FP8 else (
            out_dtype if fmt is None else torch.float32)
        tma = _tk.tma_ok(x2, w, kdt)
        if M <= 64:
            pool = [c for c in _tk.small_configs(M) if tma or not c.tma]
        else:
            pool = _tk.CONFIGS_LARGE if tma else _tk.CONFIGS_GENERIC
        tri = [("triton", c) for c in pool]
    fuses_in_cublas = activation == "none" or (activation == "relu" and fmt is not None)
    if cublas_ok and (fuses_in_cublas or not tri):
        cands.append(("cublas", None))
        cands += tri
    else:
        cands += tri
        if cublas_ok:
            cands.append(("cublas", None))
    if int_in and M > 16 and K % 8 == 0 and N % 8 == 0:
        cands.append(("intmm", None))
    cands.append(("reference", None))
    if (fp8_in or int_in) and not aligned:
        how = "the masked Triton kernel" if tri else "the reference implementation (slow)"
        warn_once(("align", K, N), f"fxscale.scaled_linear: K={K} or N={N} is not a multiple of 16, so "
                   f"torch._scaled_mm and the TMA kernel do not apply; using {how}")
    if _at.forced() is not None:
        pinned = [c for c in cands if c[0] == _at.forced()]
        if pinned:
            cands = [*pinned, ("reference", None)]
    return cands


_IMPLS = {name: _residual_after(f) for name, f in (("cublas", _cublas), ("intmm", _intmm), ("reference", _reference))}


def _impl(name, cfg):
    return _triton(cfg) if name == "triton" else _IMPLS[name]


# ------------------------------------------------------------------------------ op kernels
def _prologue(x, w, *scalars):
    """``x`` as a contiguous ``(M, K)`` matrix, ``w`` contiguous, the scale / bias tensors on
    ``x``'s device; also ``x``'s leading shape and the autotune key's shape part (16-byte
    alignment of the base pointers decides whether TMA applies, so it is part of the key)."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    w = w if w.is_contiguous() else w.contiguous()
    dev = x2.device
    (M, K), N = x2.shape, w.shape[0]
    key = (dev.index, x2.dtype, w.dtype, _at.bucket(M), N, K)
    aligned = x2.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    return x2, w, [_on_device(t, dev) for t in scalars], x.shape[:-1], key, aligned


def _linear_call(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual=None):
    """The autotune key of a scaled_linear call and its prepared arguments."""
    x2, w, (x_scale, w_scale, bias, out_scale), lead, shape_key, aligned = _prologue(
        x, w, x_scale, w_scale, bias, out_scale)
    fmt = get_format(out_fmt) if out_fmt is not None else None
    res = None
    if residual is not None:  # (M, N), contiguous, on x's device, as the epilogue reads it
        res = residual.to(x2.device).reshape(x2.shape[0], w.shape[0]).contiguous()
    args = (x2, x_scale, w, w_scale, bias, activation, out_scale, fmt, out_dtype, res)
    key = ("linear", *shape_key, bias is not None, activation, out_fmt, out_dtype, aligned,
           None if res is None else res.dtype)
    return key, args, lead


def scaled_linear_cuda(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual=None):
    key, args, lead = _linear_call(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual)
    x2, w, fmt = args[0], args[2], args[7]
    if x2.shape[0] == 0:
        return _IMPLS["reference"](*args).reshape(*lead, w.shape[0])
    out = _at.dispatch(key, lambda: _candidates(x2, w, fmt, out_dtype, activation), args, _impl)
    return out.reshape(*lead, w.shape[0])


def linear_choice(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual=None) -> Choice:
    """The implementation :func:`scaled_linear_cuda` runs for these operands' shapes (tuned now if
    new: the inductor lowering asks this at compile time, with random operands of the shape)."""
    key, _, _ = _linear_call(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual)
    if key not in choices():
        scaled_linear_cuda(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual)
    return choices().get(key) or Choice("reference", None, None)


def _requant_unfused(x2, xs, w, ws, bias, activation, f: Format):
    y = scaled_linear_cuda(x2, xs, w, ws, bias, activation, None, None, torch.float32)
    st = _ops.row_stats(y)
    scale = f.scale_tensor(st[0])
    return f.cast(y / scale), scale, st


def _requant_triton(cfg):
    def run(x2, xs, w, ws, bias, activation, f: Format):
        y, stats = _tk.linear(x2, xs, w, ws, bias, activation, None, torch.bfloat16, cfg, stats=True)
        return _te.requant_cast(y, stats, f)

    return run


def scaled_linear_requantise_cuda(x, x_scale, w, w_scale, bias, activation, out_fmt):
    f = get_format(out_fmt)
    x2, w, (x_scale, w_scale, bias), lead, shape_key, aligned = _prologue(x, w, x_scale, w_scale, bias)
    M = x2.shape[0]

    def cands():
        fused_ok = (_tk is not None and f.dtype in _FP8 and M > 0
                    and ((x2.dtype in _FP8 and w.dtype in _FP8) or (x2.dtype == w.dtype == torch.int8)))
        if not fused_ok or _at.forced() not in (None, "triton"):
            return [("unfused", None)]
        tma = _tk.tma_ok(x2, w, torch.bfloat16)
        if M <= 64:
            pool = [c for c in _tk.small_configs(M) if tma or not c.tma]
        else:
            pool = _tk.CONFIGS_LARGE if tma else _tk.CONFIGS_GENERIC
        return [("requant_triton", c) for c in pool] + [("unfused", None)]

    key = ("requant", *shape_key, bias is not None, activation, out_fmt, aligned)
    args = (x2, x_scale, w, w_scale, bias, activation, f)
    data, scale, st = _at.dispatch(key, cands, args, _impl_requant)
    return data.reshape(*lead, w.shape[0]), scale, st


def _impl_requant(name, cfg):
    return _requant_triton(cfg) if name == "requant_triton" else _requant_unfused


def gated_triton_ok(gate, up, out_fmt: str) -> bool:
    """Can ``fxscale_kernels::gated_requantise`` take these operands (else the reference runs)?"""
    return (_tg is not None and get_format(out_fmt).dtype in _FP8 and gate.dtype == up.dtype
            and gate.dtype in _tg._ROUND and gate.shape == up.shape and gate.dim() >= 1 and gate.numel() > 0
            and _at.forced() != "reference")


def gated_requantise_cuda(gate, up, activation, out_fmt):
    if not gated_triton_ok(gate, up, out_fmt):
        return _ops.gated_requantise_ref(gate, up, activation, out_fmt)
    return torch.ops.fxscale_kernels.gated_requantise(gate, up, activation, get_format(out_fmt).dtype)


def scaled_matmul_cuda(a, a_scale, b, b_scale, out_dtype):
    eight_bit = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8)
    if a.dtype in eight_bit and b.dtype in eight_bit and out_dtype != torch.float32:
        # 8-bit values are exact in bf16; the bf16 tensor cores accumulate in float32.
        acc = torch.matmul(a.to(torch.bfloat16), b.to(torch.bfloat16))
        return (acc.to(torch.float32) * (a_scale * b_scale)).to(out_dtype)
    acc = torch.matmul(_ops._upcast(a), _ops._upcast(b)).to(torch.float32)
    return (acc * (a_scale * b_scale)).to(out_dtype)


def _register() -> None:
    torch.library.register_kernel("fxscale::scaled_linear", "cuda", scaled_linear_cuda)
    torch.library.register_kernel("fxscale::scaled_linear_requantise", "cuda", scaled_linear_requantise_cuda)
    torch.library.register_kernel("fxscale::scaled_matmul", "cuda", scaled_matmul_cuda)
    torch.library.register_kernel("fxscale::gated_requantise", "cuda", gated_requantise_cuda)


_register()

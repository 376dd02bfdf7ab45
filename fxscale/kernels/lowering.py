"""How torch.compile (inductor) lowers ``fxscale::scaled_linear`` on CUDA.

Where cuBLAS fuses the whole op (no activation, or ReLU into fp8 as described below), the
call becomes ``torch._scaled_mm`` inside the compiled code, with the scale arithmetic as
inductor kernels (folded into constants under inductor's freezing): no custom-op dispatch per
call (~0.15 ms of host time on the H100 machine). Elsewhere it stays a call of the custom op's
CUDA kernels (:mod:`fxscale.kernels.cuda`, autotuned per shape), under the name
``fxscale_kernels::scaled_linear`` that inductor accepts as a fallback.

Registered when the CUDA kernels are (``FXSCALE_INDUCTOR_LOWERING=0`` leaves it out);
:func:`set_inductor_lowering` switches it, e.g. for an A/B::

    set_inductor_lowering(False)                       # every scaled_linear a custom-op call
    set_inductor_lowering(True, relu_cublas_max_m=0)   # ReLU GEMMs keep the fused Triton kernel
"""

from __future__ import annotations

import os

import torch

from ..formats import get_format
from .cuda import _FP8, _cublas_saturates, _tk, _warn_once, scaled_linear_cuda

__all__ = ["set_inductor_lowering"]

_DECOMP_MIN_M = 64  # at or below this M (decode) the custom op's Triton kernels win, under CUDA graphs
# From this M on, a residual add is worth the custom op's host cost: the autotuner weighs the
# Triton kernel with the add in its epilogue against cuBLAS + a separate add (device-bound sizes).
_RESIDUAL_OP_MIN_M = 2048
# Up to this M a ReLU into fp8 is lowered to cuBLAS + an inductor ReLU pass instead of the Triton
# kernel that fuses it, when inductor freezes parameters (``torch._inductor.config.freezing``):
# only then does the static scale arithmetic around ``_scaled_mm`` fold into constants. The pass
# costs ~11 us of device time at M=1024 on the H100, the custom op ~150 us of host time per call
# (FFN M=1024, plain calls: 0.274 -> 0.221 ms; benchmarks/RESULTS.md, run 22).
_RELU_CUBLAS_MAX_M_FROZEN = 1024
_RELU_CUBLAS_MAX_M: int | None = None  # None: the rule above; an int: that M, frozen or not


def _relu_cublas_max_m() -> int:
    if _RELU_CUBLAS_MAX_M is not None:
        return _RELU_CUBLAS_MAX_M
    from torch._inductor import config

    return _RELU_CUBLAS_MAX_M_FROZEN if config.freezing else 0


def _kernel_op(*args):
    return torch.ops.fxscale_kernels.scaled_linear.default(*args)


def _scaled_linear_decomposition(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype,
                                 residual=None):
    """How torch.compile (inductor) lowers ``scaled_linear`` where cuBLAS fuses the whole op
    (no activation; ReLU into fp8 up to :func:`_relu_cublas_max_m`, or where Triton is missing):
    ``torch._scaled_mm`` called from the compiled code itself, the scale arithmetic (and ReLU)
    as inductor kernels. This removes the custom op's per-call Python dispatch
    (~0.1 ms of host time per call measured on the H100 machine), which otherwise makes
    M ~ 1000 host-bound. Anywhere else the custom op's kernels run (``fxscale_kernels::``
    ``scaled_linear``, the same op under a name inductor accepts as a fallback)."""
    from torch.utils._python_dispatch import _disable_current_modes

    op_args = (x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual)
    shapes = (*x.shape, *w.shape)
    if (x.device.type != "cuda" or x.dtype not in _FP8 or w.dtype not in _FP8
            or x.dtype == w.dtype == torch.float8_e5m2 or activation not in ("none", "relu")
            or not all(isinstance(d, int) for d in shapes)
            or any(t is not None and t.device != x.device for t in (x_scale, w_scale, bias, out_scale))):
        return _kernel_op(*op_args)
    K, N = x.shape[-1], w.shape[0]
    M = x.numel() // K if K else 0
    if (M <= _DECOMP_MIN_M or K % 16 or N % 16 or not w.is_contiguous()
            or (residual is not None and (M >= _RESIDUAL_OP_MIN_M or out_fmt is not None
                                          or residual.dtype != out_dtype or residual.shape != (*x.shape[:-1], N)))):
        return _kernel_op(*op_args)
    fmt = get_format(out_fmt) if out_fmt is not None else None
    if activation == "relu" and fmt is not None and _tk is not None and M > _relu_cublas_max_m():
        # ReLU into fp8 above that M: the Triton kernel fuses it (measured 7% ahead of cuBLAS + a
        # ReLU pass at M=8192 on the H100); the custom op's autotuner decides per shape.
        return _kernel_op(*op_args)
    x2 = x.reshape(M, K).contiguous()
    if fmt is not None:
        if fmt.dtype not in _FP8:
            return _kernel_op(*op_args)
        with _disable_current_modes():
            if not _cublas_saturates(fmt.dtype, x.device):
                return _kernel_op(*op_args)
        inv = torch.reciprocal(out_scale)
        b = None if bias is None else (bias.to(torch.float32) * inv).to(torch.bfloat16)
        y = torch._scaled_mm(x2, w.t(), x_scale * inv, w_scale, bias=b, out_dtype=fmt.dtype, use_fast_accum=True)
        if activation == "relu":  # exact on fp8 values; NaN stays NaN
            y = torch.relu(y.to(torch.float32)).to(fmt.dtype)
    elif out_dtype == torch.bfloat16:
        b = None if bias is None else bias.to(torch.bfloat16)
        y = torch._scaled_mm(x2, w.t(), x_scale, w_scale, bias=b, out_dtype=torch.bfloat16, use_fast_accum=True)
        if activation == "relu":
            y = torch.relu(y)
        if residual is not None:  # inductor fuses this add into its neighbours
            y = y + residual.reshape(M, N)
    else:
        return _kernel_op(*op_args)
    return y.reshape(*x.shape[:-1], N)


@torch.library.custom_op("fxscale_kernels::scaled_linear", mutates_args=())
def _scaled_linear_kernel_op(
    x: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    out_scale: torch.Tensor | None,
    out_fmt: str | None,
    out_dtype: torch.dtype,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fxscale::scaled_linear`` under another name: what the inductor lowering emits where it
    does not apply (inductor refuses a decomposition that falls back to the op itself)."""
    return torch.ops.fxscale.scaled_linear.default(x, x_scale, w, w_scale, bias, activation, out_scale,
                                                   out_fmt, out_dtype, residual)


@_scaled_linear_kernel_op.register_fake
def _(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual=None):
    dt = get_format(out_fmt).dtype if out_fmt is not None else out_dtype
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=dt)


_scaled_linear_kernel_op.register_kernel("cuda")(
    lambda *args: scaled_linear_cuda(*args))


def set_inductor_lowering(enabled: bool, *, relu_cublas_max_m: int | None = None) -> None:
    """Let torch.compile lower large-M ``scaled_linear`` to ``torch._scaled_mm`` directly
    (default on; ``FXSCALE_INDUCTOR_LOWERING=0`` turns it off). ``relu_cublas_max_m``: up to
    this M, lower a ReLU into fp8 as well (cuBLAS, then an inductor ReLU pass) instead of the
    custom op's Triton kernel that fuses it (faster on the device, ~150 us more host time per
    call); ``None`` restores the default: 1024 where inductor freezes parameters, else 0.
    Takes effect at the next compile
    -- of a graph not in torch.compile's caches, which do not key on this switch (compile with
    ``torch._inductor.config.fx_graph_cache`` and ``torch._functorch.config.enable_autograd_cache``
    off, as benchmarks/bench_ffn.py does for its A/B)."""
    from torch._inductor import decomposition as dec

    global _RELU_CUBLAS_MAX_M
    _RELU_CUBLAS_MAX_M = None if relu_cublas_max_m is None else int(relu_cublas_max_m)
    op = torch.ops.fxscale.scaled_linear.default
    for table in (dec.decompositions, dec.fast_random_decomps()):
        if enabled:
            table[op] = _scaled_linear_decomposition
        else:
            table.pop(op, None)


def _register() -> None:
    if os.environ.get("FXSCALE_INDUCTOR_LOWERING", "1") != "0":
        try:
            set_inductor_lowering(True)
        except (ImportError, AttributeError) as e:  # an inductor without these tables: custom op only
            _warn_once("lowering", f"fxscale: inductor lowering of scaled_linear not registered ({e})")


_register()

"""How torch.compile (inductor) and AOTInductor lower ``fxscale::scaled_linear`` on CUDA.

At compile time the autotuner of :mod:`fxscale.kernels.cuda` measures, once per shape (on random
operands of that shape), which implementation is fastest, and the call is lowered to it:

* the fused Triton kernel -> ``fxscale_kernels::linear_triton``, a ``torch.library.triton_op``
  (:mod:`fxscale.kernels.triton_ops`): inductor traces into it and launches the Triton kernel
  from its own generated code, so there is no custom-op dispatch per call, the scale arithmetic
  stays inside the kernel (it loads the 0-d scale tensors itself: nothing to fold, frozen or
  not), and AOTInductor packages it as a cubin;
* cuBLAS -> ``torch._scaled_mm`` in the compiled code (ReLU into fp8 as a pass on the fp8 data);
* anything else (int8 via ``torch._int_mm``, the reference) -> ``fxscale_kernels::scaled_linear``,
  the custom op's CUDA kernels under a name inductor accepts as a fallback (a Python op).

A symbolic M (dynamic batch; K and N static) is tuned at its size hint. The tiling families
change at M = 16, 32 and 64 (decode tilings below, persistent tiles above), and above M = 2048
the lowering keeps what it did before the triton_op (cuBLAS where it fuses the whole op, else
the custom op: see ``_TRACED_MAX_M``); under torch.compile the lowering guards on the family, so
a batch that crosses a threshold recompiles. Under
AOTInductor (``cpp_wrapper``) no guard is added: every tiling computes the same function for any
M, so the package serves every batch with the hint's choice.

Registered when the CUDA kernels are (``FXSCALE_INDUCTOR_LOWERING=0`` leaves it out);
:func:`set_inductor_lowering` switches it, e.g. for an A/B::

    set_inductor_lowering(False)                       # every scaled_linear a custom-op call
    set_inductor_lowering(True, triton_ops=False)      # fused Triton GEMMs stay custom-op calls
    set_inductor_lowering(True, relu_cublas_max_m=1024)  # ReLU GEMMs up to M=1024 on cuBLAS + a pass
"""

from __future__ import annotations

import math
import os

import torch

from ..formats import get_format
from . import cuda as _cuda
from .autotune import warn_once as _warn_once
from .cuda import _FP8, _cublas_saturates, scaled_linear_cuda

__all__ = ["lowering_enabled", "set_inductor_lowering"]

try:
    from . import triton_ops as _tops
except Exception:  # noqa: BLE001  (triton or torch.library.triton_op missing: custom op instead)
    _tops = None

# Up to this M a ReLU into fp8 goes to cuBLAS + an inductor ReLU pass instead of the fused Triton
# kernel (None: never; the switch is kept for A/Bs). Since the Triton GEMM is a triton_op the fused
# kernel costs no more host time than cuBLAS and less device time (benchmarks/RESULTS.md).
_RELU_CUBLAS_MAX_M: int | None = None
_TRITON_OPS = True
_ENABLED = False
_HOOKED = False
_FAMILY_EDGES = (16, 32, 64, 2048)  # where the Triton tiling families change (tilings.small_configs),
# and the largest M the triton_op lowering is used for: measured on the H200 up to M=1024 (FFN);
# the compile of the M=8192 FFN did not finish within its time cap there (2026-12-02, not yet
# understood), so larger M keep the lowering that was measured at M=8192 before.
_TRACED_MAX_M = 2048


def _constants_inlined() -> bool:
    """Does inductor inline 0-d graph constants as scalars (freezing or AOTInductor, without
    ``always_keep_tensor_constants``)? torch 2.11's inductor cannot hand such a scalar to a user
    Triton kernel ("'<=' not supported between 'Constant' and 'int'"), so the triton_op is not
    used then (fxscale.save and the fxscale backend set ``always_keep_tensor_constants``)."""
    from torch._inductor import config

    return bool((config.freezing or config.cpp_wrapper) and not config.always_keep_tensor_constants)


def _relu_cublas_max_m() -> int:
    return 0 if _RELU_CUBLAS_MAX_M is None else _RELU_CUBLAS_MAX_M


def _kernel_op(*args):
    return torch.ops.fxscale_kernels.scaled_linear.default(*args)


def _hint(d) -> int:
    """The example value of a (possibly symbolic) size, without adding a guard."""
    if isinstance(d, int):
        return d
    h = getattr(d.node, "hint", None)
    if h is None:
        from torch.fx.experimental.symbolic_shapes import hint_int

        return hint_int(d, fallback=1024)
    return int(h)


def _guard_family(M, m_hint: int) -> None:
    """Under torch.compile: guard that a symbolic M stays in the hint's tiling family (so a batch
    in another family recompiles with its own tiling). Not under AOTInductor, see the module doc."""
    if isinstance(M, int):
        return
    from torch._inductor import config

    if config.cpp_wrapper:
        return
    lo = 0
    for edge in _FAMILY_EDGES:
        if m_hint <= edge:
            inside = bool(M <= edge) and (lo == 0 or bool(M > lo))  # each comparison adds a guard
            break
        lo = edge
    else:
        inside = bool(M > lo)
    if not inside:  # cannot happen: the guards are evaluated at the hint
        raise AssertionError(f"fxscale lowering: M={M} (hint {m_hint}) outside its tiling family")


def _tuning_operands(x, w, x_scale, w_scale, bias, out_scale, residual, m: int):
    """Real random operands of the traced call's shapes and dtypes (``m`` rows) for the autotuner."""
    K, N, dev = x.shape[-1], w.shape[0], x.device

    def rnd(shape, dtype, scale=1.0):
        if dtype.is_floating_point:
            return (torch.randn(shape, device=dev) * scale).to(dtype)
        return torch.randint(-64, 64, shape, device=dev, dtype=dtype)

    one = torch.ones((), device=dev)
    return (rnd((m, K), x.dtype), one if x_scale is not None else None, rnd((N, K), w.dtype, K ** -0.5),
            one, None if bias is None else rnd((N,), bias.dtype, 0.1),
            None if out_scale is None else one, None if residual is None else rnd((m, N), residual.dtype))


def _choose(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual, m: int):
    """What the autotuner picks for this call at ``m`` rows: a :class:`~fxscale.kernels.cuda.Choice`."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.no_grad():
        xr, xs, wr, ws, br, osr, rr = _tuning_operands(x, w, x_scale, w_scale, bias, out_scale, residual, m)
        return _cuda.linear_choice(xr, xs, wr, ws, br, activation, osr, out_fmt, out_dtype, rr)


def _triton_call(x2, x_scale, w, w_scale, bias, activation, out_scale, fmt, out_dtype, res, cfg):
    """``linear_triton`` with the custom op's output conventions (int8 etc.: fp32 out, cast here)."""
    tiling = _tops.tiling_args(cfg)
    if fmt is not None and fmt.dtype not in _FP8:
        y = torch.ops.fxscale_kernels.linear_triton(x2, x_scale, w, w_scale, bias, res, None, activation,
                                                   torch.float32, tiling)
        return fmt.cast(y / out_scale)
    dt = fmt.dtype if fmt is not None else out_dtype
    return torch.ops.fxscale_kernels.linear_triton(x2, x_scale, w, w_scale, bias, res,
                                                  out_scale if fmt is not None else None, activation, dt, tiling)


def _cublas_call(x2, x_scale, w, w_scale, bias, activation, out_scale, fmt, out_dtype, res):
    """``torch._scaled_mm`` in the compiled code, or None where cuBLAS cannot do the whole op."""
    from torch.utils._python_dispatch import _disable_current_modes

    if x2.dtype == w.dtype == torch.float8_e5m2 or activation not in ("none", "relu"):
        return None
    if fmt is not None:
        if fmt.dtype not in _FP8 or res is not None:
            return None
        with _disable_current_modes():
            if not _cublas_saturates(fmt.dtype, x2.device):
                return None
        inv = torch.reciprocal(out_scale)
        b = None if bias is None else (bias.to(torch.float32) * inv).to(torch.bfloat16)
        y = torch._scaled_mm(x2, w.t(), x_scale * inv, w_scale, bias=b, out_dtype=fmt.dtype, use_fast_accum=True)
        if activation == "relu":  # exact on fp8 values; NaN stays NaN
            y = torch.relu(y.to(torch.float32)).to(fmt.dtype)
        return y
    if out_dtype != torch.bfloat16 or (res is not None and res.dtype != out_dtype):
        return None
    b = None if bias is None else bias.to(torch.bfloat16)
    y = torch._scaled_mm(x2, w.t(), x_scale, w_scale, bias=b, out_dtype=torch.bfloat16, use_fast_accum=True)
    if activation == "relu":
        y = torch.relu(y)
    if res is not None:  # inductor fuses this add into its neighbours
        y = y + res
    return y


def _scaled_linear_decomposition(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype,
                                 residual=None):
    """How inductor lowers ``scaled_linear`` on CUDA: to the implementation the autotuner measured
    fastest for this shape (see the module docstring); M may be symbolic."""
    op_args = (x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual)
    eight_bit = (*_FP8, torch.int8)
    if (x.device.type != "cuda" or x.dtype not in eight_bit or w.dtype != x.dtype and not (
            x.dtype in _FP8 and w.dtype in _FP8)
            or not all(isinstance(d, int) for d in (x.shape[-1], *w.shape)) or not w.is_contiguous()
            or any(t is not None and t.device != x.device for t in (x_scale, w_scale, bias, out_scale, residual))):
        return _kernel_op(*op_args)
    K, N = x.shape[-1], w.shape[0]
    lead = x.shape[:-1]
    M = math.prod(lead)
    m_hint = math.prod(_hint(d) for d in lead)
    if m_hint == 0 or K == 0 or (residual is not None and tuple(residual.shape) != (*lead, N)):
        return _kernel_op(*op_args)
    fmt = get_format(out_fmt) if out_fmt is not None else None
    x2 = x.reshape(M, K).contiguous()
    res = None if residual is None else residual.reshape(M, N).contiguous()
    if m_hint > _TRACED_MAX_M:
        # Above the measured range: the lowering as before the triton_op (cuBLAS where it fuses the
        # whole op, else the custom op, whose host time hides behind GEMMs this long).
        _guard_family(M, m_hint)
        y = None
        if activation == "none" and residual is None and x.dtype in _FP8 and K % 16 == 0 and N % 16 == 0:
            y = _cublas_call(x2, x_scale, w, w_scale, bias, activation, out_scale, fmt, out_dtype, res)
        return _kernel_op(*op_args) if y is None else y.reshape(*lead, N)
    choice = _choose(x, x_scale, w, w_scale, bias, activation, out_scale, out_fmt, out_dtype, residual, m_hint)
    name = choice.name
    if name == "triton" and _constants_inlined():
        name = "cublas"  # where cuBLAS cannot do the whole op, the custom op below
    if (activation == "relu" and fmt is not None and m_hint <= _relu_cublas_max_m()
            and x.dtype in _FP8 and K % 16 == 0 and N % 16 == 0):
        name = "cublas"
    y = None
    if name == "cublas":
        y = _cublas_call(x2, x_scale, w, w_scale, bias, activation, out_scale, fmt, out_dtype, res)
    elif name == "triton" and _tops is not None and _TRITON_OPS:
        _guard_family(M, m_hint)
        y = _triton_call(x2, x_scale, w, w_scale, bias, activation, out_scale, fmt, out_dtype, res, choice.cfg)
    if y is None:
        return _kernel_op(*op_args)
    return y.reshape(*lead, N)


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


def _lowers(x: torch.Tensor) -> bool:
    """Is an fxscale op on ``x`` lowered here: the lowering on, a CUDA tensor, and not under
    torch.export (which keeps the op, as it keeps triton_ops: the program stays device-independent)."""
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    return _ENABLED and not custom_triton_ops_decomposition_disabled() and x.device.type == "cuda"


def _functional_lowering(mode, op, types, args, kwargs):
    """``scaled_linear`` under torch.compile's functionalization (AOTAutograd, which inductor and
    AOTInductor trace through): replaced by :func:`_scaled_linear_decomposition`. Lowering here,
    above functionalization, rather than in inductor's decomposition table, lets the triton_op
    it calls decompose in turn into the kernel launch that inductor compiles."""
    if not _lowers(args[0] if args else kwargs.get("x")):
        return mode.__torch_dispatch__(op, types, args, kwargs)
    with mode:
        return _scaled_linear_decomposition(*args, **kwargs)


def _gated_functional_lowering(mode, op, types, args, kwargs):
    """``gated_requantise`` under functionalization: the ``fxscale_kernels::gated_requantise``
    triton_op, whose two kernels inductor then launches itself (no custom-op call)."""
    names = ("gate", "up", "activation", "out_fmt")
    vals = {**dict(zip(names, args)), **kwargs}
    gate, up, activation, out_fmt = (vals[k] for k in names)
    if not _lowers(gate) or not _cuda.gated_triton_ok(gate, up, out_fmt):
        return mode.__torch_dispatch__(op, types, args, kwargs)
    with mode:
        return torch.ops.fxscale_kernels.gated_requantise(gate, up, activation, get_format(out_fmt).dtype)


def set_inductor_lowering(enabled: bool, *, relu_cublas_max_m: int | None = None,
                          triton_ops: bool = True) -> None:
    """Let torch.compile lower ``scaled_linear`` to the autotuner's choice inside the compiled code
    (default on; ``FXSCALE_INDUCTOR_LOWERING=0`` turns it off: every call a custom-op call).
    ``triton_ops=False`` keeps the fused Triton GEMMs as custom-op calls (the lowering before
    they became a triton_op, for A/Bs). ``relu_cublas_max_m``: up to this M, a ReLU into fp8 goes
    to cuBLAS + a ReLU pass instead of the fused kernel (None: never).
    Takes effect at the next compile -- of a graph not in torch.compile's caches, which do not
    key on this switch (compile with ``torch._inductor.config.fx_graph_cache`` and
    ``torch._functorch.config.enable_autograd_cache`` off, as benchmarks/common.py's
    ``compile_fresh`` does)."""
    global _RELU_CUBLAS_MAX_M, _TRITON_OPS, _ENABLED, _HOOKED
    _RELU_CUBLAS_MAX_M = None if relu_cublas_max_m is None else int(relu_cublas_max_m)
    _TRITON_OPS = bool(triton_ops)
    _ENABLED = bool(enabled)
    if enabled and not _HOOKED:
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        from ..ops import gated_requantise, scaled_linear

        scaled_linear.register_torch_dispatch(FunctionalTensorMode, _functional_lowering)
        gated_requantise.register_torch_dispatch(FunctionalTensorMode, _gated_functional_lowering)
        _HOOKED = True


def lowering_enabled() -> bool:
    """Is the inductor lowering of ``scaled_linear`` on (see :func:`set_inductor_lowering`)?"""
    return _ENABLED


def _register() -> None:
    if os.environ.get("FXSCALE_INDUCTOR_LOWERING", "1") != "0":
        try:
            set_inductor_lowering(True)
        except (ImportError, AttributeError) as e:  # an inductor without these tables: custom op only
            _warn_once("lowering", f"fxscale: inductor lowering of scaled_linear not registered ({e})")


_register()

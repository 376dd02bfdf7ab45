"""The gated MLP's requantise (SwiGLU / GeGLU) in two light Triton passes: ``fxscale_kernels::gated_requantise``.

``h = act(gate) * up`` is where a Llama-style MLP needs a run-time scale (the product of two
bounds wastes many bits). Under torch.compile the unfused form reads ``gate`` and ``up`` four
times: ``fxscale.stats``' row maxima, its rescaled sums of squares, and the cast each recompute
``h`` (1151 us of a 8897 us 2-layer Llama prefill at 4x2048 on an H200, benchmarks/RESULTS.md).
Here:

1. :func:`_gated_stats_kernel` computes ``h`` tile by tile along whole rows (or row chunks at
   decode sizes), rounded to the inputs' dtype as
   eager rounds ``act(gate)`` and the product, and gathers ``max |h|`` over the finite elements
   (one int32 atomic max per program, the bits of a non-negative float ordered as the float)
   and each row's sum of squares in float64 (no overflow or underflow for any float32 value, so
   no rescaling pass; one atomic add per row and chunk);
2. :func:`_gated_cast_kernel` recomputes ``h`` and writes ``cast(h / s)`` with ``s`` chosen from
   the amax exactly as :meth:`fxscale.formats.Format.scale_tensor` does; it also writes ``s``
   and ``[amax, max row norm]`` (the norm: an atomic max per row block).

``h`` itself is never written: each pass reads ``gate`` and ``up`` once (strided views of the
fused gate/up GEMM's output are read in place). The op is a ``torch.library.triton_op``, so
inductor launches both kernels from its own code (and AOTInductor packages them); the CUDA
kernel of ``fxscale::gated_requantise`` calls it, and :mod:`fxscale.kernels.lowering` lowers
that op to it under torch.compile.

>>> # on a GPU: data, scale, st = torch.ops.fxscale_kernels.gated_requantise(g, u, "silu", torch.float8_e4m3fn)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..formats import MAX_SCALE, MIN_SCALE, get_format
from . import triton_fp8 as _tk
from .triton_elementwise import _choose_scale
from .triton_fp8 import _FP8_MAX, _OUT_KIND, ACT_CODES, _activation, _to_out

__all__ = ["gated_requantise"]

_ROUND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


@triton.jit
def _round(y, ROUND: tl.constexpr):
    """``y`` rounded to the inputs' dtype (as eager stores each op's result), back in float32."""
    if ROUND == 0:
        y = y.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 1:
        y = y.to(tl.float16).to(tl.float32)
    return y


@triton.jit
def _gated_tile(g_ptr, u_ptr, offs_m, offs_n, M, N, stride_g, stride_u, ACT: tl.constexpr, ROUND: tl.constexpr):
    valid = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m[:, None].to(tl.int64)
    g = tl.load(g_ptr + rows * stride_g + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows * stride_u + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)
    h = _round(_round(_activation(g, ACT), ROUND) * u, ROUND)
    return h, valid


@triton.jit
def _gated_stats_kernel(g_ptr, u_ptr, amax_ptr, rss_ptr, M, N, stride_g, stride_u,
                        ACT: tl.constexpr, ROUND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        CHUNK: tl.constexpr):
    """Program (i, j): rows ``i*BM..`` over columns ``j*CHUNK..`` (``CHUNK`` a multiple of BN),
    statistics kept in registers, then one atomic max and one atomic add per row."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    lo = tl.program_id(1) * CHUNK
    amax = tl.zeros([BM], dtype=tl.float32)
    rss = tl.zeros([BM], dtype=tl.float64)
    for k in tl.range(0, CHUNK, BN):  # host-side bounds (chunks never overlap; N masks the last)
        offs_n = lo + k + tl.arange(0, BN)
        h, valid = _gated_tile(g_ptr, u_ptr, offs_m, offs_n, M, N, stride_g, stride_u, ACT, ROUND)
        a = tl.where(valid & (tl.abs(h) < float("inf")), tl.abs(h), 0.0)  # finite elements only (NaN too)
        amax = tl.maximum(amax, tl.max(a, axis=1))
        a64 = a.to(tl.float64)
        rss += tl.sum(a64 * a64, axis=1)
    tl.atomic_max(amax_ptr, tl.max(amax, axis=0).to(tl.int32, bitcast=True))
    tl.atomic_add(rss_ptr + offs_m, rss, mask=offs_m < M)


@triton.jit
def _gated_cast_kernel(g_ptr, u_ptr, amax_ptr, rss_ptr, out_ptr, scale_ptr, st_ptr, M, N, stride_g, stride_u,
                       ACT: tl.constexpr, ROUND: tl.constexpr, FMT_MAX: tl.constexpr, POW2: tl.constexpr,
                       MIN_S: tl.constexpr, MAX_S: tl.constexpr, OUT_KIND: tl.constexpr, OUT_MAX: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr):
    """``st_ptr``: two zeroed int32 words, the bits of ``[amax, max row norm]``."""
    amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    s = _choose_scale(amax, FMT_MAX, POW2, MIN_S, MAX_S)
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    if tl.program_id(1) == 0:  # one program per row block: its rows' largest norm
        r = tl.load(rss_ptr + offs_m, mask=offs_m < M, other=0.0)
        tl.atomic_max(st_ptr + 1, tl.sqrt(tl.max(r, axis=0)).to(tl.float32).to(tl.int32, bitcast=True))
        if tl.program_id(0) == 0:
            tl.store(scale_ptr, s)
            tl.store(st_ptr, amax.to(tl.int32, bitcast=True))
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    h, valid = _gated_tile(g_ptr, u_ptr, offs_m, offs_n, M, N, stride_g, stride_u, ACT, ROUND)
    z = _to_out(h, s, OUT_KIND, OUT_MAX)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], z.to(out_ptr.dtype.element_ty),
             mask=valid)


def _tiles(M, N: int, device: torch.device) -> tuple[int, int, int]:
    """Rows and columns per tile, and how many column chunks the statistics pass splits N into:
    one chunk (whole rows, no atomics but one per row) when the row blocks alone fill the GPU;
    at decode sizes enough chunks for ~4 programs per SM."""
    if not isinstance(M, int):  # symbolic (prefill with a dynamic length)
        return 16, 512, 1
    bm, bn = (1 if M <= 1 else triton.next_power_of_2(M), 128) if M < 16 else (16, 512)
    sms = _tk._num_sms(device) if device.type == "cuda" else 132
    split = max(1, min(triton.cdiv(N, bn), triton.cdiv(4 * sms, triton.cdiv(M, bm))))
    return bm, bn, split


def _rows(t: Tensor, M, N) -> tuple[Tensor, int]:
    """``t`` as ``(M, N)`` with unit column stride (a view where the strides allow), its row stride."""
    t2 = t.reshape(M, N)
    if t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2, t2.stride(0)


@triton_op("fxscale_kernels::gated_requantise", mutates_args=())
def gated_requantise(gate: Tensor, up: Tensor, activation: str, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(cast(h / s), s, [amax, max row norm])`` for ``h = act(gate) * up`` (same shapes, any
    leading dims; ``out_dtype`` a float8 dtype, ``s`` as ``Format.scale_tensor(amax)``). M may be
    symbolic."""
    f = get_format(out_dtype)
    N = gate.shape[-1]
    M = gate.numel() // N if N else 0
    g2, sg = _rows(gate, M, N)
    u2, su = _rows(up, M, N)
    out = gate.new_empty(gate.shape, dtype=out_dtype)
    scale = gate.new_empty((), dtype=torch.float32)
    st = gate.new_zeros((2,), dtype=torch.float32)
    amax = gate.new_zeros((1,), dtype=torch.int32)
    rss = gate.new_zeros((M,), dtype=torch.float64)
    bm, bn, split = _tiles(M, N, gate.device)
    chunk = triton.cdiv(triton.cdiv(N, split), bn) * bn
    grid = ((M + bm - 1) // bm, (N + bn - 1) // bn)
    common = {"ACT": ACT_CODES[activation], "ROUND": _ROUND[gate.dtype], "BM": bm, "BN": bn, "num_warps": 4}
    wrap_triton(_gated_stats_kernel)[((M + bm - 1) // bm, triton.cdiv(N, chunk))](
        g2, u2, amax, rss, M, N, sg, su, CHUNK=chunk, **common)
    wrap_triton(_gated_cast_kernel)[grid](
        g2, u2, amax, rss, out, scale, st.view(torch.int32), M, N, sg, su, FMT_MAX=f.max, POW2=f.pow2,
        MIN_S=MIN_SCALE, MAX_S=MAX_SCALE, OUT_KIND=_OUT_KIND[out_dtype], OUT_MAX=_FP8_MAX[out_dtype], **common)
    return out, scale, st

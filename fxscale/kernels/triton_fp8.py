"""Triton kernels for the fxscale ops on NVIDIA GPUs (written for Hopper, run anywhere Triton does).

* :func:`linear` -- ``act(x @ w.T * x_scale * w_scale + bias) + residual`` with the epilogue
  fused: bias, activation, residual add, and either a plain bf16/fp32 store or the static
  output scale plus a saturating fp8 cast. With ``stats=True`` the epilogue also records
  ``max |y|`` (one atomic per tile) and each row's sum of squares (atomics per row), which is
  what a requantise needs (:func:`fxscale.kernels.triton_elementwise.requant_cast` then
  casts). Two variants: a persistent kernel that moves tiles with the tensor-memory
  accelerator (TMA; needs 16-byte aligned rows) and a masked pointer kernel for any shape; their
  tilings are in :mod:`fxscale.kernels.tilings`.

This module imports triton at the top: :mod:`fxscale.kernels` only imports it where CUDA and
triton are both available.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tilings import CONFIGS_GENERIC, CONFIGS_LARGE, Config, small_configs  # noqa: F401  (the autotuner reads them here)

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer kernel serves every shape
    TensorDescriptor = None

ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
# OUT_KIND: 0 plain store (bf16/fp32), 1 fp8 e4m3fn (Inf -> NaN), 2 fp8 e5m2 (Inf stays Inf)
_OUT_KIND = {torch.float8_e4m3fn: 1, torch.float8_e5m2: 2}
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
_OUT_DT = {torch.bfloat16: 0, torch.float32: 1, torch.float8_e4m3fn: 2, torch.float8_e5m2: 3,
           torch.float16: 4}
# Smallest byte (as uint8) of a negative NaN: e4m3fn has only 0xFF, e5m2 has 0xFD..0xFF.
_NEG_NAN_LO = {torch.float8_e4m3fn: 0xFF, torch.float8_e5m2: 0xFD}

HAS_TMA = TensorDescriptor is not None


# ------------------------------------------------------------------------------ epilogue
@triton.jit
def _activation(y, ACT: tl.constexpr):
    if ACT == 1:  # relu; NaN < 0 is false, so NaN stays NaN as in torch.relu
        y = tl.where(y < 0.0, 0.0, y)
    elif ACT == 2:  # gelu (erf)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 3:  # gelu (tanh): 0.5 * (1 + tanh(u)) == sigmoid(2u)
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    elif ACT == 4:  # silu
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _to_out(y, os, OUT_KIND: tl.constexpr, OUT_MAX: tl.constexpr):
    """Divide by the output scale and saturate into fp8 (NaN stays NaN, Inf per format)."""
    if OUT_KIND == 0:
        return y
    # A power-of-two scale (fxscale's default) divides exactly as a multiply by its reciprocal.
    bits = os.to(tl.int32, bitcast=True)
    expo = (bits >> 23) & 0xFF
    if ((bits & 0x7FFFFF) == 0) & (expo > 0) & (expo < 254):
        z = y * tl.math.div_rn(1.0, os)
    else:
        z = tl.math.div_rn(y, os)
    zc = tl.minimum(tl.maximum(z, -OUT_MAX), OUT_MAX)
    finite = tl.abs(z) < float("inf")  # false for NaN and +-Inf
    if OUT_KIND == 1:
        z = tl.where(finite, zc, float("nan"))
    else:
        z = tl.where(finite, zc, z)
    return z


@triton.jit
def _tile_epilogue(acc, offs_m, offs_n, M, N, scale, bias_ptr, res_ptr, amax_ptr, rss_ptr,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr, STATS: tl.constexpr):
    y = acc.to(tl.float32) * scale
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        y = y + b[None, :]
    y = _activation(y, ACT)
    valid = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RES:  # residual (M, N), contiguous, added after the activation
        r = tl.load(res_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], mask=valid, other=0.0)
        y = y + r.to(tl.float32)
    if STATS:
        isnan = valid & (y != y)  # noqa: PLR0124 (NaN test)
        ya = tl.where(valid & (y == y), tl.abs(y), 0.0)  # noqa: PLR0124
        tile_max = tl.max(tl.max(ya, axis=1), axis=0)
        n_nan = tl.sum(tl.sum(isnan.to(tl.int32), axis=1), axis=0)
        tile_max = tl.where(n_nan > 0, float("nan"), tile_max)
        # max |y| >= 0: int32 order of the bits is float order, and +NaN sorts above +Inf.
        tl.atomic_max(amax_ptr, tile_max.to(tl.int32, bitcast=True))
        tl.atomic_add(rss_ptr + offs_m, tl.sum(ya * ya, axis=1), mask=offs_m < M)
    return y


# ------------------------------------------------------------------------------ matmuls
@triton.jit
def _store_cast(y, OUT_DT: tl.constexpr):
    if OUT_DT == 0:
        c = y.to(tl.bfloat16)
    elif OUT_DT == 1:
        c = y.to(tl.float32)
    elif OUT_DT == 2:
        c = y.to(tl.float8e4nv)
    elif OUT_DT == 3:
        c = y.to(tl.float8e5)
    else:
        c = y.to(tl.float16)
    return c


@triton.jit
def _tma_tile(tile_id, a_desc, b_desc, c_desc, bias_ptr, res_ptr, amax_ptr, rss_ptr, scale, os,
              M, N, k_tiles, num_pid_m, num_pid_n,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
              ACC_INT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
              OUT_KIND: tl.constexpr, OUT_MAX: tl.constexpr, OUT_DT: tl.constexpr, STATS: tl.constexpr,
              SUBTILE: tl.constexpr):
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    off_m = pid_m * BM
    off_n = pid_n * BN
    if ACC_INT:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BK])
            b = b_desc.load([off_n, ki * BK])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BK])
            b = b_desc.load([off_n, ki * BK])
            acc = tl.dot(a, b.T, acc)
    offs_m = off_m + tl.arange(0, BM)
    if SUBTILE:  # epilogue on two (BM, BN/2) halves: half the registers and shared memory
        acc = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(acc)
        offs_n = off_n + tl.arange(0, BN // 2)
        y = _tile_epilogue(acc0, offs_m, offs_n, M, N, scale, bias_ptr, res_ptr, amax_ptr, rss_ptr,
                           HAS_BIAS, ACT, HAS_RES, STATS)
        c_desc.store([off_m, off_n], _store_cast(_to_out(y, os, OUT_KIND, OUT_MAX), OUT_DT))
        offs_n = offs_n + BN // 2
        y = _tile_epilogue(acc1, offs_m, offs_n, M, N, scale, bias_ptr, res_ptr, amax_ptr, rss_ptr,
                           HAS_BIAS, ACT, HAS_RES, STATS)
        c_desc.store([off_m, off_n + BN // 2], _store_cast(_to_out(y, os, OUT_KIND, OUT_MAX), OUT_DT))
    else:
        offs_n = off_n + tl.arange(0, BN)
        y = _tile_epilogue(acc, offs_m, offs_n, M, N, scale, bias_ptr, res_ptr, amax_ptr, rss_ptr,
                           HAS_BIAS, ACT, HAS_RES, STATS)
        c_desc.store([off_m, off_n], _store_cast(_to_out(y, os, OUT_KIND, OUT_MAX), OUT_DT))


@triton.jit
def _persistent_tiles(a_desc, b_desc, c_desc, xs_ptr, ws_ptr, os_ptr, bias_ptr, res_ptr, amax_ptr, rss_ptr,
                      M, N, K,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                      NUM_SMS: tl.constexpr, ACC_INT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      ACT: tl.constexpr, HAS_RES: tl.constexpr, OUT_KIND: tl.constexpr, OUT_MAX: tl.constexpr,
                      OUT_DT: tl.constexpr, STATS: tl.constexpr, FLATTEN: tl.constexpr,
                      SUBTILE: tl.constexpr):
    """Persistent: NUM_SMS programs walk the output tiles (grouped along M for L2 reuse). The body
    of both TMA kernels (host descriptors here, device descriptors in ``triton_ops``)."""
    start_pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    num_tiles = num_pid_m * num_pid_n
    scale = tl.load(xs_ptr) * tl.load(ws_ptr)
    os = 1.0
    if OUT_KIND != 0:
        os = tl.load(os_ptr)
    if FLATTEN:
        for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
            _tma_tile(tile_id, a_desc, b_desc, c_desc, bias_ptr, res_ptr, amax_ptr, rss_ptr, scale, os,
                      M, N, k_tiles, num_pid_m, num_pid_n, BM, BN, BK, GROUP_M, ACC_INT, HAS_BIAS,
                      ACT, HAS_RES, OUT_KIND, OUT_MAX, OUT_DT, STATS, SUBTILE)
    else:
        for tile_id in tl.range(start_pid, num_tiles, NUM_SMS):
            _tma_tile(tile_id, a_desc, b_desc, c_desc, bias_ptr, res_ptr, amax_ptr, rss_ptr, scale, os,
                      M, N, k_tiles, num_pid_m, num_pid_n, BM, BN, BK, GROUP_M, ACC_INT, HAS_BIAS,
                      ACT, HAS_RES, OUT_KIND, OUT_MAX, OUT_DT, STATS, SUBTILE)


@triton.jit
def _linear_tma_kernel(a_desc, b_desc, c_desc, xs_ptr, ws_ptr, bias_ptr, res_ptr, os_ptr, amax_ptr, rss_ptr,
                       M, N, K,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       NUM_SMS: tl.constexpr, ACC_INT: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ACT: tl.constexpr, HAS_RES: tl.constexpr, OUT_KIND: tl.constexpr, OUT_MAX: tl.constexpr,
                       OUT_DT: tl.constexpr, STATS: tl.constexpr, FLATTEN: tl.constexpr,
                       SUBTILE: tl.constexpr):
    """:func:`_persistent_tiles` on host-made tensor descriptors."""
    _persistent_tiles(a_desc, b_desc, c_desc, xs_ptr, ws_ptr, os_ptr, bias_ptr, res_ptr, amax_ptr, rss_ptr,
                      M, N, K, BM, BN, BK, GROUP_M, NUM_SMS, ACC_INT, HAS_BIAS, ACT, HAS_RES, OUT_KIND,
                      OUT_MAX, OUT_DT, STATS, FLATTEN, SUBTILE)


@triton.jit
def _linear_ptr_kernel(a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, res_ptr, os_ptr, amax_ptr, rss_ptr,
                       part_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                       ACC_INT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
                       OUT_KIND: tl.constexpr, OUT_MAX: tl.constexpr, STATS: tl.constexpr,
                       SPLIT_K: tl.constexpr):
    """Masked pointer kernel (any shape). With SPLIT_K > 1, program (t, k) sums its share of K
    into ``part`` (M, N) with atomics and :func:`_splitk_epilogue_kernel` finishes."""
    pid = tl.program_id(axis=0)
    pid_k = tl.program_id(axis=1)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    k_tiles = tl.cdiv(K, BK)
    k_per = tl.cdiv(k_tiles, SPLIT_K)
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, k_tiles)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + (k_lo * BK + offs_k)[None, :]
    b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + (k_lo * BK + offs_k)[None, :]
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[:, None] < N
    if ACC_INT:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for kt in range(k_lo, k_hi):
            kmask = offs_k[None, :] < K - kt * BK
            a = tl.load(a_ptrs, mask=m_ok & kmask, other=0)
            b = tl.load(b_ptrs, mask=n_ok & kmask, other=0)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
            a_ptrs += BK
            b_ptrs += BK
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kt in range(k_lo, k_hi):
            kmask = offs_k[None, :] < K - kt * BK
            a = tl.load(a_ptrs, mask=m_ok & kmask, other=0.0)
            b = tl.load(b_ptrs, mask=n_ok & kmask, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
            a_ptrs += BK
            b_ptrs += BK
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        p_ptrs = part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.atomic_add(p_ptrs, acc, mask=mask)
    else:
        scale = tl.load(xs_ptr) * tl.load(ws_ptr)
        y = _tile_epilogue(acc, offs_m, offs_n, M, N, scale, bias_ptr, res_ptr, amax_ptr, rss_ptr,
                           HAS_BIAS, ACT, HAS_RES, STATS)
        os = 1.0
        if OUT_KIND != 0:
            os = tl.load(os_ptr)
        y = _to_out(y, os, OUT_KIND, OUT_MAX)
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _splitk_epilogue_kernel(part_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, res_ptr, os_ptr, amax_ptr, rss_ptr,
                            M, N, stride_cm, BM: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                            ACT: tl.constexpr, HAS_RES: tl.constexpr, OUT_KIND: tl.constexpr, OUT_MAX: tl.constexpr,
                            STATS: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.load(part_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask, other=0)
    scale = tl.load(xs_ptr) * tl.load(ws_ptr)
    y = _tile_epilogue(acc, offs_m, offs_n, M, N, scale, bias_ptr, res_ptr, amax_ptr, rss_ptr, HAS_BIAS, ACT,
                       HAS_RES, STATS)
    os = 1.0
    if OUT_KIND != 0:
        os = tl.load(os_ptr)
    y = _to_out(y, os, OUT_KIND, OUT_MAX)
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], y.to(c_ptr.dtype.element_ty),
             mask=mask)


# ------------------------------------------------------------------------------ host side
_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def tma_ok(x2: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Can the TMA kernel take these operands? (16-byte aligned rows and base pointers)."""
    if not HAS_TMA:
        return False
    K, N = x2.shape[1], w.shape[0]
    esz = x2.element_size()
    osz = out_dtype.itemsize
    return (
        (K * esz) % 16 == 0
        and (N * osz) % 16 == 0
        and x2.is_contiguous()
        and w.is_contiguous()
        and x2.data_ptr() % 16 == 0
        and w.data_ptr() % 16 == 0
    )


def linear(x2: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None, activation: str, out_scale: torch.Tensor | None,
           out_dtype: torch.dtype, cfg: Config, *, stats: bool = False,
           residual: torch.Tensor | None = None):
    """``act(x2 @ w.T * x_scale * w_scale + bias)`` in one kernel; x2 ``(M, K)``, w ``(N, K)``.

    ``out_dtype`` float8 -> quantised with ``out_scale`` (saturating); bf16/fp32 -> plain.
    ``residual`` (contiguous ``(M, N)``) is added after the activation, before the output cast.
    With ``stats`` also returns the result's statistics as one float32 tensor of ``M + 1``:
    ``max |y|`` (NaN if any), then each row's sum of squares.
    """
    M, K = x2.shape
    N = w.shape[0]
    dev = x2.device
    out = torch.empty((M, N), device=dev, dtype=out_dtype)
    out_kind = _OUT_KIND.get(out_dtype, 0)
    out_max = _FP8_MAX.get(out_dtype, 0.0)
    acc_int = not x2.dtype.is_floating_point
    if stats:  # one buffer, one memset; the amax atomics work on int32 bits (order-preserving)
        buf = torch.zeros(M + 1, device=dev, dtype=torch.float32)
        amax, rss = buf[:1].view(torch.int32), buf[1:]
    else:
        amax = rss = x_scale  # unused pointers
    bias_arg = bias if bias is not None else x_scale
    res_arg = residual if residual is not None else x_scale
    os_arg = out_scale if out_kind else x_scale
    act = ACT_CODES[activation]
    if M == 0 or N == 0:
        return (out, buf) if stats else out
    if cfg.tma:
        nsm = _num_sms(dev)
        cbn = cfg.bn // 2 if cfg.subtile else cfg.bn
        a_desc = TensorDescriptor.from_tensor(x2, [cfg.bm, cfg.bk])
        b_desc = TensorDescriptor.from_tensor(w, [cfg.bn, cfg.bk])
        c_desc = TensorDescriptor.from_tensor(out, [cfg.bm, cbn])
        tiles = triton.cdiv(M, cfg.bm) * triton.cdiv(N, cfg.bn)
        grid = (min(nsm, tiles),)
        _linear_tma_kernel[grid](
            a_desc, b_desc, c_desc, x_scale, w_scale, bias_arg, res_arg, os_arg, amax, rss, M, N, K,
            BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, NUM_SMS=nsm, ACC_INT=acc_int,
            HAS_BIAS=bias is not None, ACT=act, HAS_RES=residual is not None, OUT_KIND=out_kind, OUT_MAX=out_max,
            OUT_DT=_OUT_DT[out_dtype], STATS=stats, FLATTEN=cfg.flatten, SUBTILE=cfg.subtile,
            num_stages=cfg.stages, num_warps=cfg.warps,
        )
    else:
        split = cfg.split_k if triton.cdiv(K, cfg.bk) >= cfg.split_k else 1
        part = (torch.zeros((M, N), device=dev, dtype=torch.int32 if acc_int else torch.float32)
                if split > 1 else x_scale)
        grid = (triton.cdiv(M, cfg.bm) * triton.cdiv(N, cfg.bn), split)
        _linear_ptr_kernel[grid](
            x2, w, out, x_scale, w_scale, bias_arg, res_arg, os_arg, amax, rss, part, M, N, K,
            x2.stride(0), w.stride(0), out.stride(0),
            BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, ACC_INT=acc_int,
            HAS_BIAS=bias is not None, ACT=act, HAS_RES=residual is not None, OUT_KIND=out_kind, OUT_MAX=out_max, STATS=stats,
            SPLIT_K=split, num_stages=cfg.stages, num_warps=cfg.warps,
        )
        if split > 1:
            ebm, ebn = 16, 256
            _splitk_epilogue_kernel[(triton.cdiv(M, ebm), triton.cdiv(N, ebn))](
                part, out, x_scale, w_scale, bias_arg, res_arg, os_arg, amax, rss, M, N, out.stride(0),
                BM=ebm, BN=ebn, HAS_BIAS=bias is not None, ACT=act, HAS_RES=residual is not None,
                OUT_KIND=out_kind, OUT_MAX=out_max,
                STATS=stats, num_warps=4,
            )
    return (out, buf) if stats else out

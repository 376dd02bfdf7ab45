"""The fused fp8 / int8 GEMM as a ``torch.library.triton_op``: visible to torch.compile and AOTInductor.

``torch.ops.fxscale_kernels.linear_triton`` runs the Triton matmul of
:mod:`fxscale.kernels.triton_fp8` (bias, activation, residual add, output scale and saturating
fp8 cast in the epilogue) for one tiling given by the caller. Its body launches the kernels
through :func:`torch.library.wrap_triton`, so when inductor compiles a graph that calls it,
inductor traces into the body and launches the kernels from its own generated code (Python or
C++): no custom-op dispatch per call, and an AOTInductor package holds the kernels as cubins.

The persistent TMA tiling builds its tensor descriptors on the device
(``tl.make_tensor_descriptor``): torch's tracing of ``wrap_triton`` does not carry host-side
descriptors (``TensorDescriptor.from_tensor``). Device descriptors need a small global scratch
buffer per program, which inductor's launchers allocate; for eager calls an allocator is set here.

Where the lowering uses it: :mod:`fxscale.kernels.lowering` (the tiling comes from the
autotuner of :mod:`fxscale.kernels.cuda`, measured once per shape at compile time).

>>> # on a GPU: cfg = tiling_args(tilings.CONFIGS_LARGE[0])
>>> # y = torch.ops.fxscale_kernels.linear_triton(xq, xs, wq, ws, b, None, hs, "relu", torch.float8_e4m3fn, cfg)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import triton_fp8 as _tk
from .tilings import Config
from .triton_fp8 import _FP8_MAX, _OUT_DT, _OUT_KIND, ACT_CODES, _persistent_tiles

__all__ = ["config_from_args", "linear_triton", "tiling_args"]

_FIELDS = ("bm", "bn", "bk", "stages", "warps", "group_m", "tma", "flatten", "subtile", "split_k")


def tiling_args(cfg: Config) -> list[int]:
    """A :class:`~fxscale.kernels.tilings.Config` as the ``list[int]`` the op takes."""
    return [int(getattr(cfg, f)) for f in _FIELDS]


def config_from_args(args: list[int]) -> Config:
    """The inverse of :func:`tiling_args`."""
    v = dict(zip(_FIELDS, (int(a) for a in args)))
    return Config(v["bm"], v["bn"], v["bk"], v["stages"], v["warps"], group_m=v["group_m"], tma=bool(v["tma"]),
                  flatten=bool(v["flatten"]), subtile=bool(v["subtile"]), split_k=v["split_k"])


@triton.jit
def _linear_tma_dev_kernel(a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, res_ptr, os_ptr, amax_ptr, rss_ptr,
                           M, N, K,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                           NUM_SMS: tl.constexpr, ACC_INT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           ACT: tl.constexpr, HAS_RES: tl.constexpr, OUT_KIND: tl.constexpr, OUT_MAX: tl.constexpr,
                           OUT_DT: tl.constexpr, STATS: tl.constexpr, FLATTEN: tl.constexpr,
                           SUBTILE: tl.constexpr):
    """``triton_fp8._linear_tma_kernel`` with its descriptors made on the device (rows contiguous)."""
    CBN: tl.constexpr = BN // 2 if SUBTILE else BN
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, CBN])
    _persistent_tiles(a_desc, b_desc, c_desc, xs_ptr, ws_ptr, os_ptr, bias_ptr, res_ptr, amax_ptr, rss_ptr,
                      M, N, K, BM, BN, BK, GROUP_M, NUM_SMS, ACC_INT, HAS_BIAS, ACT, HAS_RES, OUT_KIND,
                      OUT_MAX, OUT_DT, STATS, FLATTEN, SUBTILE)


_ALLOCATOR_SET = False


def _eager_allocator() -> None:
    """Device descriptors need global scratch; inductor's launchers bring their own allocator,
    eager launches use this one (set once, only if the process set none)."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET:
        return
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    _ALLOCATOR_SET = True


@triton_op("fxscale_kernels::linear_triton", mutates_args=())
def linear_triton(
    x: Tensor,
    x_scale: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    out_scale: Tensor | None,
    activation: str,
    out_dtype: torch.dtype,
    tiling: list[int],
) -> Tensor:
    """``act(x @ w.T * x_scale * w_scale + bias) + residual`` (then ``/ out_scale`` and a saturating
    cast where ``out_dtype`` is fp8); x ``(M, K)`` and w ``(N, K)`` contiguous, residual ``(M, N)``
    contiguous; ``tiling`` from :func:`tiling_args`. M may be symbolic."""
    cfg = config_from_args(tiling)
    M, K = x.shape
    N = w.shape[0]
    out = x.new_empty((M, N), dtype=out_dtype)
    out_kind = _OUT_KIND.get(out_dtype, 0)
    common = {
        "ACC_INT": not x.dtype.is_floating_point, "HAS_BIAS": bias is not None, "ACT": ACT_CODES[activation],
        "HAS_RES": residual is not None, "OUT_KIND": out_kind, "OUT_MAX": _FP8_MAX.get(out_dtype, 0.0), "STATS": False,
    }
    bias_arg = bias if bias is not None else x_scale  # unused pointers (their branches compile away)
    res_arg = residual if residual is not None else x_scale
    os_arg = out_scale if out_kind else x_scale
    from torch._library.triton import is_wrap_triton_enabled

    if not is_wrap_triton_enabled():
        _eager_allocator()
    if cfg.tma:
        nsm = _tk._num_sms(x.device)
        tiles = ((M + cfg.bm - 1) // cfg.bm) * ((N + cfg.bn - 1) // cfg.bn)
        wrap_triton(_linear_tma_dev_kernel)[(torch.sym_min(nsm, tiles),)](
            x, w, out, x_scale, w_scale, bias_arg, res_arg, os_arg, x_scale, x_scale, M, N, K,
            BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, NUM_SMS=nsm, OUT_DT=_OUT_DT[out_dtype],
            FLATTEN=cfg.flatten, SUBTILE=cfg.subtile, num_stages=cfg.stages, num_warps=cfg.warps, **common,
        )
        return out
    split = cfg.split_k if triton.cdiv(K, cfg.bk) >= cfg.split_k else 1
    part = (x.new_zeros((M, N), dtype=torch.int32 if common["ACC_INT"] else torch.float32)
            if split > 1 else x_scale)
    tiles = ((M + cfg.bm - 1) // cfg.bm) * ((N + cfg.bn - 1) // cfg.bn)
    wrap_triton(_tk._linear_ptr_kernel)[(tiles, split)](
        x, w, out, x_scale, w_scale, bias_arg, res_arg, os_arg, x_scale, x_scale, part, M, N, K,
        K, K, N, BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=cfg.group_m, SPLIT_K=split,
        num_stages=cfg.stages, num_warps=cfg.warps, **common,
    )
    if split > 1:
        ebm, ebn = 16, 256
        wrap_triton(_tk._splitk_epilogue_kernel)[((M + ebm - 1) // ebm, triton.cdiv(N, ebn))](
            part, out, x_scale, w_scale, bias_arg, res_arg, os_arg, x_scale, x_scale, M, N, N,
            BM=ebm, BN=ebn, HAS_BIAS=common["HAS_BIAS"], ACT=common["ACT"], HAS_RES=common["HAS_RES"],
            OUT_KIND=out_kind, OUT_MAX=common["OUT_MAX"], STATS=False, num_warps=4,
        )
    return out

"""Decode attention straight from the float8 K/V cache: ``fxscale_kernels::kv_decode_attention``.

The op computes what :func:`fxscale.kv_attention._attention` computes with ``kv_read`` +
``index_copy`` + a bool mask + SDPA, without dequantising the cache: slot ``j`` holds
``k_new[..., j - p0, :]`` for ``p0 <= j < p0 + S`` (``p0 = positions[0]``, read on the device;
``positions`` is ``arange(p0, p0 + S)``) and ``k_cache[..., j, :] * k_scale`` elsewhere; row
``r * S + i`` of ``query`` (the ``rep`` query heads of one KV head stacked) is step ``i`` at
position ``p0 + i`` and sees slot ``j`` iff ``j <= p0 + i``, ``j > p0 + i - window`` (if
``window``) and ``j >= pad[b]`` (if ``pad``; its own slot always).

On CUDA, for up to ``MAX_ROWS`` rows and a power-of-two head dim, two Triton kernels run
(split-KV "flash decoding"): each program takes one (batch, KV head, split of the context) and
every row of that head, reads float8 tiles, keeps an online softmax in float32 and writes its
partial (max, sum, acc); a second kernel combines the splits. Only the slots ``< p0 + S`` are
read, whatever the cache length. Elsewhere (CPU, prefill, other head dims, no triton) the body
is the ATen reference. As a ``triton_op`` it is traced into by inductor (and captured by CUDA
graphs: no host syncs); torch.export keeps it as one node, bounded by its rule.

>>> import torch
>>> q = torch.randn(1, 2, 4, 16)
>>> kc = torch.zeros(1, 2, 8, 16, dtype=torch.uint8)
>>> kn = torch.randn(1, 2, 1, 16)
>>> pos = torch.tensor([3])
>>> out = torch.ops.fxscale_kernels.kv_decode_attention(q, kc, kc, kn, kn, pos, 1.0, 1.0, None, 0.25, 0)
>>> out.shape
torch.Size([1, 2, 4, 16])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..bound import INF, Bound, fmax
from ..rules import register

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except Exception:  # noqa: BLE001  (no triton, e.g. CPU CI: the ATen reference serves)
    triton = tl = triton_op = wrap_triton = None

__all__ = ["HAS_TRITON", "MAX_ROWS", "decode_attention_reference", "decode_attention_triton", "kv_decode_attention",
           "with_new_kv"]

HAS_TRITON = triton is not None
MAX_ROWS = 64  # rows (rep * S) the kernel takes; more (prefill) go to the reference (SDPA)
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0


# ---------------------------------------------------------------------------- the reference
def with_new_kv(kc, vc, k_new, v_new, positions, pad, window: int, rep: int):
    """The dequantised caches ``kc``/``vc`` (B, Hkv, L, D) with the step's K/V written in at
    ``positions``, and the bool mask of the ``rep * S`` stacked query rows (row ``r * S + i``:
    step ``i``): causal over the slots, within ``window`` (0: none), not on row b's first
    ``pad[b]`` slots (its own slot always). ``(S, L)``, or ``(B, 1, rep * S, L)`` with ``pad``.

    >>> c, n = torch.zeros(1, 1, 4, 2), torch.ones(1, 1, 1, 2)
    >>> k, v, mask = with_new_kv(c, c, n, n, torch.tensor([1]), None, 0, 2)
    >>> k[0, 0, :, 0].tolist(), mask.int().tolist()
    ([0.0, 1.0, 0.0, 0.0], [[1, 1, 0, 0], [1, 1, 0, 0]])
    """
    k_all = kc.index_copy(2, positions, k_new.to(kc.dtype))
    v_all = vc.index_copy(2, positions, v_new.to(vc.dtype))
    slots = torch.arange(k_all.shape[2], device=positions.device)
    mask = slots[None, :] <= positions[:, None]  # (S, L): causal over the cache
    if window:  # transformers: key j is seen from query i where j > i - window
        mask = mask & (slots[None, :] > positions[:, None] - window)
    if pad is not None:  # left padding: row b's first pad[b] slots hold no token
        valid = slots[None, :] >= pad[:, None]  # (B, L)
        own = slots[None, :] == positions[:, None]  # a pad token sees itself: no row is all masked
        mask = ((mask[None] & valid[:, None, :]) | own[None])[:, None]  # (B, 1, S, L)
    if rep > 1:
        mask = mask.repeat(rep, 1) if mask.dim() == 2 else mask.repeat(1, 1, rep, 1)
    return k_all, v_all, mask


def decode_attention_reference(query, k_cache, v_cache, k_new, v_new, positions, k_scale, v_scale, pad, scaling,
                               window):
    """The op in ATen ops: dequantise, write the new K/V in, mask, SDPA (:func:`with_new_kv`).

    >>> q, c, n = torch.randn(1, 1, 1, 8), torch.zeros(1, 1, 4, 8, dtype=torch.uint8), torch.ones(1, 1, 1, 8)
    >>> decode_attention_reference(q, c, c, n, n, torch.tensor([0]), 1.0, 1.0, None, 1.0, 0)[0, 0, 0, :2]
    tensor([1., 1.])
    """
    dt = query.dtype
    kc = (k_cache.view(_FP8).to(torch.float32) * k_scale).to(dt)
    vc = (v_cache.view(_FP8).to(torch.float32) * v_scale).to(dt)
    rep = query.shape[2] // k_new.shape[2]
    k_all, v_all, mask = with_new_kv(kc, vc, k_new, v_new, positions, pad, window, rep)
    return nn.functional.scaled_dot_product_attention(query, k_all, v_all, attn_mask=mask, scale=scaling)


# ---------------------------------------------------------------------------- the kernels
if HAS_TRITON:

    @triton.jit
    def _softmax_step(s, v, m_i, l_i, acc, F32: tl.constexpr):
        """One online-softmax update with scores ``s`` (log2 units, -inf where masked)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if F32:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc * alpha[:, None] + pv

    @triton.jit
    def _cache_block(q, kc_base, vc_base, blk, lo, p0, qpos, window, ks2, m_i, l_i, acc, sk2, sk3, sv2, sv3,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, F32: tl.constexpr):
        """The online-softmax update with cache slots ``blk * BLOCK_N ...`` (those in ``[lo, p0)``)."""
        dims = tl.arange(0, D)
        offs = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = (offs >= lo) & (offs < p0)
        k = tl.load(kc_base + offs[:, None] * sk2 + dims[None, :] * sk3, mask=cmask[:, None], other=0)
        k = k.to(tl.float8e4nv, bitcast=True).to(q.dtype)
        v = tl.load(vc_base + offs[:, None] * sv2 + dims[None, :] * sv3, mask=cmask[:, None], other=0)
        v = v.to(tl.float8e4nv, bitcast=True).to(q.dtype)
        if F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * ks2
        else:
            s = tl.dot(q, tl.trans(k)) * ks2
        ok = cmask[None, :] & (qpos[:, None] >= 0)
        if HAS_WINDOW:
            ok = ok & (offs[None, :] > qpos[:, None] - window)
        s = tl.where(ok, s, float("-inf"))
        return _softmax_step(s, v, m_i, l_i, acc, F32)

    @triton.jit
    def _split_kernel(q_ptr, kc_ptr, vc_ptr, kn_ptr, vn_ptr, pos_ptr, pad_ptr, m_ptr, l_ptr, acc_ptr,
                      H, R, S, NSPLIT, k_scale, v_scale, qk_scale, window,
                      sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
                      sn0, sn1, sn2, sn3, sw0, sw1, sw2, sw3,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                      HAS_PAD: tl.constexpr, HAS_WINDOW: tl.constexpr, F32: tl.constexpr, WHILE: tl.constexpr):
        """Program (b * H + h, split): the split's cache slots (and, in the last split, the new ones)."""
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = tl.arange(0, BLOCK_R)
        dims = tl.arange(0, D)
        step = rows % S
        p0 = tl.load(pos_ptr)
        qpos = p0 + step
        q = tl.load(q_ptr + b * sq0 + h * sq1 + rows[:, None] * sq2 + dims[None, :] * sq3,
                    mask=rows[:, None] < R, other=0.0)
        dt = tl.float32 if F32 else q.dtype
        q = q.to(dt)
        pad_b = p0 * 0
        if HAS_PAD:
            pad_b = tl.load(pad_ptr + b).to(tl.int64)  # cache slots below pad[b] are never seen
        lo = pad_b
        if HAS_WINDOW:
            lo = tl.maximum(lo, p0 - window + 1)
        lo_blk = lo // BLOCK_N
        n_blk = tl.maximum((p0 + BLOCK_N - 1) // BLOCK_N - lo_blk, 0)
        per = (n_blk + NSPLIT - 1) // NSPLIT
        first = lo_blk + sp * per
        last = tl.minimum(first + per, lo_blk + n_blk)
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D], tl.float32)
        kc_base = kc_ptr + b * sk0 + h * sk1
        vc_base = vc_ptr + b * sv0 + h * sv1
        # Float arguments arrive as fp64 under inductor: the softmax state must stay fp32.
        ks2 = tl.cast(k_scale * qk_scale * 1.4426950408889634, tl.float32)
        qs2 = tl.cast(qk_scale * 1.4426950408889634, tl.float32)
        vsc = tl.cast(v_scale, tl.float32)
        if WHILE:  # the interpreter cannot run a for loop over device-computed bounds
            blk = first
            while blk < last:
                m_i, l_i, acc = _cache_block(q, kc_base, vc_base, blk, lo, p0, qpos, window, ks2, m_i, l_i, acc,
                                             sk2, sk3, sv2, sv3, D, BLOCK_N, HAS_WINDOW, F32)
                blk += 1
        else:
            for blk in range(first, last):
                m_i, l_i, acc = _cache_block(q, kc_base, vc_base, blk, lo, p0, qpos, window, ks2, m_i, l_i, acc,
                                             sk2, sk3, sv2, sv3, D, BLOCK_N, HAS_WINDOW, F32)
        acc = acc * vsc
        if sp == NSPLIT - 1:  # the step's own K/V, slots p0 .. p0 + S - 1
            news = tl.arange(0, BLOCK_S)
            nmask = news < S
            kn = tl.load(kn_ptr + b * sn0 + h * sn1 + news[:, None] * sn2 + dims[None, :] * sn3,
                         mask=nmask[:, None], other=0.0).to(dt)
            vn = tl.load(vn_ptr + b * sw0 + h * sw1 + news[:, None] * sw2 + dims[None, :] * sw3,
                         mask=nmask[:, None], other=0.0).to(dt)
            if F32:
                s = tl.dot(q, tl.trans(kn), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kn))
            s = s * qs2
            ok = nmask[None, :] & (news[None, :] <= step[:, None])
            if HAS_WINDOW:
                ok = ok & (news[None, :] > step[:, None] - window)
            if HAS_PAD:
                ok = ok & (((p0 + news)[None, :] >= pad_b) | (news[None, :] == step[:, None]))
            s = tl.where(ok, s, float("-inf"))
            m_i, l_i, acc = _softmax_step(s, vn, m_i, l_i, acc, F32)
        part = bh * NSPLIT + sp
        tl.store(m_ptr + part * BLOCK_R + rows, m_i)
        tl.store(l_ptr + part * BLOCK_R + rows, l_i)
        tl.store(acc_ptr + (part * BLOCK_R + rows[:, None]) * D + dims[None, :], acc)

    @triton.jit
    def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, H, NSPLIT, so0, so1, so2, so3,
                        D: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_P2: tl.constexpr):
        """Program (b * H + h, row): the splits' partial softmaxes combined into the output row."""
        bh = tl.program_id(0)
        r = tl.program_id(1)
        sps = tl.arange(0, SPLIT_P2)
        dims = tl.arange(0, D)
        smask = sps < NSPLIT
        idx = (bh * NSPLIT + sps) * BLOCK_R + r
        m = tl.load(m_ptr + idx, mask=smask, other=float("-inf"))
        lsum = tl.load(l_ptr + idx, mask=smask, other=0.0)
        acc = tl.load(acc_ptr + idx[:, None] * D + dims[None, :], mask=smask[:, None], other=0.0)
        m_max = tl.max(m, 0)  # finite: every row sees its own slot
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
        out = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
        b = bh // H
        h = bh % H
        tl.store(out_ptr + b * so0 + h * so1 + r * so2 + dims * so3, out.to(out_ptr.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    from .triton_fp8 import _num_sms as sms

    return sms(device)


def decode_attention_triton(query, k_cache, v_cache, k_new, v_new, positions, k_scale, v_scale, pad, scaling,
                            window, *, block_n: int = 64, nsplit: int | None = None, num_warps: int = 4):
    """The Triton kernels (what the op runs on CUDA); callable directly on CPU tensors under
    ``TRITON_INTERPRET=1`` (dots in float32 there), for tests. ``nsplit``: splits of the context
    (default: about two waves of the device's SMs)."""
    B, H, R, D = query.shape
    S, L = k_new.shape[2], k_cache.shape[2]
    cuda = query.device.type == "cuda"
    f32 = query.dtype == torch.float32 or not cuda
    # Block sizes are compile-time constants: int() of a symbolic size specialises it (a guard).
    block_r = max(16, triton.next_power_of_2(int(R)))
    if nsplit is None:
        nsplit = max(1, min(triton.cdiv(2 * _num_sms(query.device), int(B * H)), triton.cdiv(int(L), block_n), 64))
    m = query.new_empty((B * H, nsplit, block_r), dtype=torch.float32)
    lsum = torch.empty_like(m)
    acc = query.new_empty((B * H, nsplit, block_r, D), dtype=torch.float32)
    out = query.new_empty((B, H, R, D))
    launch = wrap_triton if cuda else (lambda k: k)
    pad_arg = pad if pad is not None else positions
    launch(_split_kernel)[(B * H, nsplit)](
        query, k_cache, v_cache, k_new, v_new, positions, pad_arg, m, lsum, acc,
        H, R, S, nsplit, float(k_scale), float(v_scale), float(scaling), int(window),
        *query.stride(), *k_cache.stride(), *v_cache.stride(), *k_new.stride(), *v_new.stride(),
        D=D, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_S=max(16, triton.next_power_of_2(int(S))),
        HAS_PAD=pad is not None, HAS_WINDOW=bool(window), F32=f32, WHILE=not cuda, num_warps=num_warps,
    )
    launch(_combine_kernel)[(B * H, R)](
        m, lsum, acc, out, H, nsplit, *out.stride(),
        D=D, BLOCK_R=block_r, SPLIT_P2=triton.next_power_of_2(nsplit), num_warps=4,
    )
    return out


def _kernel_takes(query: Tensor) -> bool:
    """Shapes (Python ints) and device the kernels serve; the rest run the reference."""
    d = query.shape[-1]
    return (HAS_TRITON and query.device.type == "cuda" and query.shape[2] <= MAX_ROWS
            and 16 <= d <= 256 and d & (d - 1) == 0)


def _op_body(query: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, positions: Tensor,
             k_scale: float, v_scale: float, pad: Tensor | None, scaling: float, window: int) -> Tensor:
    """Decode attention over a float8 cache (see the module docstring): ``query (B, Hkv, R, D)``,
    caches ``uint8 (B, Hkv, L, D)``, ``k_new``/``v_new (B, Hkv, S, D)``, ``positions (S,)``
    contiguous, ``pad (B,)`` or None, ``window`` 0 for none -> ``(B, Hkv, R, D)`` in query's dtype."""
    args = (query, k_cache, v_cache, k_new, v_new, positions, k_scale, v_scale, pad, scaling, window)
    if _kernel_takes(query):
        return decode_attention_triton(*args)
    return decode_attention_reference(*args)


if HAS_TRITON:
    kv_decode_attention = triton_op("fxscale_kernels::kv_decode_attention", _op_body, mutates_args=())
else:
    kv_decode_attention = torch.library.custom_op("fxscale_kernels::kv_decode_attention", _op_body, mutates_args=())


@kv_decode_attention.register_fake
def _(query, k_cache, v_cache, k_new, v_new, positions, k_scale, v_scale, pad, scaling, window):
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


@register(torch.ops.fxscale_kernels.kv_decode_attention.default)
def _kv_decode_attention_rule(c) -> Bound:
    """Each output row is a convex mix of V rows, each a cache row (``|v| <= 448 * v_scale``) or a
    row of ``v_new``. Not exact: the float32 softmax and the output rounding (the margin)."""
    cache = _FP8_MAX * abs(float(c["v_scale"]))
    d = int(c.out_shape[-1])
    vn = c["v_new"].bound
    return Bound(fmax(cache, vn.absmax), fmax(cache * math.sqrt(d), vn.rownorm), INF, fmax(cache * d, vn.rowsum))

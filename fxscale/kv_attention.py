"""The step graph of :mod:`fxscale.llm`: the float8 K/V cache read and the attention over it.

``fxscale::kv_read`` turns a cache of float8 bytes into ``data * scale`` (its rule: ``|v| <= 448 *
scale``, whatever the cache holds); :func:`_attention` is the transformers attention function
the step module runs under, attending to the cache with the call's new K/V written in (on CUDA
through ``fxscale_kernels::kv_decode_attention``, which reads the float8 cache in its Triton
kernel: :mod:`fxscale.kernels.decode_attention`);
:class:`_Step` is the module that is exported: ``(input_ids, positions, caches[, pad]) -> (logits,
k_0, v_0, ...)``; :func:`kv_bounds` reads the proven bounds of its K/V outputs (the cache scales).

>>> import torch
>>> data = torch.tensor([1.0, -2.0]).to(KV_FORMAT.dtype).view(torch.uint8)
>>> torch.ops.fxscale.kv_read(data, 0.5, torch.float32)
tensor([ 0.5000, -1.0000])
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
from torch import Tensor, nn

from .bound import Bound, fmax
from .formats import get_format
from .kernels.decode_attention import with_new_kv  # (and registers fxscale_kernels::kv_decode_attention)
from .rules import register

__all__ = ["KV_FORMAT", "kv_bounds", "kv_read"]

KV_FORMAT = get_format("float8_e4m3fn")
_IMPL = "fxscale_kv"


# ---------------------------------------------------------------------------- the cache read op
def _dequantise_kv(data: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    return (data.view(KV_FORMAT.dtype).to(torch.float32) * scale).to(dtype)


@torch.library.custom_op("fxscale::kv_read", mutates_args=())
def kv_read(data: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """A float8 cache stored as uint8 bytes -> ``data * scale`` in ``dtype``."""
    return _dequantise_kv(data, scale, dtype)


@kv_read.register_fake
def _(data: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    return torch.empty(data.shape, dtype=dtype, device=data.device)


def _kv_read_functional(mode, op, types, args, kwargs):
    """Under torch.compile's functionalization (AOTAutograd, which inductor traces through),
    ``kv_read`` is replaced by its ATen body, so inductor fuses the float8 -> bf16 read into the
    kernel that consumes it. As an opaque op it ran eagerly: three passes over the whole cache
    per K and V (fp8 -> fp32, x scale, -> bf16), 0.48 ms of a 1.23 ms batch-16 decode step on the
    H200 (2026-12-03). torch.export keeps the op: the bounds analysis has a rule for it."""
    from torch.export._trace import custom_triton_ops_decomposition_disabled

    if custom_triton_ops_decomposition_disabled():
        return mode.__torch_dispatch__(op, types, args, kwargs)
    with mode:
        return _dequantise_kv(*args, **kwargs)


def _hook_kv_read() -> None:
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    kv_read.register_torch_dispatch(FunctionalTensorMode, _kv_read_functional)


_hook_kv_read()


@register(torch.ops.fxscale.kv_read.default, exact=True)
def _kv_read_rule(c) -> Bound:
    """Every float8 value is at most the format's max: sound whatever the cache holds."""
    return Bound(KV_FORMAT.max * float(c["scale"]))


@register(torch.ops.aten.index_copy.default, exact=True)
def _index_copy_rule(c) -> Bound | None:
    """Each element (and, for a copy along another dim than the last, each row) comes from
    ``self`` or ``source``."""
    a, s = c["self"].bound, c["source"].bound
    nd = len(c.out_shape)
    if int(c["dim"]) % max(nd, 1) == nd - 1:
        return Bound(fmax(a.absmax, s.absmax))
    return Bound(fmax(a.absmax, s.absmax), fmax(a.rownorm, s.rownorm))


# ---------------------------------------------------------------------------- attention
class _Context:
    """What the attention function reads while the step module runs (set per call)."""

    def __init__(self, positions: Tensor, caches: tuple, scales: list[tuple[float, float]], pad: Tensor | None,
                 fresh: bool = False):
        self.positions, self.caches, self.scales, self.pad, self.fresh = positions, caches, scales, pad, fresh
        self.new_kv: dict[int, tuple[Tensor, Tensor]] = {}


_ACTIVE: list[_Context] = []

#: Devices whose step graph attends through ``fxscale_kernels::kv_decode_attention`` (the float8
#: cache read by the Triton kernel at decode, the op's SDPA reference at prefill) instead of
#: ``kv_read`` + ``index_copy`` + SDPA. Tests add ``"cpu"`` to run the op's reference there.
DECODE_OP_DEVICES: tuple[str, ...] = ("cuda",)


#: Keyword arguments transformers passes to attention functions that do not change what they
#: compute (positions and flags the cache and mask here already account for).
_HARMLESS = {"position_ids", "cache_position", "use_cache", "output_attentions", "output_hidden_states",
             "output_router_logits", "return_dict", "num_items_in_batch", "past_key_value", "past_key_values",
             "is_causal", "head_mask", "layer_idx", "position_embeddings", "query_length"}


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               softcap=None, **kwargs):
    """HF attention function: attend to the float8 cache with this call's K/V written into it.
    Sliding windows (Mistral, Gemma 2/3) and logit soft-capping (Gemma 2) are computed as
    transformers does; any other argument that changes attention is refused (not ignored)."""
    unknown = sorted(k for k, v in kwargs.items() if k not in _HARMLESS and v is not None and v is not False)
    if unknown or (dropout and module.training):
        raise NotImplementedError(
            f"fxscale.llm: this model's attention takes {unknown or ['dropout in training']}, which fxscale.llm's "
            "float8-cache attention does not implement; transform the model without wrap (fxscale.transform) "
            "instead of computing another function"
        )
    ctx = _ACTIVE[-1]
    i = module.layer_idx
    ks, vs = ctx.scales[i]
    ctx.new_kv[i] = (key, value)
    b, h, s, d = query.shape
    rep = h // key.shape[1]
    if ctx.fresh and not sliding_window and softcap is None:  # a new sequence: its own keys, causal
        out = nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                         enable_gqa=rep > 1)
        return out.transpose(1, 2), None
    if not ctx.fresh and softcap is None and query.device.type in DECODE_OP_DEVICES:
        return _decode_attention(query, key, value, ctx.caches[2 * i], ctx.caches[2 * i + 1], ctx.positions, ks, vs,
                                 ctx.pad, scaling, sliding_window), None
    # Grouped-query attention without copying the cache rep times: query head kv * rep + r reads
    # KV head kv (transformers' repeat_kv), so the rep query heads of one KV head are stacked as
    # rep * S query rows against that head's K/V (each row attends on its own).
    query = query.reshape(b, h // rep, rep * s, d)
    if ctx.fresh:  # windowed or soft-capped: the same masks, over this call's keys only
        kc = vc = torch.zeros_like(key, dtype=query.dtype)
    else:
        kc = torch.ops.fxscale.kv_read(ctx.caches[2 * i], ks, query.dtype)  # (B, Hkv, L, D)
        vc = torch.ops.fxscale.kv_read(ctx.caches[2 * i + 1], vs, query.dtype)
    k_all, v_all, mask = with_new_kv(kc, vc, key, value, ctx.positions, ctx.pad, int(sliding_window or 0), rep)
    if softcap is None:
        out = nn.functional.scaled_dot_product_attention(query, k_all, v_all, attn_mask=mask, scale=scaling)
    else:  # Gemma 2: scores soft-capped before the mask and softmax (no SDPA for that)
        scale = scaling if scaling is not None else d**-0.5
        scores = torch.matmul(query, k_all.transpose(-1, -2)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v_all.dtype), v_all)
    return out.reshape(b, h, s, d).transpose(1, 2), None


def _decode_attention(query, key, value, k_cache, v_cache, pos, ks, vs, pad, scaling, sliding_window) -> Tensor:
    """:func:`_attention` (no soft-cap) as one ``kv_decode_attention`` call: the rep query heads of
    a KV head stacked as rep * S rows, as the SDPA path does."""
    b, h, s, d = query.shape
    rep = h // key.shape[1]
    q = query.reshape(b, h // rep, rep * s, d)
    out = torch.ops.fxscale_kernels.kv_decode_attention(
        q, k_cache, v_cache, key.to(query.dtype), value.to(query.dtype), pos, ks, vs, pad,
        scaling if scaling is not None else d**-0.5, int(sliding_window or 0))
    return out.reshape(b, h, s, d).transpose(1, 2)


def _no_mask(*args, **kwargs):
    return None  # the attention function builds its own mask from the positions


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_IMPL, _attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(_IMPL, _no_mask)
    except ImportError:  # older transformers: no mask interface to register with
        pass


@contextlib.contextmanager
def _attn_implementation(lm: nn.Module, name: str):
    configs = [m.config for m in lm.modules() if hasattr(m, "config")]
    old = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = name
    try:
        yield
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o


class _Step(nn.Module):
    """``forward(input_ids, positions, caches[, pad]) -> (logits, k_0, v_0, k_1, ...)`` (what is
    exported). ``pad`` (B,): left-padding slots of each row (the padded step graph only): the
    row's token positions start after them and attention skips them. ``fresh``: the graph of a
    new unpadded sequence at positions ``0..S-1``, which reads no cache (``caches`` is empty):
    attention over its own keys is SDPA's ``is_causal`` (the flash kernels on the GPU), not a
    mask over the whole cache. ``last``: only the last position's logits ``(B, 1, vocab)``."""

    def __init__(self, lm: nn.Module, scales: list[tuple[float, float]], fresh: bool = False, last: bool = False):
        super().__init__()
        self.lm, self.scales, self.fresh = lm, scales, fresh
        # The logits of the last position only (generate()'s prefill: logits_to_keep=1), so the
        # LM head runs on one row, not S (a (B, S, vocab) tensor of 2 GB at 4x2048 x 128k in bf16).
        takes = "logits_to_keep" in inspect.signature(lm.forward).parameters
        self.keep = {"logits_to_keep": 1} if last and takes else {}

    def forward(self, input_ids: Tensor, positions: Tensor, caches: tuple[Tensor, ...] = (), pad: Tensor | None = None):
        ctx = _Context(positions, caches, self.scales, pad, self.fresh)
        _ACTIVE.append(ctx)
        try:
            with _attn_implementation(self.lm, _IMPL):
                pos = positions[None, :].expand(input_ids.shape[0], -1)
                if pad is not None:
                    pos = (pos - pad[:, None]).clamp(min=0)
                out = self.lm(input_ids=input_ids, position_ids=pos, use_cache=False, **self.keep)
        finally:
            _ACTIVE.pop()
        kv = [t for i in sorted(ctx.new_kv) for t in ctx.new_kv[i]]
        return (out.logits, *kv)


# ---------------------------------------------------------------------------- the K/V bounds
def kv_bounds(sm) -> list[float]:
    """Proven max |x| of each graph output after the logits (the new K and V of each layer)."""
    out = next(n for n in sm.graph.nodes if n.op == "output")
    leaves = torch.utils._pytree.tree_leaves(out.args[0])
    bounds = []
    for n in leaves[1:]:
        ni = n.meta.get("fxscale") if isinstance(n, torch.fx.Node) else None
        b = None if ni is None or ni.bound is None or ni.dynamic else float(ni.bound.absmax)
        if b is None or not math.isfinite(b):
            raise ValueError(
                f"fxscale.llm: no static bound for the K/V value {getattr(n, 'name', n)!r}: "
                f"{_unbounded_cause(n)}. A float8 cache needs a proven scale. Transform the model without a "
                "cache instead: fxscale.transform(lm, (ids,), dynamic_shapes=...), or torch.compile(lm, "
                "backend='fxscale')"
            )
        bounds.append(b)
    return bounds


def _unbounded_cause(n) -> str:
    """Where a value's missing or run-time bound comes from: the first node on its inputs'
    path whose bound is missing or dynamic while all its own inputs are static."""
    def bad(m) -> bool:
        ni = m.meta.get("fxscale") if isinstance(m, torch.fx.Node) else None
        return ni is not None and (ni.bound is None or ni.dynamic or not math.isfinite(float(ni.bound.absmax)))

    seen = set()
    while isinstance(n, torch.fx.Node) and n not in seen:
        seen.add(n)
        up = next((a for a in n.all_input_nodes if bad(a)), None)
        if up is None:
            break
        n = up
    ni = n.meta.get("fxscale") if isinstance(n, torch.fx.Node) else None
    if ni is None:
        return "its bound is unknown"
    what = "has no rule" if ni.bound is None else "is bounded only at run time (a measured amax)"
    why = f" ({ni.note})" if ni.reasons else ""
    return f"it follows from node {n.name!r} ({n.target}), which {what}{why}"


# ---------------------------------------------------------------------------- the step graph's inputs
def _dims(cfg) -> tuple[int, int, int]:
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, kv_heads, head_dim


def _example(lm: nn.Module, batch: int, max_len: int, kind: str = "step") -> tuple[tuple, tuple]:
    """Example arguments of the step graph (``kind`` "step", "padded", "fresh" or "fresh_last")
    and their dynamic shapes."""
    from torch.export import Dim

    layers, kv_heads, head_dim = _dims(lm.config)
    device = next(lm.parameters()).device
    seq = min(8, max_len)
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    pos = torch.arange(seq, device=device)
    # The cache length is dynamic too (any length up to max_len): no bound depends on it.
    s, b, n = Dim("fxscale_seq", max=max_len), Dim("fxscale_batch"), Dim("fxscale_cache", max=max_len)
    if kind.startswith("fresh"):
        return (ids, pos), ({0: b, 1: s}, {0: s})
    caches = tuple(torch.zeros(batch, kv_heads, max_len, head_dim, dtype=torch.uint8, device=device)
                   for _ in range(2 * layers))
    shapes = ({0: b, 1: s}, {0: s}, tuple({0: b, 2: n} for _ in caches))
    if kind == "step":
        return (ids, pos, caches), shapes
    return (ids, pos, caches, torch.zeros(batch, dtype=torch.long, device=device)), (*shapes, {0: b})

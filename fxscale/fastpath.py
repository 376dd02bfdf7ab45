"""PyTorch's fused inference fast path for ``nn.TransformerEncoderLayer``, written out.

Under ``torch.no_grad()`` in eval mode, ``nn.TransformerEncoderLayer.forward`` calls one fused
op, ``torch._transformer_encoder_layer_fwd``, which hides its six matmuls: Dynamo hands the
fxscale backend that one op, with no rule, and the whole layer ran in float32, silently.
:func:`decompose_fast_paths` replaces each such call (without a mask) by
:func:`encoder_layer`: the same arithmetic as the layer's own slow path (linear, SDPA,
LayerNorm, ReLU/GELU), which fxscale then captures op by op and quantises. Calls with a mask
are left as they are (the fused op's mask conventions and its nested-tensor padding are not
reproduced here); the backend warns about those.

>>> import torch
>>> layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
>>> x = torch.randn(2, 5, 16)
>>> with torch.no_grad():
...     fused = layer(x)                    # the fast path
>>> torch.backends.mha.set_fastpath_enabled(False)
>>> slow = layer(x)
>>> torch.backends.mha.set_fastpath_enabled(True)
>>> a = layer.self_attn
>>> out = encoder_layer(x, 16, 2, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias,
...                     False, False, 1e-5, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight,
...                     layer.norm2.bias, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight,
...                     layer.linear2.bias)
>>> bool(torch.allclose(out, slow, atol=1e-5)), bool(torch.allclose(out, fused, atol=1e-5))
(True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor, fx
from torch.nn import functional as F

__all__ = ["decompose_fast_paths", "encoder_layer"]


def encoder_layer(
    src: Tensor, embed_dim: int, num_heads: int, qkv_weight: Tensor, qkv_bias: Tensor, proj_weight: Tensor,
    proj_bias: Tensor, use_gelu: bool, norm_first: bool, eps: float, norm_weight_1: Tensor, norm_bias_1: Tensor,
    norm_weight_2: Tensor, norm_bias_2: Tensor, ffn_weight_1: Tensor, ffn_bias_1: Tensor, ffn_weight_2: Tensor,
    ffn_bias_2: Tensor, mask: Tensor | None = None, mask_type: int | None = None,
) -> Tensor:
    """``torch._transformer_encoder_layer_fwd`` without a mask, batch first: ``src`` is (B, S, E)."""
    if mask is not None:
        raise ValueError("encoder_layer: masks are not written out; call the fused op")
    e, h = int(embed_dim), int(num_heads)

    def attention(x: Tensor) -> Tensor:
        b, s, _ = x.shape
        qkv = F.linear(x, qkv_weight, qkv_bias).view(b, s, 3, h, e // h).permute(2, 0, 3, 1, 4)  # (3, B, H, S, Dh)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, S, Dh)
        return F.linear(a.transpose(1, 2).reshape(b, s, e), proj_weight, proj_bias)

    def feed_forward(x: Tensor) -> Tensor:
        y = F.linear(x, ffn_weight_1, ffn_bias_1)
        return F.linear(F.gelu(y) if use_gelu else F.relu(y), ffn_weight_2, ffn_bias_2)

    if norm_first:
        x = src + attention(F.layer_norm(src, (e,), norm_weight_1, norm_bias_1, eps))
        return x + feed_forward(F.layer_norm(x, (e,), norm_weight_2, norm_bias_2, eps))
    x = F.layer_norm(src + attention(src), (e,), norm_weight_1, norm_bias_1, eps)
    return F.layer_norm(x + feed_forward(x), (e,), norm_weight_2, norm_bias_2, eps)


_FUSED = (torch._transformer_encoder_layer_fwd, torch.ops.aten._transformer_encoder_layer_fwd.default)


def decompose_fast_paths(gm: fx.GraphModule) -> int:
    """Replace each mask-free fused encoder-layer call in ``gm`` by :func:`encoder_layer`
    (in place); returns how many were replaced."""
    count = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _FUSED:
            continue
        args = list(n.args) + [None] * max(0, 20 - len(n.args))
        if args[18] is not None or n.kwargs.get("mask") is not None:
            continue
        n.target = encoder_layer
        n.args = tuple(args[:18])
        n.kwargs = {}
        count += 1
    if count:
        gm.recompile()
    return count

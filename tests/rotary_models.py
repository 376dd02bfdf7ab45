"""A Llama-style attention block whose rotary embedding has the matmul form of the
transformers release on the GPU machine (5.17): ``inv_freq[None, :, None] @ position_ids[:, None, :].float()``.

Newer transformers (the CPU machine's) multiply elementwise instead, so the matmul form is
written out here: it is the case that collapsed a Llama's output when the positions were
stored in float8 (issue 14, item 1).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class MatmulRotary(nn.Module):
    """transformers 5.17's ``LlamaRotaryEmbedding.forward``, verbatim in its arithmetic."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = 1.0

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class RotaryBlock(nn.Module):
    """RMSNorm -> q/k/v -> rotary -> causal SDPA -> o_proj, + residual; positions made in forward."""

    def __init__(self, hidden: int = 64, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.norm = nn.RMSNorm(hidden, eps=1e-6)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.rotary = MatmulRotary(self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        position_ids = torch.arange(s, device=x.device).unsqueeze(0).expand(b, -1)
        cos, sin = self.rotary(x, position_ids)
        h = self.norm(x)
        q = self.q_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # (B, H, S, Dh)
        k = self.k_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o_proj(a.transpose(1, 2).reshape(b, s, -1))

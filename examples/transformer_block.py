"""fxscale on a GPT-style transformer block (nanoGPT style), d=256, T=64.

LayerNorm -> QKV linear -> causal scaled_dot_product_attention -> out-proj -> residual,
LayerNorm -> MLP (4x, GELU) -> residual. ``fxscale.transform`` in float8 e4m3; prints the
report, the SQNR vs float32 on fresh inputs, and a per-tensor dynamic-scaling baseline
computed here (every matmul operand quantised with its own amax, float32 compute; the
attention itself stays in float32 in the baseline too). Then the same model through
``torch.compile(model, backend="fxscale")`` if that backend is available.

    .venv/bin/python examples/transformer_block.py
"""

from __future__ import annotations

import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import fxscale  # noqa: F401  (registers torch.ops.fxscale.*)
from fxscale.api import transform
from fxscale.formats import get_format
from fxscale.metrics import sqnr_db

torch.manual_seed(0)
B, T, C, N_HEAD = 4, 64, 256, 4


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, q_fn=lambda t: t):
        B, T, C = x.size()  # (B, T, C)
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):  # (B, T, C)
        return self.c_proj(F.gelu(self.c_fc(x)))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, n_embd: int = C, n_head: int = N_HEAD):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):  # (B, T, C)
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


# ------------------------------------------------------------------ helpers

def fake_quant(t: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Per-tensor dynamic scaling: scale = amax / format max, cast, back to float32."""
    fmt = get_format(dtype)
    scale = t.abs().amax().clamp_min(1e-30) / fmt.max
    return (t / scale).to(dtype).to(torch.float32) * scale


def dynamic_baseline(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The block with every linear's activation and weight quantised by its own amax."""

    def lin(m: nn.Linear, t):
        return F.linear(fake_quant(t), fake_quant(m.weight), m.bias)

    a = block.attn
    B_, T_, C_ = x.shape
    h = block.ln_1(x)  # (B, T, C)
    q, k, v = lin(a.c_attn, h).split(C_, dim=2)  # 3 x (B, T, C)
    hs = C_ // a.n_head
    q, k, v = (t.view(B_, T_, a.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # float32 attention
    y = y.transpose(1, 2).contiguous().view(B_, T_, C_)  # (B, T, C)
    x = x + lin(a.c_proj, y)
    h = F.gelu(lin(block.mlp.c_fc, block.ln_2(x)))  # (B, T, 4C)
    return x + lin(block.mlp.c_proj, h)


def main() -> None:
    t_start = time.perf_counter()
    block = Block().eval()
    x_cal = torch.randn(B, T, C)  # example / calibration inputs
    x_new = torch.randn(2 * B, T, C)  # fresh inputs, another batch size
    print(f"GPT block: d={C}, heads={N_HEAD}, T={T}, MLP 4x GELU; torch {torch.__version__}")

    print("\n=== fxscale.transform(block, (x,), format='float8_e4m3fn') ===")
    t0 = time.perf_counter()
    sm = transform(block, (x_cal,), format="float8_e4m3fn")
    print(f"(transform took {time.perf_counter() - t0:.1f} s)\n")
    print(sm.report)
    rows = sm.report.rows
    fallbacks = [f"{r['node']} ({r['op']})" for r in rows if r.get("kind") == "fallback"]
    requant = [r["node"] for r in rows if r.get("requantise")]
    print(f"\nfallbacks (high precision): {fallbacks or 'none'}")
    print(f"requantise points: {requant or 'none'}")

    with torch.no_grad():
        ref = block(x_new)
        y = sm(x_new)
        base = dynamic_baseline(block, x_new)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    print(f"\nSQNR vs float32 on {tuple(x_new.shape)} fresh inputs:")
    print(f"  fxscale e4m3 (static)   {sqnr_db(ref, y):6.2f} dB")
    print(f"  per-tensor dynamic e4m3 {sqnr_db(ref, base):6.2f} dB   (amax of every matmul operand at run time)")
    # The residual stream carries x through unchanged; SQNR of the block's *update* is stricter.
    print(f"  on the update y - x:    fxscale {sqnr_db(ref - x_new, y - x_new):6.2f} dB, "
          f"dynamic {sqnr_db(ref - x_new, base - x_new):6.2f} dB")

    print('\n=== torch.compile(block, backend="fxscale") ===')
    try:
        import fxscale.backend  # noqa: F401  (registers the backend if the entry point is not installed)
    except ImportError as e:
        print(f"fxscale.backend not available ({e}); skipping")
    else:
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(block, backend="fxscale")
            with torch.no_grad():
                yc = compiled(x_new)
            print(f"compiled + first call took {time.perf_counter() - t0:.1f} s")
            print(f"  torch.compile(backend='fxscale') SQNR vs float32: {sqnr_db(ref, yc):6.2f} dB")
        except Exception as e:  # noqa: BLE001  (an example: report what happened and go on)
            print(f"torch.compile with backend='fxscale' failed: {type(e).__name__}: {e}")
            print("".join(traceback.format_exc().splitlines(keepends=True)[-6:]))
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()

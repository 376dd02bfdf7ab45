"""fxscale on a tensor-parallel Llama-style model: static fp8 scales, no amax collective.

A Llama-style decoder (RMSNorm, GQA attention with rotary embeddings, SiLU-gated MLP) is
parallelised with torch.distributed's own tensor parallelism (q/k/v, gate/up column-parallel;
o, down row-parallel; the LM head column-parallel with its logits gathered), then every rank
calls ``fxscale.transform`` on its own copy. The transform traces each rank's local graph
(collectives included), combines the weights' norms across ranks once, and proves scales that
are identical on every rank: the transformed graph holds the model's own all-reduces and
all-gather, and nothing else.

    torchrun --nproc-per-node 2 examples/tensor_parallel.py       # gloo on CPU, nccl on GPUs

``llama(...)``, ``tp_plan()`` and ``parallelise(...)`` are reused by the tests and by
``benchmarks/bench_tp.py``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):  # (B, T, d)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.head_dim = d // n_heads
        self.wq = nn.Linear(d, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin):  # x (B, T, d); cos, sin (T, hd)
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_heads / TP of them.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, h, T, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, kv, T, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, kv, T, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, h, T, hd)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, hd)
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):  # (B, T, d)
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, n_kv_heads: int, hidden: int):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.attn = Attention(d, n_heads, n_kv_heads)
        self.mlp = MLP(d, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Hidden states (B, T, d) in, logits (B, T, vocab) out (no embedding: inputs are declared)."""

    def __init__(self, d: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden: int, vocab: int, max_t: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(d, n_heads, n_kv_heads, hidden) for _ in range(n_layers))
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        hd = d // n_heads
        inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.outer(torch.arange(max_t, dtype=torch.float64), inv_freq)
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, x):  # (B, T, d)
        T = x.shape[1]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))  # (B, T, vocab)


def llama(d: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, hidden: int = 128,
          vocab: int = 96, max_t: int = 64, seed: int = 0) -> Llama:
    """A seeded random-weight Llama-style model (defaults: tiny, for CPU tests)."""
    torch.manual_seed(seed)
    model = Llama(d, n_layers, n_heads, n_kv_heads, hidden, vocab, max_t).eval()
    with torch.no_grad():
        for layer in model.layers:  # non-trivial norm gains, as in trained models
            layer.attn_norm.weight.uniform_(0.5, 1.5)
            layer.mlp_norm.weight.uniform_(0.5, 1.5)
    return model


def tp_plan() -> dict:
    """The Megatron-style plan: column-parallel in, row-parallel out; logits gathered."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for name in ("attn.wq", "attn.wk", "attn.wv", "mlp.gate", "mlp.up"):
        plan[f"layers.*.{name}"] = ColwiseParallel()
    for name in ("attn.wo", "mlp.down"):
        plan[f"layers.*.{name}"] = RowwiseParallel()
    plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def parallelise(model: nn.Module, device_type: str = "cpu") -> nn.Module:
    """``model`` parallelised in place over all ranks of the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    return parallelize_module(model, mesh, tp_plan())


def main() -> None:
    import torch.distributed as dist

    import fxscale

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = "cuda" if cuda else "cpu"
    model = parallelise(llama().to(dev), dev)
    torch.manual_seed(1)  # the same inputs on every rank (tensor parallelism replicates them)
    x = torch.randn(2, 16, 64, device=dev)
    sm = fxscale.transform(model, (x,), input_bounds=4.0 * x.abs().max().item())
    y, ref = sm(x), model(x)
    if rank == 0:
        err = ((y - ref).norm() / ref.norm()).item()
        n_coll = sum(1 for n in sm.graph.nodes if "_c10d_functional" in str(n.target) and "wait" not in str(n.target))
        print(sm.report)
        print(f"relative error vs the bf16/fp32 TP model: {err:.4f}; collectives in the graph: {n_coll}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

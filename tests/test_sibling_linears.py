"""passes/sibling_linears.py: linears reading one quantised input become one GEMM, exactly."""

from __future__ import annotations

import torch
from torch import nn

import fxscale

LIN = torch.ops.fxscale.scaled_linear.default


def _gemms(sm) -> int:
    return sum(n.target is LIN for n in sm.graph.nodes)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=128, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def test_llama__qkv_and_gate_up_are_one_gemm_each__and_the_logits_are_bit_identical():
    lm = _llama()
    ids = torch.randint(0, 100, (2, 8))
    fused, plain = fxscale.transform(lm, (ids,)), fxscale.transform(lm, (ids,), fuse_siblings=False)
    # per layer: q/k/v, o, gate/up, down; plus the LM head
    assert (_gemms(plain), _gemms(fused)) == (2 * 7 + 1, 2 * 4 + 1)
    torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=0, atol=0)
    # the report still has a row per projection, saying which GEMM computes it
    assert str(fused.report).count("computed by linear") == 2 * 5  # q, k, v, gate, up of each layer
    gemm = next(n for n in fused.graph.nodes if n.name == "linear_fused3")
    assert "one GEMM for the sibling linears linear, linear_1, linear_2" in gemm.meta["fxscale"].note


class _Three(nn.Module):
    def __init__(self, spread: float):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(32, 16, bias=True) for _ in range(3))
        with torch.no_grad():
            self.c.weight.mul_(spread)  # a weight 2^k smaller: its scale is 2^k smaller

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x)], -1)


@torch.no_grad()
def test_biases_are_concatenated_and_scales_that_differ_by_a_power_of_two_stay_exact():
    torch.manual_seed(0)
    m = _Three(spread=0.25)
    x = torch.randn(8, 32)
    fused, plain = fxscale.transform(m, (x,)), fxscale.transform(m, (x,), fuse_siblings=False)
    assert _gemms(fused) == 1
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    assert fxscale.sqnr_db(m(x), fused(x)) > 25


@torch.no_grad()
def test_a_weight_that_would_lose_bits_at_the_common_scale_keeps_its_own_gemm():
    """2^-12 times smaller: its small values would fall below e4m3's subnormals at the others'
    scale, so it is not fused (and its record says so); the result is unchanged."""
    torch.manual_seed(0)
    m = _Three(spread=2.0**-12)
    x = torch.randn(8, 32)
    fused, plain = fxscale.transform(m, (x,)), fxscale.transform(m, (x,), fuse_siblings=False)
    assert _gemms(fused) == 2
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    assert "loses bits at their scale" in str(fused.report)


class _Outputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 16), nn.Linear(32, 16)

    def forward(self, x):
        return self.a(x), self.b(x)


@torch.no_grad()
def test_linears_that_are_model_outputs_stay_separate__outputs_stay_contiguous():
    x = torch.randn(8, 32)
    sm = fxscale.transform(_Outputs(), (x,))
    assert _gemms(sm) == 2 and all(y.is_contiguous() for y in sm(x))

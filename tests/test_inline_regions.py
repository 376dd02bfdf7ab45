"""Regions that torch.export wraps in higher-order ops (``@torch.no_grad()``, ``autocast(enabled=False)``)
are inlined at capture, so their values get bounds like any other (transformers 5.17's Llama rotary
embedding is such a region: its cos/sin, and every K after them, had no bound and fxscale.llm.wrap
failed with "no static bound for the K/V value 'to_6'")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxscale
from passes.capture import capture


class _Rotaryish(nn.Module):
    """Linear -> times cos/sin of positions computed in a no_grad, autocast-disabled region."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 32)
        self.register_buffer("inv_freq", torch.rand(32))

    @torch.no_grad()
    def _angles(self, pos):
        with torch.autocast("cpu", enabled=False):
            f = pos[:, None].float() * self.inv_freq[None, :]
            return f.cos(), f.sin()

    def forward(self, x, pos):
        cos, sin = self._angles(pos)
        h = self.lin(x)
        return h * cos + h.flip(-1) * sin


def _hops(gm):
    return [n for n in gm.graph.nodes if isinstance(n.target, torch._ops.HigherOrderOperator)]


def test_capture__no_grad_and_autocast_off_regions__are_inlined():
    x, pos = torch.randn(8, 32), torch.arange(8)
    raw = torch.export.export(_Rotaryish(), (x, pos), strict=False).module()
    assert _hops(raw), "the export of this torch no longer wraps the region: the test needs another model"
    model = _Rotaryish()
    gm = capture(model, (x, pos), dynamic_batch=False)
    assert _hops(gm) == []
    assert torch.equal(gm(x, pos), model(x, pos))


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "int8"])
def test_transform__region_outputs_are_bounded_and_accurate(fmt):
    """Every float value gets a static bound (none left dynamic by the region), and the output is
    accurate against float32: SQNR above 20 dB (e4m3) / 30 dB (int8)."""
    torch.manual_seed(0)
    model = _Rotaryish()
    x, pos = torch.randn(8, 32), torch.arange(8)
    sm = fxscale.transform(model, (x, pos), format=fmt)
    assert _hops(sm) == []
    cosines = [n for n in sm.graph.nodes if n.op == "call_function" and "cos" in str(n.target)]
    assert cosines and all(n.meta["fxscale"].bound is not None for n in cosines)
    ref = model(x, pos)
    assert fxscale.sqnr_db(ref, sm(x, pos)) > (20 if fmt.startswith("float8") else 30)


@pytest.mark.slow
def test_llm_wrap__llama_with_a_no_grad_rotary__as_transformers_5_17_writes_it(monkeypatch):
    """transformers 5.17's LlamaRotaryEmbedding.forward is ``@torch.no_grad()`` with an
    ``autocast(enabled=False)`` block; newer releases dropped the decorator. Put it back and the
    wrap must still prove every K/V scale, and generate the float32 model's greedy tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    import fxscale.llm

    orig = modeling_llama.LlamaRotaryEmbedding.forward

    def forward(self, x, position_ids):
        with torch.autocast(x.device.type, enabled=False):
            return orig(self, x, position_ids)

    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", torch.no_grad()(forward))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=128, use_cache=False)
    lm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        lm.lm_head.weight.mul_(10)
    flm = fxscale.llm.wrap(lm, max_len=32)
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        want = lm.generate(ids, max_new_tokens=8, do_sample=False)
        got = flm.generate(ids, max_new_tokens=8, do_sample=False)
    assert (got == want).float().mean() >= 0.9

"""``fxscale.linear_only_baseline``: torchao-style per-tensor dynamic quantisation of Linear / Conv only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxscale
from fxscale.baselines import fake_quant
from fxscale.formats import get_format

E4M3, INT8 = get_format("e4m3"), get_format("int8")


def test_fake_quant__per_tensor_power_of_two_scale_from_amax():
    x = torch.tensor([0.3, -5.0, 100.0])
    y = fake_quant(x, INT8)  # amax 100 -> scale 1 (2^0: 100 / 1 <= 127)
    assert torch.equal(y, torch.tensor([0.0, -5.0, 100.0]))
    assert torch.equal(fake_quant(torch.zeros(3), E4M3), torch.zeros(3))


@pytest.mark.parametrize("fmt", [E4M3, INT8])
def test_linear_only__is_linear_on_fake_quantised_input_and_weight(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(4, 32) * 3
    run = fxscale.linear_only_baseline(lin, (x,), format=fmt)
    want = F.linear(fake_quant(x, fmt), fake_quant(lin.weight, fmt), lin.bias)
    assert torch.equal(run(x), want)
    assert not torch.equal(run(x), lin(x))  # it did quantise


class TiedLM(nn.Module):
    """Embedding tied to the LM head, an attention-like matmul and a functional F.linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight
        self.w = nn.Parameter(torch.randn(32, 32) / 6)

    def forward(self, ids):
        h = self.emb(ids)  # (B, T, 32)
        q = self.proj(h)
        a = torch.softmax(q @ h.transpose(-1, -2), -1) @ h  # not a Linear: full precision
        return self.head(F.linear(a, self.w))  # F.linear with a bare parameter: not a module


def test_linear_only__leaves_everything_but_linear_modules_in_model_precision():
    torch.manual_seed(0)
    m = TiedLM().eval()
    ids = torch.randint(0, 64, (2, 8))
    run = fxscale.linear_only_baseline(m, (ids,), format="e4m3")
    assert run.modules == ["proj", "head"]
    fq = lambda t: fake_quant(t, E4M3)
    h = m.emb(ids)  # the tied weight stays exact in the embedding
    q = F.linear(fq(h), fq(m.proj.weight), m.proj.bias)
    a = torch.softmax(q @ h.transpose(-1, -2), -1) @ h
    want = F.linear(fq(F.linear(a, m.w)), fq(m.emb.weight))
    with torch.no_grad():
        assert torch.equal(run(ids), want)


def test_linear_only__model_unchanged_after_a_call():
    torch.manual_seed(0)
    m = TiedLM().eval()
    ids = torch.randint(0, 64, (2, 8))
    before = {k: (id(v), v.clone()) for k, v in m.state_dict(keep_vars=True).items()}
    ref = m(ids)
    run = fxscale.linear_only_baseline(m, (ids,), format="int8")
    run(ids)
    after = m.state_dict(keep_vars=True)
    assert all(id(after[k]) == i and torch.equal(after[k], v) for k, (i, v) in before.items())
    assert m.head.weight is m.emb.weight
    assert not m.head._forward_pre_hooks and torch.equal(m(ids), ref)


def test_linear_only__convs_transformers_conv1d_weight_norm_and_filter():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=1))
    m = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), conv).eval()
    x = torch.randn(2, 4, 16)
    run = fxscale.linear_only_baseline(m, (x,), format="int8")
    assert run.modules == ["0", "1"]
    h = F.conv1d(fake_quant(x, INT8), fake_quant(m[0].weight, INT8), m[0].bias, padding=1)
    want = F.conv1d(fake_quant(h, INT8), fake_quant(conv.weight, INT8), conv.bias, padding=1)
    with torch.no_grad():
        assert torch.allclose(run(x), want, atol=1e-6)
        assert len(conv.parametrizations["weight"]) == 1  # the temporary parametrization is gone
    only_first = fxscale.linear_only_baseline(m, (x,), format="int8", filter_fn=lambda mod, name: name == "0")
    assert only_first.modules == ["0"]

    c1d = Conv1D(16, 8)  # GPT-2's linear: x @ W + b with W (in, out)
    y = torch.randn(3, 8)
    run = fxscale.linear_only_baseline(c1d, (y,), format="e4m3")
    assert run.modules == [""]
    assert torch.equal(run(y), fake_quant(y, E4M3) @ fake_quant(c1d.weight, E4M3) + c1d.bias)


def test_linear_only__warns_where_nothing_is_quantised():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()  # in-projection is a bare parameter
    x = torch.randn(2, 4, 16)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    with pytest.warns(UserWarning, match="nothing is quantised"):
        run = fxscale.linear_only_baseline(Wrap().eval(), (x,))
    assert run.modules == []

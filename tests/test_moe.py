"""Grouped (MoE expert) matmuls (issue 14, item 5): transformers' Mixtral / Qwen2-MoE experts run
through ``grouped_mm_fallback`` (one weight (E, K, N), rows grouped by expert); they stayed
float32 (~78% of the parameters). Now ``fxscale::scaled_grouped_mm`` with one static scale
per expert, quantised once at transform time."""

from __future__ import annotations

import pytest
import torch

import fxscale
from fxscale.bound import Bound
from fxscale.rules import Arg, evaluate

fxops = torch.ops.fxscale


def test__scaled_grouped_mm__matches_the_float_reference_per_group():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g)
    w = torch.randn(3, 8, 5, generator=g)
    offs = torch.tensor([4, 4, 9], dtype=torch.int32)  # expert 1 empty; row 9 past the last offset
    one = torch.tensor(1.0)
    y = fxops.scaled_grouped_mm(x, one, w, torch.ones(3), offs, torch.float32)
    ref = torch.zeros(10, 5)
    ref[:4], ref[4:9] = x[:4] @ w[0], x[4:9] @ w[2]
    torch.testing.assert_close(y, ref)
    y2 = fxops.scaled_grouped_mm(x, torch.tensor(0.5), w, torch.tensor([2.0, 1.0, 4.0]), offs, torch.float32)
    torch.testing.assert_close(y2[:4], ref[:4])
    torch.testing.assert_close(y2[4:9], 2 * ref[4:9])
    assert float(y2[9].abs().max()) == 0.0


def test__grouped_rule__bounds_every_expert():
    op = torch.ops.aten._grouped_mm.default
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 6, 7, generator=g, dtype=torch.float64)
    w[2] *= 30  # one loud expert
    (b,) = evaluate(op, (Arg(Bound.of_tensor(x), (12, 6)), Arg(Bound.of_tensor(w), (4, 6, 7)), None), {}, [(12, 7)])
    for e in range(4):  # any assignment of rows to experts
        out = x @ w[e]
        assert float(b.absmax) >= float(out.abs().max())
        assert float(b.rownorm) >= float(out.norm(dim=-1).max())


@torch.no_grad()
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test__moe_experts__quantised_with_per_expert_scales(arch):
    transformers = pytest.importorskip("transformers")
    common = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
    else:
        cfg = transformers.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                                          shared_expert_intermediate_size=128, **common)
    cfg.use_cache = False
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg).eval()
    ids = torch.randint(0, 128, (2, 16))
    sm = fxscale.transform(model, (ids,))
    grouped = [n for n in sm.graph.nodes if n.target is fxops.scaled_grouped_mm.default]
    assert len(grouped) == 2
    for n in grouped:
        scales = getattr(sm, n.args[3].target)
        assert scales.shape == (4,)  # one static scale per expert
    assert all(r["kind"] == "quantised" for r in sm.report.rows if "grouped_mm" in r["op"])
    ids2 = torch.randint(0, 128, (3, 16))
    ref = model(ids2).last_hidden_state
    lin = fxscale.linear_only_baseline(model, (ids,))(ids2).last_hidden_state
    assert fxscale.sqnr_db(ref, sm(ids2).last_hidden_state) >= fxscale.sqnr_db(ref, lin) - 1.0

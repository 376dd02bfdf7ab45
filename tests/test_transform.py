"""End-to-end: fxscale.transform against float32 and against per-tensor dynamic scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxscale
from fxscale.api import transform
from fxscale.metrics import sqnr_db

from . import models


def dynamic_baseline(model, args, fmt="float8_e4m3fn"):
    """Per-tensor dynamic scaling of every matmul operand, on ``args``."""
    return fxscale.dynamic_baseline(model, args, format=fmt)(*args)


def ffn(d=256, hidden=1024, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, d, bias=bias)).eval()


@torch.no_grad()
def test_mlp__e4m3_static_within_1db_of_dynamic():
    model = ffn()
    x = torch.randn(32, 256)
    sm = transform(model, (x,))
    xt = torch.randn(16, 256) * 3
    ref = model(xt)
    ours, dyn = sqnr_db(ref, sm(xt)), sqnr_db(ref, dynamic_baseline(model, (xt,)))
    assert ours >= 20.0
    assert ours >= dyn - 1.0, (ours, dyn)
    # No run-time amax after the input: the hidden layer's scale follows from the rules.
    assert sum(r["requantise"] for r in sm.report.rows) == 0


@torch.no_grad()
def test_transformer_block__e4m3_within_1db_of_dynamic():
    model, args = models.encoder_layer(batch=2, seq=16, d=64)
    sm = transform(model, args)
    xt = torch.randn(3, 16, 64)
    ref = model(xt)
    ours, dyn = sqnr_db(ref, sm(xt)), sqnr_db(ref, dynamic_baseline(model, (xt,)))
    assert ours >= 20.0
    assert ours >= dyn - 1.0, (ours, dyn)


@torch.no_grad()
def test_seed_ffn__int8_needs_requantise_points():
    torch.manual_seed(0)
    model = ffn(d=1024, hidden=4096, bias=False)
    x = torch.randn(10, 1024)
    ref = model(x)
    sm = transform(model, (x,), format="int8")
    assert sum(r["requantise"] for r in sm.report.rows) >= 1
    assert sqnr_db(ref, sm(x)) >= 25.0
    # The seed's rule without requantise points collapses (the notebook's all-zero output).
    seed = transform(model, (x,), format="int8", rules="absmax", requantise=False)
    assert sqnr_db(ref, seed(x)) < 10.0


@torch.no_grad()
def test_report__bounds_cover_observed_on_calibration():
    model, args = models.encoder_layer()
    calib = [(torch.randn(2, 8, 32) * 2,)]
    sm = transform(model, args, calibration=calib)
    checked = 0
    for r in sm.report.rows:
        if r["bound"] is not None and r["observed"] is not None:
            assert r["bound"] >= r["observed"], r
            checked += 1
    assert checked > 20
    text = str(sm.report)
    assert "requantise" in text and "wasted" in text


@torch.no_grad()
def test_other_batch_sizes__work():
    model = ffn()
    sm = transform(model, (torch.randn(8, 256),))
    for b in (1, 5, 64):
        xt = torch.randn(b, 256)
        assert sqnr_db(model(xt), sm(xt)) >= 20.0


@torch.no_grad()
def test_outputs__keep_structure_and_dtype():
    model, args = models.gpt2()
    sm = transform(model, args)
    out, ref = sm(*args), model(*args)
    assert type(out) is type(ref)
    assert out.logits.dtype == ref.logits.dtype and out.logits.shape == ref.logits.shape
    assert sqnr_db(ref.logits, out.logits) >= 20.0


@torch.no_grad()
def test_declared_bounds__make_every_scale_static():
    model = ffn()
    # A declared bound gives max|x| only (row norms follow as sqrt(D) max|x|): allow 6 binades.
    sm = transform(model, (torch.randn(8, 256),), input_bounds=6.0, threshold=6.0)
    code = sm.code
    assert "stats" not in code and "scale_from_amax" not in code
    assert all(r["scale"] is not None for r in sm.report.rows if r["stores"] is not None)
    xt = (torch.rand(4, 256) * 12 - 6)
    assert sqnr_db(model(xt), sm(xt)) >= 20.0


@torch.no_grad()
def test_dynamic_region__scales_follow_the_input():
    """Without declared bounds, the hidden scale is computed from the input's measurement."""
    model = ffn()
    sm = transform(model, (torch.randn(8, 256),))
    for mag in (1e-3, 1.0, 1e3):
        xt = torch.randn(4, 256) * mag
        assert sqnr_db(model(xt), sm(xt)) >= 20.0


@torch.no_grad()
@pytest.mark.parametrize("name", ["mlp", "encoder_layer"])
def test_transformed_module__compiles_into_one_graph(name):
    """Run-time scales (ScaleFn: the rules on 0-d tensors) trace without a graph break or a
    host sync, so the whole module is one graph (and CUDA-graph capturable on the GPU)."""
    model, args = getattr(models, name)()
    sm = transform(model, args)
    # each a function torch.compile keeps opaque (allow_in_graph): guarded by identity only
    assert any(n.op == "call_function" and getattr(n.target, "__name__", "").startswith("fxscale_scale")
               for n in sm.graph.nodes)
    compiled = torch.compile(sm, fullgraph=True)
    x = args[0] * 1.5
    assert torch.allclose(compiled(x), sm(x), rtol=1e-4, atol=1e-4)


def test_format_option__accepts_names_and_dtypes():
    model = ffn(d=32, hidden=64)
    x = torch.randn(4, 32)
    for f in ("e4m3", "float8_e5m2", torch.int8, "int16"):
        sm = transform(model, (x,), format=f)
        assert sqnr_db(model(x), sm(x)) > 15
    with pytest.raises(ValueError, match="unknown format"):
        transform(model, (x,), format="fp4")


def test_public_api__exports_transform():
    assert fxscale.transform is transform


def test_compiled_with_declared_bounds__checks_inputs_and_needs_no_autograd():
    """Parameters left in high precision (biases) must not drag autograd into torch.compile."""
    model = ffn(d=32, hidden=64)
    sm = transform(model, (torch.randn(4, 32),), format="int8", input_bounds=4.0)
    compiled = torch.compile(sm)
    x = torch.randn(4, 32).clamp(-4, 4)
    assert torch.allclose(compiled(x), sm(x), rtol=1e-4, atol=1e-4)
    assert model[0].bias.requires_grad  # the user's model is untouched
    with pytest.raises(ValueError, match="beyond its declared bound"):
        compiled(torch.full((4, 32), 5.0))


def test_compiled_int8__nan_input_raises_not_garbage():
    model = ffn(d=32, hidden=64)
    compiled = torch.compile(transform(model, (torch.randn(4, 32),), format="int8", input_bounds=4.0))
    x = torch.randn(4, 32).clamp(-4, 4)
    x[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="no NaN"):
        compiled(x)


def test_other_sequence_length__says_what_to_do():
    model, args = models.gpt2(seq=8)
    sm = transform(model, args)
    with pytest.raises(ValueError, match="declare the dim with its maximum.*dynamic_shapes"):
        sm(torch.randint(0, 100, (2, 5)))


@torch.no_grad()
def test_exact_scales__win_up_to_a_bit_in_int8_and_stay_sound():
    """'int8:exact' scales by amax / 127 instead of the next power of two."""
    model = ffn()
    x = torch.randn(32, 256)
    xt = torch.randn(64, 256)
    ref = model(xt)
    pow2 = transform(model, (x,), format="int8")
    exact = transform(model, (x,), format="int8:exact")
    assert sqnr_db(ref, exact(xt)) >= sqnr_db(ref, pow2(xt)) + 1.0
    assert all(r["ratio"] <= 1 + 1e-6 for r in fxscale.audit(exact, xt * 3))
    assert {r["format"] for r in exact.report.rows if r["format"]} == {"int8:exact"}
    with pytest.raises(ValueError, match="exact"):
        transform(model, (x,), format="int8:fast")


def test_run_time_scales__opaque_to_dynamo():
    """Dynamo writes each ScaleFn call into its graph without tracing into it (allow_in_graph),
    so it guards the function's identity, not the ScaleFn's Python state, on every call."""
    model, args = models.encoder_layer()
    sm = transform(model, args)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(sm, backend=backend, fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()
    calls = [n for g in graphs for n in g.graph.nodes
             if n.op == "call_function" and getattr(n.target, "__name__", "").startswith("fxscale_scale")]
    assert len(calls) >= 1


@torch.no_grad()
def test_run_time_scale_through_an_integer_indexed_gather_runs_and_matches_float32():
    """Longformer's global-attention gather, reduced: a zeros buffer filled by index_put from
    v[indices], then a matmul. Transform worked; every call raised "cannot choose a scale for
    non-finite max |x| = inf": the run-time scale function had no shape for the integer
    indices, so no (unknown) bound for them (found by a new-user trial)."""

    class GlobalGather(torch.nn.Module):
        def forward(self, probs, v, bi, si):
            z = v.new_zeros(v.shape[0], 4, *v.shape[2:])
            z[bi, si] = v[bi, si]
            return torch.matmul(probs.transpose(1, 2).clone(), z.transpose(1, 2).clone())

    torch.manual_seed(0)
    probs, v = torch.rand(2, 32, 4, 4), torch.randn(2, 32, 4, 16)
    bi, si = torch.arange(2).repeat_interleave(4), torch.arange(4).repeat(2)
    m = GlobalGather().eval()
    sm = fxscale.transform(m, (probs, v, bi, si))
    assert sqnr_db(m(probs, v, bi, si), sm(probs, v, bi, si)) > 20
    v3 = 3 * torch.randn(2, 32, 4, 16)
    assert sqnr_db(m(probs, v3, bi, si), sm(probs, v3, bi, si)) > 20


@torch.no_grad()
def test_multihead_attention_as_cross_attention_quantises_its_split_in_projection():
    """query is not key: nn.MultiheadAttention splits in_proj_weight into q / k / v at run time,
    which left those linears reading run-time weights, in float32 (SigLIP's pooling head; found
    by a user trial). The split of a constant folds into three constant weights."""
    torch.manual_seed(0)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, q, kv):
            return self.mha(q, kv, kv, need_weights=False)[0]

    m = Cross().eval()
    q, kv = torch.randn(2, 3, 32), torch.randn(2, 10, 32)
    sm = fxscale.transform(m, (q, kv))
    linears = [r for r in sm.report.rows if r["node"].startswith("linear")]
    assert len(linears) >= 3 and all(r["computes"] == "float8_e4m3fn" for r in linears), linears
    assert sqnr_db(m(q, kv), sm(q, kv)) > 20

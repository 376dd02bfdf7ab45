"""Dynamic sequence length with a declared maximum: bounds proven for every size up to it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim

import fxscale
from fxscale.metrics import sqnr_db

from . import models


class PoolAndAttend(nn.Module):
    """A sum over the sequence (grows with its length) and an attention (a convex mix: does not)."""

    def __init__(self, d: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(d, 32), nn.Linear(32, 8)
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):  # (B, S, d)
        pooled = self.b(self.a(x).sum(1))  # (B, 8)
        att = nn.functional.scaled_dot_product_attention(self.q(x), self.k(x), x)  # (B, S, d)
        return pooled, att


def _pool_sm(max_len=128):
    model = PoolAndAttend().eval()
    sm = fxscale.transform(
        model, (torch.randn(2, 8, 16),), dynamic_shapes=({1: Dim("seq", max=max_len)},),
        input_bounds=4.0, on_overflow="clamp", threshold=100,  # no requantise: the static proof only
    )
    return model, sm


@torch.no_grad()
def test_dynamic_seq__report_says_which_bounds_grow_with_the_maximum():
    _, sm = _pool_sm(128)
    rows = {r["node"]: r for r in sm.report.rows}
    grows = {r["op"] for r in sm.report.rows if r["grows_with_max"]}
    assert "aten.sum" in grows  # the sum over the sequence
    assert rows["scaled_dot_product_attention"]["grows_with_max"] is False  # a convex mix
    s = next(r for r in sm.report.rows if r["op"] == "aten.sum")
    # Proven at 128 rows, 16x the example's 8: the sum's absmax bound scales with the length.
    assert s["bound"] == pytest.approx(16 * s["bound_at_example"], rel=0.02)
    assert "grows with the declared maximum" in s["note"]
    assert "grow with the declared maximum size" in sm.report.summary_line()


@torch.no_grad()
def test_dynamic_seq__every_length_up_to_the_maximum_runs_and_matches_float32():
    model, sm = _pool_sm(128)
    for s in (1, 2, 7, 8, 33, 128):
        x = (2 * torch.randn(3, s, 16)).clamp(-4, 4)
        ref, out = model(x), sm(x)
        assert out[0].shape == ref[0].shape and out[1].shape == ref[1].shape
        assert sqnr_db(ref[0], out[0]) > 18, s
        assert sqnr_db(ref[1], out[1]) > 18, s


@torch.no_grad()
def test_dynamic_seq__adversarial_input_at_the_maximum_does_not_overflow():
    """All inputs at +-bound, signs aligned with the weights, at the maximum length: the sum
    is as large as it gets, and stays within the proven bound (no fp8 saturation)."""
    model, sm = _pool_sm(128)
    sign = torch.sign(model.a.weight.sum(0))  # drives every hidden unit the same way
    for s in (8, 128):
        x = (4.0 * sign).expand(2, s, 16).contiguous()
        ref, out = model(x), sm(x)
        assert torch.isfinite(out[0]).all()
        assert sqnr_db(ref[0], out[0]) > 18  # saturation would cap the output: far lower SQNR
        pooled = model.a(x).sum(1)
        s_row = next(r for r in sm.report.rows if r["op"] == "aten.sum")
        assert float(pooled.abs().max()) <= s_row["bound"]


def test_dynamic_seq__beyond_the_maximum_raises_naming_it():
    _, sm = _pool_sm(16)
    with pytest.raises(ValueError, match="16"):
        sm(torch.randn(2, 17, 16))


def test_dynamic_seq__a_dim_without_maximum_is_refused():
    with pytest.raises(ValueError, match="without a maximum"):
        fxscale.transform(PoolAndAttend().eval(), (torch.randn(2, 8, 16),), dynamic_shapes=({1: Dim("seq")},))


@pytest.mark.slow
@torch.no_grad()
def test_dynamic_seq__llama_prefill_at_any_length_without_retransforming():
    model, (ids,) = models.llama(batch=2, seq=16)
    sm = fxscale.transform(model, (ids,), dynamic_shapes=({1: Dim("seq", max=64)},))
    for s in (1, 5, 16, 64):
        x = torch.randint(0, 100, (3, s))
        ref = model(x).last_hidden_state
        assert sqnr_db(ref, sm(x).last_hidden_state) > 20, s


@pytest.mark.slow
@torch.no_grad()
def test_backend__max_size_transforms_once_for_all_lengths():
    from fxscale import backend

    model, _ = models.llama(batch=2, seq=16)
    n0 = len(backend.reports())
    fast = torch.compile(model, backend="fxscale", options={"max_size": 64, "inductor": False, "strict": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in (16, 17, 20, 3, 64):
            x = torch.randint(0, 100, (2, s))
            assert sqnr_db(model(x).last_hidden_state, fast(x).last_hidden_state) > 20
    # The first length is static (Dynamo's first compile), the second makes the dim dynamic.
    assert len(backend.reports()) - n0 == 2


@torch.no_grad()
def test_backend__without_max_size_a_growing_length_is_transformed_once_per_doubling():
    """No flag: a length Dynamo made dynamic is proven for the next power of two (at least 64),
    so lengths 9..64 share one transform and 65..128 the next (was: one transform per length,
    with a warning to pass max_size; a new-user trial timed generate() at 124 s for 4 tokens)."""
    from fxscale import backend

    model = PoolAndAttend().eval()
    n0 = len(backend.reports())
    fast = torch.compile(model, backend="fxscale", options={"inductor": False, "strict": True})
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        for s in (8, 9, 20, 33, 64, 65, 100, 3):
            x = torch.randn(2, s, 16)
            for ref, out in zip(model(x), fast(x)):
                assert sqnr_db(ref, out) > 20, s
    # 8: Dynamo's static first graph; 9..64: one (max 64); 65, 100: one (max 128); 3: in the first.
    assert len(backend.reports()) - n0 == 3
    assert not [w for w in ws if "transforming again" in str(w.message)]
    assert any(r.get("grows_with_max") for r in backend.reports()[-1].rows)  # the pooled sum: proven at 128
    with pytest.raises(ValueError, match="beyond the declared max_size=32"):
        bounded = torch.compile(model, backend="fxscale", options={"inductor": False, "strict": True, "max_size": 32})
        for s in (8, 9, 40):
            bounded(torch.randn(2, s, 16))


@torch.no_grad()
def test_dynamic_seq__named_dims_the_solver_rejects_are_retried_as_auto_with_the_same_maximum(monkeypatch):
    """torch 2.11 cannot show some model guards hold over a named Dim's whole range (Llama on
    transformers 5.17: 'Constraints violated (seq)'); capture retries with Dim.AUTO over the
    same range, so the maximum is still declared and proven."""
    real = torch.export.export
    calls = []

    def flaky(model, args, *a, dynamic_shapes=None, **kw):
        calls.append(dynamic_shapes)
        if len(calls) == 1:
            raise RuntimeError("Constraints violated (seq)! Not all values of seq satisfy the generated guard")
        return real(model, args, *a, dynamic_shapes=dynamic_shapes, **kw)

    monkeypatch.setattr(torch.export, "export", flaky)
    model = PoolAndAttend().eval()
    sm = fxscale.transform(model, (torch.randn(2, 8, 16),), dynamic_shapes=({1: Dim("seq", max=32)},),
                           input_bounds=4.0, on_overflow="clamp", threshold=100)
    assert len(calls) == 2 and "AUTO" in str(calls[1])
    s = next(r for r in sm.report.rows if r["op"] == "aten.sum")
    assert s["bound"] == pytest.approx(4 * s["bound_at_example"], rel=0.02)  # proven at 32 = 4 x 8
    x = torch.randn(2, 32, 16).clamp(-4, 4)
    assert sqnr_db(model(x)[0], sm(x)[0]) > 18
    with pytest.raises(ValueError):
        sm(torch.randn(2, 33, 16))


class _Scan(torch.nn.Module):
    """A Python loop over the sequence (a scan): export fixes the declared dim."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        h, outs = torch.zeros_like(x[:, 0]), []
        for i in range(x.shape[1]):
            h = 0.5 * h + x[:, i]
            outs.append(h)
        return self.lin(torch.stack(outs, 1))


def test_declared_dim_the_model_fixes__warns_at_transform_naming_it():
    """A declared dim the model's code specialises: a warning at transform time names the input
    and the dim (it used to pass silently, then every other length failed with advice to
    declare what was declared), and the call-time error points back to it."""
    from torch.export import Dim

    with pytest.warns(UserWarning, match=r"dim 1 of 'x' \(fixed at 16\)"):
        sm = fxscale.transform(_Scan().eval(), (torch.randn(2, 16, 8),), dynamic_shapes=({1: Dim("seq", max=64)},))
    with pytest.raises(ValueError, match="Declared it already"):
        sm(torch.randn(2, 9, 8))

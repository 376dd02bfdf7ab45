"""Regression tests for issue 11's capture / run-time holes (cases 4-12, 15-18): bounds that
held for the example only, state shared with (or taken from) the original model, input checks
that were skipped, run-time scales that under- or overflowed, non-finite values lost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxscale

from .holes import max_ratio as _max_ratio
from .holes import quiet_transform as _transform


def _mlp(seed=0, d=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


# ---------------------------------------------------------------- case 4: a batch size used as a number
class _TimesBatch(nn.Module):
    def __init__(self, div: bool):
        super().__init__()
        self.div = div
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x / x.shape[0] if self.div else x * x.shape[0])


@pytest.mark.parametrize("div", [False, True])
def test_batch_size_used_as_a_number__bound_holds_for_every_batch(div):
    torch.manual_seed(0)
    model = _TimesBatch(div).eval()
    sm = _transform(model, (torch.rand(8, 16),), format="e4m3", input_bounds=1.0)
    for b in (1, 2, 64):
        x = torch.ones(b, 16) if not div else torch.full((b, 16), 1.0) * (1 if b > 1 else 1.0)
        assert _max_ratio(sm, x) <= 1.0, b
        torch.testing.assert_close(sm(x), model(x), rtol=0.1, atol=0.1 * float(model(x).abs().max()))


# ---------------------------------------------------------------- cases 5, 6: in-place ops
class _ViewMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x)
        v = h[:, :8]
        h.mul_(1000)  # v sees this
        return self.b(v)


class _IndexAssign(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        h[:, :4] = 5.0
        return self.b(h)


@pytest.mark.parametrize("cls", [_ViewMul, _IndexAssign])
def test_in_place_ops__are_seen_by_the_bounds_and_the_quantise(cls):
    torch.manual_seed(0)
    model = cls().eval()
    sm = _transform(model, (torch.rand(4, 16),), format="e4m3", input_bounds=1.0)
    x = torch.rand(8, 16) * 2 - 1
    assert _max_ratio(sm, x) <= 1.0
    ref = model(x)
    assert fxscale.sqnr_db(sm(x), ref) > 20


# ---------------------------------------------------------------- case 7: keyword arguments
class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fx, self.fy = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x, y):
        return self.fx(x) + self.fy(y)


@pytest.mark.parametrize("on_overflow", ["raise", "clamp"])
def test_keyword_arguments_in_another_order__are_checked_against_their_own_bound(on_overflow):
    torch.manual_seed(0)
    model = _TwoInputs().eval()
    sm = _transform(model, (torch.rand(4, 8), torch.rand(4, 8)), input_bounds=[1.0, 2.0], on_overflow=on_overflow)
    X, Y = torch.rand(4, 8), torch.full((4, 8), 100.0)
    if on_overflow == "raise":
        with pytest.raises(ValueError, match="'y'"):
            sm(y=Y, x=X)
        ok = torch.rand(4, 8)
        torch.testing.assert_close(sm(y=ok, x=X), sm(X, ok))
    else:
        torch.testing.assert_close(sm(y=Y, x=X), sm(X, Y))
        assert _max_ratio(sm, X, Y.clamp(max=2.0)) <= 1.0


# ---------------------------------------------------------------- case 8: integer / bool inputs
class _IntScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, n):
        return self.fc(x * n)


def test_integer_input_with_a_declared_bound__is_checked_and_proven():
    torch.manual_seed(0)
    model = _IntScale().eval()
    n = torch.full((4, 1), 3)
    sm = _transform(model, (torch.rand(4, 8), n), input_bounds=[1.0, 3])
    assert _max_ratio(sm, torch.ones(4, 8), n) <= 1.0
    with pytest.raises(ValueError, match="'n'"):
        sm(torch.ones(4, 8), torch.full((4, 1), 50))


# ---------------------------------------------------------------- cases 9, 10, 11: weights and state
def _cnn(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m


def test_load_state_dict_then_transform_again__uses_the_new_constants():
    model, other = _cnn(0), _cnn(1)
    with torch.no_grad():
        other[1].running_var.fill_(1e-4)  # 100x the gain
    x = torch.rand(2, 3, 6, 6)
    _transform(model, (x,), input_bounds=1.0)
    model.load_state_dict(other.state_dict())
    sm = _transform(model, (x,), input_bounds=1.0)
    assert _max_ratio(sm, torch.ones(2, 3, 6, 6)) <= 1.0
    assert _max_ratio(sm, x) <= 1.0


def test_transformed_module__holds_its_own_copy_of_every_tensor():
    model = _cnn(0)
    x = torch.rand(2, 3, 6, 6)
    sm = _transform(model, (x,), input_bounds=1.0)
    before = sm(x)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype.is_floating_point:
                t.mul_(30)
    torch.testing.assert_close(sm(x), before)


def test_sm_load_state_dict__of_other_weights_raises_and_of_its_own_works():
    model, other = _mlp(0), _mlp(1)
    x = torch.rand(4, 16)
    sm = _transform(model, (x,))
    sm.load_state_dict(sm.state_dict())  # its own: fine
    sm_other = _transform(other, (x,))
    with pytest.raises(ValueError, match="transform"):
        sm.load_state_dict(sm_other.state_dict())


@pytest.mark.parametrize("fmt", ["e4m3", "int8", "int8:exact"])
def test_sm_load_state_dict__of_the_float_models_weights_names_each_that_differs(fmt):
    """A float model's state dict (its weights under their own names, which the transformed
    module holds quantised): the original's passes, another model's weights are named, not
    skipped (with strict=False they used to be dropped without a word)."""
    model, other = _mlp(0), _mlp(1)
    sm = _transform(model, (torch.rand(4, 16),), format=fmt)
    sm.load_state_dict(model.state_dict(), strict=False)
    with pytest.raises(ValueError, match=r"weight"):
        sm.load_state_dict(other.state_dict(), strict=False)


# ---------------------------------------------------------------- case 12: tiny inputs
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int16", "int8"])
@pytest.mark.parametrize("mag", [1e-20, 1e-25, 1e-30])
def test_tiny_inputs_without_declared_bounds__keep_their_values(fmt, mag):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8, bias=False)).eval()
    sm = _transform(model, (torch.randn(4, 16),), format=fmt)
    x = torch.randn(8, 16) * mag
    ref = model(x)
    assert _max_ratio(sm, x) <= 1.0
    assert fxscale.sqnr_db(sm(x), ref) > 10


# ---------------------------------------------------------------- cases 15, 16, 17: non-finite values
def test_on_overflow_clamp__keeps_inf_non_finite():
    sm = _transform(_mlp(0), (torch.rand(4, 16),), input_bounds=1.0, on_overflow="clamp")
    x = torch.rand(4, 16)
    x[1, 3] = float("inf")
    y = sm(x)
    assert not torch.isfinite(y[1]).all() and torch.isfinite(y[0]).all()


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("declared", [None, 1.0])
def test_nonfinite_raise__catches_inf_as_well_as_nan(value, declared):
    sm = _transform(_mlp(0), (torch.rand(4, 16),), input_bounds=declared, nonfinite="raise")
    x = torch.rand(4, 16)
    x[2, 0] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        sm(x)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_nonfinite_row__leaves_the_other_rows_finite(fmt):
    model = _mlp(0)
    sm = _transform(model, (torch.randn(4, 16),), format=fmt)
    x = torch.randn(6, 16)
    x[2, 5] = float("inf")
    x[4, 1] = float("nan")
    y, ref = sm(x), model(x)
    keep = [0, 1, 3, 5]
    assert torch.isfinite(y[keep]).all()
    assert fxscale.sqnr_db(y[keep], ref[keep]) > 15
    assert not torch.isfinite(y[2]).all() and not torch.isfinite(y[4]).all()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int8"])
@pytest.mark.parametrize("mag", [3e37, 1e38])
def test_huge_finite_inputs__give_finite_outputs(fmt, mag):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    sm = _transform(model, (torch.randn(4, 64),), format=fmt)
    x = (torch.randn(4, 64) * mag).clamp(-3e38, 3e38)
    ref = model(x)
    assert torch.isfinite(ref).all()
    y = sm(x)
    assert torch.isfinite(y).all()
    assert fxscale.sqnr_db(y, ref) > 10


# ---------------------------------------------------------------- case 18: calibration leaves the model alone
class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("calls", torch.ones(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x)


def test_transform__does_not_run_the_models_state_updates():
    model = _Counter().eval()
    sm = _transform(model, (torch.rand(4, 8),), calibration=[(torch.rand(4, 8),)])
    assert float(model.calls) == 1.0
    sm(torch.rand(2, 8))
    assert float(model.calls) == 1.0  # sm holds its own counter


class _CounterGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)
        self.register_buffer("calls", torch.ones(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.fc2(self.fc(x) * self.calls)  # grows with every call


def test_buffer_updated_by_the_forward__is_not_bounded_as_a_constant():
    torch.manual_seed(0)
    sm = _transform(_CounterGain().eval(), (torch.rand(4, 8),), format="e4m3", input_bounds=1.0)
    for _ in range(20):
        sm(torch.rand(4, 8))
    assert _max_ratio(sm, torch.ones(4, 8)) <= 1.0

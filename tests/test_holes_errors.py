"""Regression tests for issue 11 case 19: errors that did not say what happened, and the
``:exact`` scale that rounded down by one float32 ulp."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxscale.formats import get_format

from .holes import quiet_transform as _transform


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("declared", [None, 2.0])
def test_inf_in_the_example_input__raises_naming_the_input(declared):
    x = torch.rand(4, 8)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="calibration input 'input' holds Inf"):  # forward's name, not export's
        _transform(_mlp(), (x,), input_bounds=declared)  # was: ValueError: math domain error


@pytest.mark.parametrize("declared", [None, 20.0])
def test_input_of_another_rank__names_the_input_and_the_example_rank(declared):
    sm = _transform(_mlp(), (torch.randn(4, 8),), input_bounds=declared)
    with pytest.raises(ValueError, match=r"input 'input' has 1 dimension.*transformed for 2"):
        sm(torch.randn(8))


def test_meta_device_input_with_a_bound__is_not_read():
    sm = _transform(_mlp(), (torch.randn(4, 8),), input_bounds=2.0)
    from fxscale.module import _check_inputs

    _check_inputs(sm, (torch.empty(4, 8, device="meta"),), {})  # was: .item() on meta


def test_input_bounds_as_a_0d_tensor__is_a_number():
    sm = _transform(_mlp(), (torch.rand(4, 8),), input_bounds=torch.tensor(2.0))
    with pytest.raises(ValueError, match="declared bound 2"):
        sm(torch.full((4, 8), 3.0))


def test_inf_weight__error_names_the_weight():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"weight '2.weight'|2_weight|weight.*NaN or Inf"):
        _transform(model, (torch.rand(4, 8),))


def test_large_input_inside_a_large_declared_pair__passes_the_check():
    sm = _transform(_mlp(), (torch.rand(4, 8),), input_bounds=[(1e20, 1e20)])
    x = torch.full((4, 8), 3e19) * torch.tensor([1.0] + [0.0] * 7)
    sm(x)  # was: rejected with "row norm = inf"


def test_float64_input_beyond_float32_range__raises_against_its_bound():
    model = _mlp().double()
    sm = _transform(model, (torch.rand(4, 8, dtype=torch.float64),), input_bounds=4.0)
    with pytest.raises(ValueError, match="beyond its declared bound"):
        sm(torch.full((4, 8), 1e39, dtype=torch.float64))


@pytest.mark.parametrize("declared", [None, 4.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bfloat16])
def test_input_of_another_dtype__raises_a_type_error_naming_the_input(dtype, declared):
    """Transformed for float32: a float64 / int64 / bf16 input used to run silently (against bounds
    and scales proven for float32); now a TypeError names the input and both dtypes."""
    sm = _transform(_mlp(), (torch.rand(4, 8),), input_bounds=declared)
    with pytest.raises(TypeError, match=r"input 'input' has dtype torch\.\w+, but the model was transformed "
                                        r"for torch\.float32"):
        sm(torch.ones(4, 8).to(dtype))
    with pytest.raises(TypeError, match="input 'input' has dtype"):
        sm(input=torch.ones(4, 8).to(dtype))  # by keyword (forward's name) too
    sm(torch.ones(4, 8))  # float32 still runs


class _WithInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x, k: int):
        return self.fc(x) * k


def test_python_int_changed__guard_message_says_so():
    sm = _transform(_WithInt().eval(), (torch.randn(4, 8), 3))
    with pytest.raises(ValueError, match="non-tensor input"):
        sm(torch.randn(4, 8), 5)


@pytest.mark.parametrize("fmt", ["int8:exact", "e4m3:exact"])
@pytest.mark.parametrize("amax", [1.0, 3.7, 1e-3, 123.456, 1 / 3])
def test_exact_scales__never_round_below_amax_over_max(fmt, amax):
    f = get_format(fmt)
    s = f.scale_for(amax)
    assert float(torch.tensor(s, dtype=torch.float32)) == s
    assert s * f.max >= amax
    st = float(f.scale_tensor(torch.tensor(amax, dtype=torch.float64)))
    assert st * f.max >= amax

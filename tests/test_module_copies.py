"""A transformed module under the nn.Module calls users make on it: copy.deepcopy keeps its
guards, a dtype conversion (sm.half(), sm.to(torch.bfloat16)) raises instead of silently
turning its float8 data and scales into another dtype (found by a user trial)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fxscale
from fxscale.module import ScaledGraphModule


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()


@torch.no_grad()
def test_deepcopy__keeps_the_input_guard_the_report_and_the_config():
    x = torch.rand(8, 64) * 2 - 1
    sm = fxscale.transform(_mlp(), (x,), input_bounds=1.0)
    c = copy.deepcopy(sm)
    assert isinstance(c, ScaledGraphModule) and c.config == sm.config and c.report.table() == sm.report.table()
    assert torch.equal(c(x), sm(x))
    with pytest.raises(ValueError, match="beyond its declared bound"):
        c(x * 50)  # the copy ran it unguarded: relative error 0.95
    with pytest.raises(TypeError, match="float64"):
        c(x.double())
    assert c.state_dict().keys() == sm.state_dict().keys()
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(c.state_dict().values(), sm.state_dict().values()))


@torch.no_grad()
def test_deepcopy__keeps_the_run_time_scale_twin_of_on_overflow_requantise():
    x = torch.rand(8, 64) * 2 - 1
    sm = fxscale.transform(_mlp(), (x,), input_bounds=1.0, on_overflow="requantise")
    c = copy.deepcopy(sm)
    big = x * 50
    assert torch.equal(c(big), sm(big))


@pytest.mark.parametrize("convert", [lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.float(),
                                     lambda m: m.to(torch.float16), lambda m: m.double()])
def test_dtype_conversion__raises_and_leaves_the_module_as_it_was(convert):
    """With small weights the scales underflowed to 0 in float16: an all-zero output, silently."""
    x = torch.randn(8, 64)
    sm = fxscale.transform(_mlp(), (x,))
    before = {k: v.dtype for k, v in sm.state_dict().items()}
    y = sm(x)
    with pytest.raises(TypeError, match="cannot change its dtype .* transform again"):
        convert(sm)
    assert {k: v.dtype for k, v in sm.state_dict().items()} == before
    assert torch.equal(sm(x), y)
    assert sm.to("cpu") is sm  # a device move passes


def test_torch_save__points_at_the_dynamic_batch_program():
    x = torch.randn(8, 64)
    sm = fxscale.transform(_mlp(), (x,))
    with pytest.raises(TypeError, match=r"fxscale\.deploy\.export_program\(sm, example_inputs\)"):
        torch.save(sm, io.BytesIO())

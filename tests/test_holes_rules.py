"""Regression tests for issue 11's rule holes (cases 1, 2, 3, 13, 14): proven bounds that
did not hold. Each test runs the transformed model (or the rule) on an in-bound input that
broke the old rule and asserts every low-precision store's audit ratio is <= 1, or compares
the rule's bound with what PyTorch's kernel computes (float32 / bf16, rounding included).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fxscale.rules import Arg, Bound, evaluate

from .holes import max_ratio as _max_ratio
from .holes import quiet_transform as _transform

aten = torch.ops.aten


# ---------------------------------------------------------------- case 1: avg_pool divisor_override
class _PoolSum(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):  # (B, 1, 8, 8) -> window sums (B, 1, 4, 4) -> (B, 16)
        return self.fc(F.avg_pool2d(x, 2, divisor_override=1).flatten(1))


@pytest.mark.parametrize("fmt", ["e4m3", "int8:exact"])
def test_avg_pool__divisor_override_is_a_window_sum(fmt):
    torch.manual_seed(0)
    model = _PoolSum().eval()
    sm = _transform(model, (torch.rand(2, 1, 8, 8),), format=fmt, input_bounds=1.0)
    assert _max_ratio(sm, torch.ones(2, 1, 8, 8)) <= 1.0


# ---------------------------------------------------------------- case 2: linear with a 1-D weight
class _VecLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16))
        self.fc = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 4))

    def forward(self, x):  # (64, 16) -> (64,) -> (1, 64) -> (1, 8) -> (1, 4)
        return self.fc(F.linear(x, self.w).unsqueeze(0))


@pytest.mark.parametrize("fmt", ["int8", "e4m3"])
def test_linear__1d_weight_bounds_the_output_across_rows(fmt):
    torch.manual_seed(0)
    model = _VecLinear().eval()
    x = torch.randn(64, 16)
    sm = _transform(model, (x,), format=fmt, input_bounds=4.0)
    worst = 4.0 * torch.sign(model.w.detach()).expand(64, 16)  # every row aligned with w
    assert _max_ratio(sm, worst) <= 1.0
    torch.testing.assert_close(sm(worst), model(worst), rtol=0.1, atol=0.1 * float(model(worst).abs().max()))


# ---------------------------------------------------------------- case 3: LayerNorm's kernel rounding
def _ln_bound(d: int, eps: float, amax: float, dtype=torch.float32) -> float:
    x = Arg(Bound(amax).tighten((4, d)), (4, d))
    return float(evaluate(aten.layer_norm.default, (x, [d], None, None, eps), {}, [(4, d)])[0].absmax)


@pytest.mark.parametrize("d,eps,log2_a", [(16, 1e-5, 20), (768, 1e-12, 10), (64, 1e-5, 30), (4, 1e-12, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm__bounds_the_kernel_on_near_constant_rows(d, eps, log2_a, dtype):
    """Rows ``A + a few ulps``: the kernel's variance cancels to ~0 and ``(x - mean) / sqrt(eps)``
    comes out far above ``sqrt(D - 1)``; the rule bounds what the kernel returns."""
    torch.manual_seed(0)
    a = 1.3 * 2.0**log2_a
    ulp = 2 * 2.0**-24 * a
    x = torch.full((256, d), a) + ulp * torch.randint(-3, 4, (256, d)).float()
    x[::2, 0] += ulp * torch.randint(1, 20, (128,)).float()
    x = x.to(dtype)
    y = F.layer_norm(x, (d,), eps=eps)
    amax = float(x.abs().max())
    assert float(y.abs().max()) <= _ln_bound(d, eps, amax)


def test_layer_norm__near_constant_rows_at_2_20_stay_within_the_bound():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)).eval()
    a = 2.0**20
    x = torch.full((64, 16), a)
    x[:, 0] += 2.0**-3 * torch.randint(1, 20, (64,)).float()  # one element a few ulps off: 39.5
    sm = _transform(model, (torch.randn(8, 16),), format="e4m3", input_bounds=a + 1)
    assert _max_ratio(sm, x) <= 1.0


def test_layer_norm__typical_rows_keep_the_sqrt_d_bound():
    """The rounding term is negligible for ordinary activations: the bound stays ~sqrt(D-1)."""
    assert _ln_bound(768, 1e-5, 100.0) <= math.sqrt(767) * 1.02


# ---------------------------------------------------------------- case 13: transposed convolution
class _ConvT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(8, 2, 3, 3))
        with torch.no_grad():
            self.w[:, 0] = 1.0  # output channel 0 reads all 8 inputs: L1 = 72, per input row 18
        self.fc = torch.nn.Linear(10, 4)

    def forward(self, x):  # (B, 8, 8, 8) -> (B, 2, 10, 10)
        y = aten.convolution(x, self.w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1)
        return self.fc(y)


def test_convolution__transposed_sums_over_input_channels():
    model = _ConvT().eval()
    sm = _transform(model, (torch.rand(2, 8, 8, 8),), format="e4m3", input_bounds=1.0)
    assert _max_ratio(sm, torch.ones(2, 8, 8, 8)) <= 1.0


# ---------------------------------------------------------------- case 14: elu, RMSNorm idiom
class _Elu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(aten.elu(x, 1.0, 1.0, -2.0))  # input_scale < 0: exp grows for x < 0


def test_elu__negative_input_scale_grows_exponentially():
    sm = _transform(_Elu().eval(), (torch.rand(2, 8),), format="e4m3", input_bounds=2.0)
    assert _max_ratio(sm, torch.full((2, 8), -2.0)) <= 1.0


class _RmsMinus(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):  # rsqrt(mean(x^2) - eps): not an RMSNorm
        r = torch.rsqrt(torch.add(x.pow(2).mean(-1, keepdim=True), 0.9, alpha=-1))
        return self.fc(x * r)


def test_rms_norm_idiom__is_not_matched_through_add_alpha():
    torch.manual_seed(0)
    sm = _transform(_RmsMinus().eval(), (torch.ones(4, 16),), format="e4m3", input_bounds=1.0)
    x = torch.full((2, 16), 1.0)
    x[:, 1::2] = 0.9  # mean(x^2) = 0.905: rsqrt(0.005) = 14
    assert _max_ratio(sm, x) <= 1.0

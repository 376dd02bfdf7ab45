"""Eager ScaledTensor: the seed notebook's API, with its bugs fixed and pinned."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import fxscale
from fxscale import ScaledTensor, ScaledTensorData, dequantise, quantise, requantise, wasted_bits
from fxscale.formats import FORMATS, get_format
from fxscale.metrics import sqnr_db
from fxscale.scaled import ScaledFallbackWarning, eager_options

SETTINGS = settings(max_examples=30, deadline=None)
ALL = sorted(FORMATS)
FP8_INT8 = [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]


def f32(x):
    return x.to(torch.float32)


# ============================================================================ the seed's bugs
def test_matmul__accumulates_beyond_int16():
    """Seed bug (a): int16 accumulation wrapped 60000 to -21259."""
    a = quantise(torch.full((2, 3), 100.0), torch.int8)
    b = quantise(torch.full((3, 4), 200.0), torch.int8)
    y = f32(a @ b)
    assert torch.allclose(y, torch.full((2, 4), 60000.0), rtol=2**-7)


class SeedFFN(torch.nn.Module):
    """The seed notebook's FFN: relu(x @ W0), requantise, @ W1."""

    def __init__(self, hidden: int, dtype: torch.dtype, gen: torch.Generator):
        super().__init__()
        self.W0f = torch.randn(hidden, 4 * hidden, generator=gen)
        self.W1f = torch.randn(4 * hidden, hidden, generator=gen)
        self.W0, self.W1 = quantise(self.W0f, dtype), quantise(self.W1f, dtype)

    def forward(self, x):
        y = F.relu(x @ self.W0)
        if isinstance(y, ScaledTensor):
            y = requantise(y)
        return y @ self.W1

    def reference(self, x: Tensor) -> Tensor:
        return F.relu(x @ self.W0f) @ self.W1f


@pytest.fixture(scope="module")
def seed_ffn_inputs():
    g = torch.Generator().manual_seed(0)
    return g, torch.randn(10, 1024, generator=g)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_seed_ffn__runs_and_matches_float32_to_20db(dtype, seed_ffn_inputs):
    """Seed bug (b): the worst-case scale zeroed the first matmul ("All-data zero")."""
    g, x = seed_ffn_inputs
    ffn = SeedFFN(1024, dtype, g)
    y = ffn(quantise(x, dtype))
    assert isinstance(y, ScaledTensor) and y.st.data.dtype == dtype
    assert sqnr_db(ffn.reference(x), f32(y)) >= 20.0


def test_seed_ffn__seed_rule_without_requantise_loses_the_signal(seed_ffn_inputs):
    """The absmax rule is selectable; without a requantise it wastes the int8 range, as in the seed."""
    g, x = seed_ffn_inputs
    w = quantise(torch.randn(1024, 4096, generator=g), torch.int8)
    xq = quantise(x, torch.int8)
    with eager_options(rules="absmax", threshold=math.inf):
        y = xq @ w
    assert wasted_bits(y.st.data) >= 7
    y = xq @ w  # default: the tight rule, then a requantise of the float accumulator
    assert wasted_bits(y.st.data) <= get_format("int8").threshold + 1


def test_quantise__all_zero_gives_scale_one():
    """Seed bug (c): Tensor(1.0, dtype=...) crashed."""
    for dtype in FP8_INT8:
        z = quantise(torch.zeros(2, 3), dtype)
        assert float(z.st.scale) == 1.0
        assert torch.equal(f32(z), torch.zeros(2, 3))


def test_requantise__zeros_stay_zero():
    """Seed bug (d)."""
    z = requantise(quantise(torch.zeros(5), torch.int8))
    assert torch.equal(f32(z), torch.zeros(5)) and torch.isfinite(z.st.scale)


def test_add__exact_up_to_rounding():
    """Seed bug (e): 16 + 16 gave 31.5 (the output scale was the sum of the input scales)."""
    x = quantise(torch.tensor([16.0]), torch.int8)
    assert f32(x + x).item() == 32.0
    a = quantise(torch.tensor([0.5, -3.0, 100.0]), torch.int8)
    b = quantise(torch.tensor([1.25, 7.0, -1.0]), torch.int8)
    s = a + b
    assert torch.allclose(f32(s), f32(a) + f32(b), atol=0.5 * float(s.st.scale), rtol=0)


# ============================================================================ properties
@SETTINGS
@given(name=st.sampled_from(ALL), shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       seed=st.integers(0, 2**31 - 1), mag=st.floats(-20, 20))
def test_quantise_dequantise__error_within_format_rounding(name, shape, seed, mag):
    f = get_format(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0**mag
    q = quantise(x, f.dtype)
    s = float(q.st.scale)
    assert s == f.scale_for(float(x.abs().max()))
    err = (dequantise(q, torch.float64) - x.double()).abs()
    tol = (f.rel_rounding * x.double().abs() + 0.5 * f.smallest_subnormal * s) if f.is_float else 0.5 * s
    assert bool((err <= tol).all())


@SETTINGS
@given(dtype=st.sampled_from(FP8_INT8), m=st.integers(1, 6), k=st.integers(1, 40), n=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1), rules=st.sampled_from(["rownorm", "absmax"]))
def test_matmul__within_output_rounding_of_exact_product(dtype, m, k, n, seed, rules):
    g = torch.Generator().manual_seed(seed)
    a, b = quantise(torch.randn(m, k, generator=g), dtype), quantise(torch.randn(k, n, generator=g) * 3, dtype)
    with eager_options(rules=rules):
        y = a @ b
    f, s = get_format(dtype), float(y.st.scale)
    exact = dequantise(a, torch.float64) @ dequantise(b, torch.float64)
    tol = (f.rel_rounding * exact.abs() + 0.5 * f.smallest_subnormal * s + 1e-5 * exact.abs().max()) if f.is_float \
        else 0.5 * s + 1e-9
    assert bool(((f32(y).double() - exact).abs() <= tol).all())
    assert float(y.st.data.float().abs().max()) <= f.max


@SETTINGS
@given(dtype=st.sampled_from(FP8_INT8), seed=st.integers(0, 2**31 - 1), mag=st.floats(-10, 10))
def test_requantise__uses_the_range_and_keeps_the_value(dtype, seed, mag):
    f = get_format(dtype)
    g = torch.Generator().manual_seed(seed)
    d = f.cast(torch.randn(4, 4, generator=g) * 3)  # small data: wasted range
    st0 = ScaledTensorData(d, torch.tensor(2.0**round(mag)))
    r = requantise(st0)
    assert torch.equal(f32(r), st0.to_tensor(torch.float32))  # power-of-two rescale is exact
    assert float(r.st.data.float().abs().max()) * 2 > f.max


# ============================================================================ the Tensor face
def test_relu__keeps_format_and_scale():
    x = quantise(torch.tensor([-2.0, 0.5, 3.0]), torch.float8_e4m3fn)
    for y in (torch.relu(x), F.relu(x), x.relu()):
        assert isinstance(y, ScaledTensor) and y.st.data.dtype == torch.float8_e4m3fn
        assert torch.equal(y.st.scale, x.st.scale)
        assert torch.equal(f32(y), F.relu(f32(x)))


def test_to__dequantises_to_plain_tensor():
    x = quantise(torch.tensor([1.0, 2.0, 3.0]), torch.int8)
    for y in (x.to(torch.float32), x.float(), x.to(torch.float16), dequantise(x)):
        assert type(y) is Tensor
        assert torch.allclose(y.float(), torch.tensor([1.0, 2.0, 3.0]), atol=0.02)
    assert isinstance(x.to("cpu"), ScaledTensor)


def test_views__never_expose_raw_data():
    """Views and shape ops stay ScaledTensors whose values are the dequantised ones (data 32..127)."""
    x = quantise(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.int8)
    ops = [lambda t: t.view(-1), lambda t: t.t(), lambda t: t.detach(), lambda t: t[0], lambda t: t[:, 1:],
           lambda t: t.reshape(4, 1), lambda t: t.clone(), lambda t: t.contiguous(), lambda t: t.unsqueeze(0),
           lambda t: t.permute(1, 0), lambda t: t.expand(2, 2, 2), lambda t: torch.cat([t, t], 1),
           lambda t: torch.stack([t, t]), lambda t: t.split(1)[1]]
    for op in ops:
        v = op(x)
        assert isinstance(v, ScaledTensor), type(v)
        assert torch.equal(f32(v), op(f32(x)))
    t = Tensor(x)
    assert isinstance(t, ScaledTensor) and torch.equal(f32(t), f32(x))
    assert x.tolist() == f32(x).tolist()


def test_repr__like_the_seed():
    x = quantise(torch.tensor([1.0, 2.0, 3.0]), torch.int8)
    assert repr(x) == "ScaledTensor(0.03125 * tensor([32, 64, 96], dtype=torch.int8))"
    assert repr(x.st) == repr(x)
    assert x.st.dtype_max == 127 and x.shape == (3,)


def test_fallback__warns_naming_the_op_and_computes_in_float32():
    x = quantise(torch.tensor([1.0, -2.0, 3.0]), torch.int8)
    with pytest.warns(ScaledFallbackWarning, match="aten.sum"):
        s = torch.sum(x)
    assert type(s) is Tensor and s.item() == pytest.approx(2.0, abs=0.1)
    with pytest.warns(ScaledFallbackWarning, match="softmax"):
        p = torch.softmax(x, -1)
    assert torch.allclose(p, torch.softmax(f32(x), -1))


def test_mixed_formats__raise_clearly():
    a = quantise(torch.ones(2, 2), torch.int8)
    b = quantise(torch.ones(2, 2), torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="mixed formats"):
        a @ b
    with pytest.raises(ValueError, match="mixed formats"):
        a + b


def test_in_place_ops__refused():
    a = quantise(torch.ones(2), torch.int8)
    with pytest.raises(NotImplementedError, match="in place"):
        a.add_(1.0)


@pytest.mark.parametrize("dtype", FP8_INT8)
def test_matmul_shapes__batched_vector_and_linear(dtype):
    g = torch.Generator().manual_seed(3)
    x3, w, bias = torch.randn(2, 5, 8, generator=g), torch.randn(8, 6, generator=g), torch.randn(6, generator=g)
    v = torch.randn(8, generator=g)
    qx3, qw, qb, qv = (quantise(t, dtype) for t in (x3, w, bias, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScaledFallbackWarning)
        cases = [
            (qx3 @ qw, f32(qx3) @ f32(qw)),
            (torch.bmm(qx3, torch.stack([qw, qw])), f32(qx3) @ f32(qw)),
            (F.linear(qx3, qw.t(), qb), F.linear(f32(qx3), f32(qw).t(), f32(qb))),
            (qw.t() @ qv, f32(qw).t() @ f32(qv)),
            (qv @ qv, f32(qv) @ f32(qv)),
            (F.gelu(qw) * qw - qw, F.gelu(f32(qw)) * f32(qw) - f32(qw)),
        ]
    for y, ref in cases:
        assert isinstance(y, ScaledTensor) and y.shape == ref.shape
        assert sqnr_db(ref, f32(y)) > (25 if dtype == torch.int8 else 15)


def test_nan__stays_nan_in_float_formats():
    x = quantise(torch.tensor([1.0, float("nan"), 2.0]), torch.float8_e4m3fn)
    assert torch.isnan(f32(x)[1]) and f32(x)[2] == 2.0
    with pytest.raises(ValueError):
        quantise(torch.tensor([1.0, float("nan")]), torch.int8)


def test_flatten_unflatten__round_trips():
    x = quantise(torch.randn(3, 4), torch.float8_e4m3fn)
    names, ctx = x.__tensor_flatten__()
    y = ScaledTensor.__tensor_unflatten__({n: getattr(x, n) for n in names}, ctx, x.shape, x.stride())
    assert torch.equal(f32(y), f32(x))


def test_package__exports_the_eager_api():
    for name in ("ScaledTensorData", "ScaledTensor", "quantise", "requantise", "dequantise"):
        assert getattr(fxscale, name) is getattr(fxscale.scaled, name)


def test_eager_options__validates_and_restores():
    with pytest.raises(ValueError, match="rules"), eager_options(rules="loose"):
        pass
    with eager_options(rules="absmax", threshold=3.0) as o:
        assert o.rules == "absmax" and o.threshold == 3.0
    from fxscale.scaled import _OPTIONS

    assert _OPTIONS.get().rules == "rownorm"


def test_wasted_bits__of_a_scaled_tensor_measures_its_stored_data():
    """Was "unsupported format dtype torch.float32" (a ScaledTensor's logical dtype)."""
    import fxscale

    st = fxscale.quantise(torch.tensor([1.0, 2.0, -16.0]), torch.int8)
    assert fxscale.wasted_bits(st) == fxscale.wasted_bits(st.st) == fxscale.wasted_bits(st.st.data)


def test_audit__an_input_of_another_size_gets_the_modules_message():
    import fxscale

    m = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    sm = fxscale.transform(m, (torch.randn(8, 64),))
    with pytest.raises(ValueError, match="dim 1 of input"):
        fxscale.audit(sm, torch.randn(8, 32))

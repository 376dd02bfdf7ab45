"""Formats: ranges, power-of-two scales, casts (saturation, NaN/Inf) and wasted bits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxscale.formats import FORMATS, MIN_SCALE, get_format, wasted_bits

SETTINGS = settings(max_examples=40, deadline=None)
ALL = sorted(FORMATS)
FLOATS = [n for n in ALL if FORMATS[n].is_float]
INTS = [n for n in ALL if not FORMATS[n].is_float]


def test_wasted_bits__seed_example_is_three():
    assert wasted_bits(torch.tensor([1, 2, -16], dtype=torch.int8)) == 3


def test_wasted_bits__all_zero_wastes_every_bit():
    assert wasted_bits(torch.zeros(4, dtype=torch.int8)) == 8
    assert wasted_bits(torch.zeros(4, dtype=torch.float8_e4m3fn)) == 8


def test_wasted_bits__float_is_binades_of_headroom():
    assert wasted_bits(torch.tensor([448.0, 1.0]).to(torch.float8_e4m3fn)) == 0
    assert wasted_bits(torch.tensor([28.0]).to(torch.float8_e4m3fn)) == 4


def test_get_format__aliases_and_dtypes_agree():
    assert get_format("e4m3") is get_format(torch.float8_e4m3fn) is get_format("float8_e4m3fn")
    assert get_format("int8").max == 127
    with pytest.raises(ValueError, match="unknown format"):
        get_format("int3")


@SETTINGS
@given(name=st.sampled_from(ALL), amax=st.floats(1e-37, 3e38, allow_nan=False, allow_infinity=False))
def test_scale_for__smallest_power_of_two_that_fits(name, amax):
    f = get_format(name)
    s = f.scale_for(amax)
    m, _ = math.frexp(s)
    assert m == 0.5, "a power of two"
    assert amax / s <= f.max
    assert s == MIN_SCALE or amax / (s / 2) > f.max, "the smallest such"
    assert float(f.scale_tensor(torch.tensor(amax, dtype=torch.float64).float())) == pytest.approx(
        f.scale_for(float(torch.tensor(amax).float())), rel=0)


def test_scale_for__zero_gives_one_and_nonfinite_raises():
    f = get_format("int8")
    assert f.scale_for(0.0) == 1.0
    assert float(f.scale_tensor(torch.tensor(0.0))) == 1.0
    with pytest.raises(ValueError):
        f.scale_for(float("nan"))


@pytest.mark.parametrize("name", ALL)
def test_scale_for__tiny_amax_stays_a_float32(name):
    """Bug fixed in formats.py: bfloat16's scale for 1e-30 was 2**-228, 0 as a float32."""
    f = get_format(name)
    x = torch.tensor([1.5e-30, -1e-31])
    s = f.scale_for(float(x.abs().max()))
    assert torch.tensor(s, dtype=torch.float32) > 0
    assert float(f.scale_tensor(torch.tensor(1.5e-30))) == s
    y = f.cast(x / s).float() * s
    assert torch.isfinite(y).all()
    assert float((y - x).abs().max()) <= 1.5e-30 * f.rel_rounding + f.smallest_subnormal * s


@pytest.mark.parametrize("name", FLOATS)
def test_cast__nan_and_inf_stay_nonfinite(name):
    f = get_format(name)
    y = f.cast(torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])).float()
    assert not torch.isfinite(y[:3]).any()
    assert y[3] == 1.0


@pytest.mark.parametrize("name", INTS)
def test_cast__integer_formats_refuse_nonfinite(name):
    with pytest.raises(ValueError, match="NaN"):
        get_format(name).cast(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("name", ALL)
def test_cast__finite_overflow_saturates(name):
    f = get_format(name)
    big = torch.finfo(torch.float32).max  # bfloat16's max is within 1% of float32's
    y = f.cast(torch.tensor([min(f.max * 1.5, big), -min(f.max * 4, big)])).float()
    assert y.tolist() == [f.max, -f.max]


@SETTINGS
@given(name=st.sampled_from(ALL), seed=st.integers(0, 2**31 - 1), n=st.integers(1, 64),
       spread=st.floats(0.0, 30.0), mag=st.floats(-30.0, 30.0))
def test_cast__round_trip_within_format_rounding(name, seed, n, spread, mag):
    """|cast(x / s) * s - x| <= 2^-(mantissa+1) |x| + half a subnormal step * s (ints: s / 2)."""
    f = get_format(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.rand(n, generator=g) * -spread + mag)
    s = f.scale_for(float(x.abs().max()))
    y = f.cast(x / s).to(torch.float64) * s
    err = (y - x.double()).abs()
    if f.is_float:
        tol = f.rel_rounding * x.double().abs() + 0.5 * f.smallest_subnormal * s
    else:
        tol = torch.full_like(err, 0.5 * s)
    assert (err <= tol * (1 + 1e-12)).all(), float((err - tol).max())

"""The compiler as data: the ordered pipeline and its per-pass times, the one option validator,
the typed per-node record, and the transformed module built in one constructor call."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
from torch import nn

import passes
from fxscale.api import transform
from fxscale.config import TransformConfig
from fxscale.nodeinfo import NodeInfo


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval(), (torch.randn(8, 16),)


def test_pipeline__runs_its_passes_in_order_and_times_each():
    model, args = _mlp()
    sm = transform(model, args)
    names = [p.name for p in passes.PIPELINE]
    core = ["capture", "calibrate", "precision", "analyse", "lower"]
    assert [n for n in names if n in core] == core  # in this order, other passes between them
    assert list(sm.pass_times) == names
    assert all(t >= 0 for t in sm.pass_times.values())
    c = passes.run(model, args, TransformConfig(format="int8"), until="calibrate")
    assert list(c.times) == names[: names.index("calibrate") + 1] and c.analysis is None
    passes.resume(c)
    assert list(c.times) == names
    with pytest.raises(ValueError, match="no pass named"):
        passes.resume(c, until="lower")


def test_config__holds_what_the_user_passed():
    model, args = _mlp()
    sm = transform(model, args, input_bounds=3.0)
    assert sm.config.input_bounds == 3.0  # was None: the float was resolved per input and dropped
    assert list(sm.input_bounds.values()) == [(3.0, None)]  # what the guard enforces, by input
    sm = transform(model, args, input_bounds=[(3.0, 9.0)])
    assert sm.config.input_bounds == ((3.0, 9.0),)


def test_config__one_validator_for_transform_backend_and_eager():
    from fxscale import backend
    from fxscale.scaled import eager_options

    names = {f.name for f in dataclasses.fields(TransformConfig)}
    assert names | {"calibration"} == set(backend.TRANSFORM_OPTIONS)  # every field, nothing else
    assert {"nonfinite", "requantise", "fuse_residual"} <= set(backend.TRANSFORM_OPTIONS)
    for call in (lambda: transform(*_mlp(), rules="loose"),
                 lambda: TransformConfig(format="e4m3", rules="loose"),
                 lambda: eager_options(rules="loose").__enter__()):
        with pytest.raises(ValueError, match="rules must be 'rownorm' or 'absmax', got 'loose'"):
            call()


def test_record__is_typed_a_retired_field_raises():
    ni = NodeInfo(op="aten.mm")
    with pytest.raises(AttributeError):
        ni.extra = {}  # no free dict
    with pytest.raises(AttributeError):
        ni.format = "int8"  # split into computes / stores
    ni.reasons.append("a")
    ni.reasons.append("b")
    assert ni.note == "a; b"


@torch.no_grad()
def test_on_overflow_requantise__captures_and_calibrates_once():
    """The run-time-scale variant is forked from the calibrated graph, not re-captured."""
    from passes import capture as capture_mod

    model, args = _mlp()
    real = capture_mod.capture
    with mock.patch.object(capture_mod, "capture", side_effect=real) as spy:
        sm = transform(model, args, input_bounds=2.0, on_overflow="requantise")
    assert spy.call_count == 1
    dyn = sm._fxscale_dynamic
    assert dyn is not None and "stats" in dyn.code and "stats" not in sm.code
    big = args[0] * 50
    y = sm(big)
    ref = model(big)
    assert ((y - ref).norm() / ref.norm()) < 0.1

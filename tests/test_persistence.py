"""Determinism and persistence of transformed modules.

* transforming the same model twice gives the same ``sm.code`` and the same report string;
* a ``state_dict`` round trip (through ``torch.save`` / ``torch.load``) into a second
  transform of the same model gives bit-identical outputs;
* ``torch.export.export`` of the transformed module (fxscale custom ops, ``ScaleFn``
  submodules) runs and gives bit-identical outputs, also after ``torch.export.save/load``.
"""

from __future__ import annotations

import functools
import io
import warnings

import pytest
import torch

from fxscale.api import transform

from . import models
from .models import first_output

#: (model, format) pairs: every zoo model and both formats, kept few for runtime.
CASES = [("mlp", "e4m3"), ("mlp", "int8"), ("cnn", "int8"), ("encoder_layer", "e4m3"), ("gpt2", "e4m3"), ("bert", "int8")]
EXPORT_CASES = [("mlp", "e4m3"), ("mlp", "int8"), ("cnn", "e4m3"), ("encoder_layer", "int8")]


def _transform(name, fmt, **kw):
    model, args = models.ZOO[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transform(model, args, format=fmt, **kw), args


@functools.cache
def _pair(name, fmt):
    return _transform(name, fmt), _transform(name, fmt)


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_transform_is_deterministic_code_and_report(name, fmt):
    (a, _), (b, _) = _pair(name, fmt)
    assert a.code == b.code
    assert str(a.report) == str(b.report)


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_state_dict_round_trip_gives_identical_outputs(name, fmt):
    (a, _), (b, _) = _pair(name, fmt)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    missing, unexpected = b.load_state_dict(torch.load(buf), strict=True)
    assert not missing and not unexpected
    batch = models.with_batch(name, 3)
    with torch.no_grad():
        assert torch.equal(first_output(a(*batch)), first_output(b(*batch)))


@pytest.mark.parametrize(("name", "fmt"), EXPORT_CASES)
def test_torch_export_of_transformed_module_gives_identical_outputs(name, fmt):
    (sm, args), _ = _pair(name, fmt)
    ep = torch.export.export(sm, args)
    assert any("fxscale" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    batch = args  # export specialises to the example's shapes here
    with torch.no_grad():
        assert torch.equal(first_output(ep.module()(*batch)), first_output(sm(*batch)))


def test_exported_transformed_module_survives_save_and_load():
    """cnn e4m3 has ScaleFn submodules (run-time dependent scales) and static weight buffers."""
    (sm, args), _ = _pair("cnn", "e4m3")
    ep = torch.export.export(sm, args)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    with torch.no_grad():
        assert torch.equal(loaded.module()(*args), sm(*args))


def test_pickling_a_transformed_module_says_how_to_save_it():
    """torch.save(sm) cannot store export's guard function and the run-time scale functions:
    a clear error naming the two ways that work (both tested above)."""
    (sm, _args), _ = _pair("cnn", "e4m3")
    with pytest.raises(TypeError, match=r"torch\.export\.save.*state_dict"):
        torch.save(sm, io.BytesIO())

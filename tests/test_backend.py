"""fxscale.backend: torch.compile(model, backend="fxscale") — options, fallback, accuracy."""

import warnings

import pytest
import torch
from torch import fx

import fxscale.api
from fxscale.backend import fxscale_backend
from fxscale.metrics import sqnr_db
from tests import models


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test__backend__registered_through_entry_point():
    assert "fxscale" in torch._dynamo.list_backends()


def test__backend__unknown_option_names_it_and_lists_valid_ones():
    model, args = models.mlp()
    gm = fx.symbolic_trace(model)
    with pytest.raises(ValueError, match=r"unknown fxscale backend option 'formt'.*'format'.*'strict'"):
        fxscale_backend(gm, list(args), options={"formt": "e4m3"})
    f = torch.compile(model, backend="fxscale", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown fxscale backend option 'bogus'"):
        f(*args)


def _boom(*a, **k):
    raise RuntimeError("boom: transform failed")


def test__backend__internal_failure_warns_and_runs_original_graph(monkeypatch):
    monkeypatch.setattr(fxscale.api, "transform", _boom)
    model, args = models.mlp()
    f = torch.compile(model, backend="fxscale", options={"format": "e4m3"})
    with pytest.warns(UserWarning, match="runs it unchanged in high precision.*boom"), torch.no_grad():
        y = f(*args)
    with torch.no_grad():
        torch.testing.assert_close(y, model(*args))


def test__backend__strict_reraises(monkeypatch):
    monkeypatch.setattr(fxscale.api, "transform", _boom)
    model, args = models.mlp()
    f = torch.compile(model, backend="fxscale", options={"strict": True})
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        f(*args)


def test__backend__passes_options_and_constant_weights_to_transform(monkeypatch):
    seen = {}

    def fake_transform(gm, example_inputs, **kw):
        seen["kw"] = kw
        seen["placeholders"] = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        seen["consts"] = sum(n.op == "get_attr" for n in gm.graph.nodes)
        seen["shapes"] = [tuple(t.shape) for t in example_inputs]
        return gm

    monkeypatch.setattr(fxscale.api, "transform", fake_transform)
    model, args = models.mlp()
    f = torch.compile(model, backend="fxscale", options={"format": "int8", "threshold": 2.0, "strict": True})
    with torch.no_grad():
        torch.testing.assert_close(f(*args), model(*args))
    assert seen["kw"] == {"format": "int8", "threshold": 2.0}
    assert len(seen["placeholders"]) == 1  # the input; the 4 parameters became constants
    assert seen["consts"] == 4
    assert seen["shapes"] == [(4, 16)]


def test__backend__direct_call_on_a_traced_graph():
    model, args = models.mlp()
    fn = fxscale_backend(fx.symbolic_trace(model), list(args), options={"strict": True})
    with torch.no_grad():
        assert sqnr_db(model(*args), fn(*args)) >= 20


def test__backend__mlp_e4m3_close_to_float32_at_several_batch_sizes():
    model, _ = models.mlp()
    f = torch.compile(model, backend="fxscale", options={"format": "e4m3", "strict": True})
    with torch.no_grad():
        for batch in (4, 3, 7):
            x = models.with_batch("mlp", batch)
            y = f(*x)
            ref = model(*x)
            assert y.shape == ref.shape and y.dtype == ref.dtype
            assert sqnr_db(ref, y) >= 20, batch


@pytest.mark.slow  # ~25 s on 2 CPU cores (inductor compiles the encoder layer)
def test__backend__encoder_layer_e4m3_close_to_float32():
    model, args = models.encoder_layer()
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # else one fused op hides the matmuls
    try:
        f = torch.compile(model, backend="fxscale", options={"format": "e4m3", "strict": True})
        with torch.no_grad():
            assert sqnr_db(model(*args), f(*args)) >= 20
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


def test__backend__encoder_fast_path_is_written_out_and_quantised():
    """Under no_grad the layer calls one fused op (issue 14, item 4: it ran in float32, silently);
    the backend writes it out op by op, so its four linears are quantised."""
    from fxscale import backend

    model, args = models.encoder_layer()
    f = torch.compile(model, backend="fxscale", options={"inductor": False, "strict": True})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", UserWarning)
        y = f(*args)
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        ref = model(*args)  # the slow path, in float32
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)
    assert backend.reports()[-1].summary_line().split(": ")[1].startswith("4 of")
    assert sqnr_db(ref, y) >= 20


def test__backend__encoder_fast_path_with_a_mask_warns_with_advice():
    model, args = models.encoder_layer()
    mask = torch.zeros(args[0].shape[:2], dtype=torch.bool)
    mask[:, -2:] = True  # padding
    f = torch.compile(model, backend="fxscale")
    with warnings.catch_warnings(record=True) as w, torch.no_grad():
        warnings.simplefilter("always")
        y = f(args[0], src_key_padding_mask=mask)
        ref = model(args[0], src_key_padding_mask=mask)
    assert any("set_fastpath_enabled(False)" in str(x.message) for x in w)
    assert y.shape == ref.shape


def test__backend__compiles_each_region_with_inductor_and_matches_the_transformed_graph():
    """Default: the transformed region runs through inductor (freezing on); inductor=False runs
    the transformed graph as is. Both compute the same fp8 arithmetic (1e-5 relative: inductor
    may reorder float32 additions)."""
    from fxscale import backend

    model, args = models.mlp()
    fast = fxscale_backend(fx.symbolic_trace(model), list(args), options={"format": "e4m3", "strict": True})
    plain = fxscale_backend(fx.symbolic_trace(model), list(args),
                            options={"format": "e4m3", "strict": True, "inductor": False})
    with torch.no_grad():
        y_fast, y_plain = fast(*args), plain(*args)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-6)
    assert sqnr_db(model(*args), y_fast) >= 20
    assert all(isinstance(r, backend._InductorRegion) for r in fast.cache.values())
    assert not any(isinstance(r, backend._InductorRegion) for r in plain.cache.values())


def test__backend__inductor_failure_warns_and_runs_the_transformed_graph(monkeypatch):
    from fxscale import backend

    def broken_compile(module, **kw):
        def run(*a):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(backend.torch, "compile", broken_compile)
    model, args = models.mlp()
    fn = fxscale_backend(fx.symbolic_trace(model), list(args), options={"format": "e4m3"})
    with pytest.warns(UserWarning, match="inductor could not compile.*inductor exploded.*inductor.*False"), \
            torch.no_grad():
        y = fn(*args)
    with torch.no_grad():
        assert sqnr_db(model(*args), y) >= 20  # the transformed graph ran: fp8, not the original
        assert not torch.equal(y, model(*args))
    strict = fxscale_backend(fx.symbolic_trace(model), list(args), options={"strict": True})
    with pytest.raises(RuntimeError, match="inductor exploded"), torch.no_grad():
        strict(*args)


def test__backend__registered_without_an_installed_entry_point(monkeypatch):
    """From a source tree (PYTHONPATH, no pip install) the entry point is missing: importing
    fxscale registers the backend itself; doing it again is harmless."""
    from torch._dynamo.backends import registry

    from fxscale import backend

    monkeypatch.setattr(registry, "_COMPILER_FNS", {k: v for k, v in registry._COMPILER_FNS.items() if k != "fxscale"})
    monkeypatch.setattr(registry, "_BACKENDS", {k: v for k, v in registry._BACKENDS.items() if k != "fxscale"})
    backend._register()
    backend._register()
    assert registry._COMPILER_FNS["fxscale"] is fxscale_backend


def test__backend__mode_carries_over_to_inductor(monkeypatch):
    """torch.compile(..., mode="reduce-overhead") means CUDA graphs for the transformed region
    too (inductor's options for that mode, plus freezing); with inductor=False a mode warns."""
    from fxscale import backend

    seen = {}

    def recording_compile(module, **kw):
        seen.update(kw)
        return module

    monkeypatch.setattr(backend.torch, "compile", recording_compile)
    model, args = models.mlp()
    fn = fxscale_backend(fx.symbolic_trace(model), list(args), mode="reduce-overhead")
    with torch.no_grad():
        fn(*args)
    assert seen["options"] == {"triton.cudagraphs": True, "freezing": True, "always_keep_tensor_constants": True}
    with pytest.warns(UserWarning, match="inductor=False ignores torch.compile mode='reduce-overhead'"):
        fxscale_backend(fx.symbolic_trace(model), list(args), mode="reduce-overhead", options={"inductor": False})


def test__backend__reduce_overhead_mode_runs():
    """End to end through torch.compile (on the CPU inductor skips the CUDA graphs)."""
    model, args = models.mlp()
    f = torch.compile(model, backend="fxscale", mode="reduce-overhead")
    with torch.no_grad():
        assert sqnr_db(model(*args), f(*args)) >= 20


@torch.no_grad()
def test_backend__input_bounds_are_not_applied_to_a_region_after_a_graph_break():
    """The second region's input is an intermediate value (``10 * a(x)``, |h| ~ 9): a scalar
    ``input_bounds=1.0`` applied to it raised on valid inputs, or with on_overflow='clamp' ran at
    1.3 dB (found by an adversarial trial). It is dropped there, with a warning."""

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            h = 10 * self.a(x)
            torch._dynamo.graph_break()
            return self.b(h)

    m = Broken().eval()
    for extra in ({}, {"on_overflow": "clamp"}):
        torch._dynamo.reset()
        fast = torch.compile(m, backend="fxscale", options={"input_bounds": 1.0, "inductor": False, "strict": True,
                                                             **extra})
        with pytest.warns(UserWarning, match=r"input_bounds describe the model's inputs.*torch_dynamo_resume_in_forward"):
            fast(torch.rand(4, 8) * 2 - 1)
        for x in (torch.rand(4, 8) * 2 - 1, torch.ones(4, 8)):
            assert fxscale.sqnr_db(m(x), fast(x)) > 20, extra


@torch.no_grad()
def test__backend__dynamic_true_quantises_a_model_with_python_floats_and_a_new_value_transforms_again():
    """dynamic=True: Dynamo passes LayerNorm's eps (a Python float) as a 0-d tensor whose .item()
    export could not trace: the region ran unquantised in float32, one warning (SQNR inf where
    it is 25 dB without dynamic=True; found by a user trial). The float is baked in per value."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.a, self.alpha = torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), 0.5

        def forward(self, x):
            return self.a(self.ln(x)) * self.alpha

    torch.manual_seed(0)
    m, x = M().eval(), torch.randn(4, 32)
    torch._dynamo.reset()
    c = torch.compile(m, backend="fxscale", dynamic=True, options={"inductor": False, "strict": True})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = c(x)
    assert not [str(i.message) for i in w if "runs it unchanged" in str(i.message) or "declares dim" in str(i.message)]
    assert 20 < sqnr_db(m(x), y) < 60  # quantised: not float32's inf
    m.alpha = 2.0
    assert 20 < sqnr_db(m(x), c(x)) < 60

"""Inputs that break the assumptions: beyond their bound, NaN/Inf, odd shapes and dtypes,
models that cannot be captured. Each test states the expected behaviour."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import fxscale
from fxscale.api import transform
from passes.capture import CaptureError

from . import models

BOUND = 3.0
FLOAT8 = ("e4m3", "e5m2")
#: Relative L2 error vs float32 allowed where a result must stay accurate.
REL_ERR = {"e4m3": 0.12, "e5m2": 0.25, "int8": 0.06}


def _rel_err(y, ref) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-300))


def _mlp_sm(fmt="e4m3", **kw):
    model, args = models.mlp()
    return model, args[0], transform(model, args, format=fmt, **kw)


def _beyond(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[1, 3] = 5.0
    return x


# ============================================================================ beyond the bound
@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_input_beyond_bound_raises_naming_input_max_and_bound_by_default(fmt):
    _, x, sm = _mlp_sm(fmt, input_bounds=BOUND)
    with pytest.raises(ValueError) as e:
        sm(_beyond(x))
    msg = str(e.value)
    assert "'input'" in msg and "5" in msg and "3" in msg  # forward's name (export's placeholder: input_1)
    assert "saturate" in msg and "requantise" in msg  # says what to do


def test_input_at_exactly_the_bound_passes_the_check():
    _, x, sm = _mlp_sm(input_bounds=BOUND)
    sm(torch.full_like(x, -BOUND))
    sm(x.clamp(-BOUND, BOUND))


def test_saturate_clamps_to_the_bound_and_warns_once():
    _, x, sm = _mlp_sm(input_bounds=BOUND, on_overflow="saturate")
    xb = _beyond(x)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y1 = sm(xb)
        y2 = sm(xb * 2)
    msgs = [str(m.message) for m in w if "saturat" in str(m.message)]
    assert len(msgs) == 1, msgs
    assert torch.equal(y1, sm(xb.clamp(-BOUND, BOUND)))
    assert torch.isfinite(y2).all()


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_requantise_falls_back_to_run_time_scales_and_stays_accurate(fmt):
    model, x, sm = _mlp_sm(fmt, input_bounds=BOUND, on_overflow="requantise")
    big = x * 100  # 30x beyond the bound
    with torch.no_grad():
        ref = model(big)
    y = sm(big)
    assert _rel_err(y, ref) <= REL_ERR[fmt]
    # within the bound the static graph runs, identical to the default
    _, _, sm_raise = _mlp_sm(fmt, input_bounds=BOUND)
    xin = x.clamp(-BOUND, BOUND)
    assert torch.equal(sm(xin), sm_raise(xin))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_invalid_declared_bound_is_rejected_at_transform(bad):
    model, args = models.mlp()
    with pytest.raises(ValueError, match="bound"):
        transform(model, args, input_bounds=bad)


def test_wrong_number_of_input_bounds_names_the_inputs():
    model, args = models.mlp()
    with pytest.raises(ValueError, match="input_bounds has 2 entries"):
        transform(model, args, input_bounds=[1.0, 2.0])


# ============================================================================ NaN / Inf
def _poison(x, value):
    x = x.clone()
    x[1, 2] = value
    return x


@pytest.mark.parametrize("declared", [None, BOUND], ids=["runtime_scale", "declared_bound"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fmt", FLOAT8)
def test_nonfinite_input_propagates_in_float8_never_silently_finite(fmt, value, declared):
    _, x, sm = _mlp_sm(fmt, input_bounds=declared)
    y = sm(_poison(x, value))
    assert not torch.isfinite(y[1]).any(), "the poisoned row came out (partly) finite"


@pytest.mark.parametrize("declared", [None, BOUND], ids=["runtime_scale", "declared_bound"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "int8"])
def test_nonfinite_raise_option_raises_naming_the_input(fmt, value, declared):
    _, x, sm = _mlp_sm(fmt, input_bounds=declared, nonfinite="raise")
    name = "input"  # forward's parameter (export names the placeholder input_1)
    with pytest.raises(ValueError, match=re.escape(repr(name)) + ".*NaN or Inf"):
        sm(_poison(x, value))


@pytest.mark.parametrize("declared", [None, BOUND], ids=["runtime_scale", "declared_bound"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_int8_has_no_nan_so_nonfinite_input_raises_even_when_propagating(value, declared):
    _, x, sm = _mlp_sm("int8", input_bounds=declared)
    with pytest.raises(ValueError, match="int8 has no NaN"):
        sm(_poison(x, value))


def test_int8_nonfinite_raises_after_torch_export_too():
    _, x, sm = _mlp_sm("int8")
    ep = torch.export.export(sm, (x,)).module()
    with pytest.raises(ValueError, match="int8 has no NaN"):
        ep(_poison(x, float("nan")))


def test_nan_in_calibration_data_is_rejected_naming_the_input():
    model, args = models.mlp()
    with pytest.raises(ValueError, match="NaN in calibration at input"):
        transform(model, (_poison(args[0], float("nan")),))


# ============================================================================ shapes and dtypes
@pytest.mark.parametrize("batch", [1, 7], ids=["batch1", "batch7"])
@pytest.mark.parametrize("declared", [None, BOUND], ids=["runtime_scale", "declared_bound"])
def test_other_batch_sizes_work_and_stay_accurate(batch, declared):
    model, x, sm = _mlp_sm(input_bounds=declared)
    xi = torch.randn(batch, x.shape[1]).clamp(-BOUND, BOUND)
    y = sm(xi)
    assert y.shape == (batch, 16)
    assert _rel_err(y, model(xi)) <= REL_ERR["e4m3"]


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
@pytest.mark.parametrize("declared", [None, BOUND], ids=["runtime_scale", "declared_bound"])
def test_zero_size_batch_gives_empty_output(fmt, declared):
    _, x, sm = _mlp_sm(fmt, input_bounds=declared)
    y = sm(x[:0])
    assert y.shape == (0, 16) and y.dtype == torch.float32


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
@pytest.mark.parametrize("declared", [None, BOUND], ids=["runtime_scale", "declared_bound"])
def test_all_zero_input_gives_the_bias_only_output(fmt, declared):
    """x = 0: every scale with amax 0 is 1 (never 0/0); the result is the model's, to rounding."""
    model, x, sm = _mlp_sm(fmt, input_bounds=declared)
    z = torch.zeros_like(x)
    y = sm(z)
    assert torch.isfinite(y).all()
    assert _rel_err(y, model(z)) <= REL_ERR[fmt]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mlp", "encoder_layer"])
def test_half_precision_models_keep_their_dtype_and_accuracy(name, dtype):
    model, (x,) = models.ZOO[name]()
    model, x = model.to(dtype), x.to(dtype)
    sm = transform(model, (x,))
    y = sm(x)
    assert y.dtype == dtype and y.shape == model(x).shape
    with torch.no_grad():
        ref = model.float()(x.float())
    assert _rel_err(y.float(), ref) <= 0.12


def test_integer_token_ids_pass_through_untouched():
    """Token ids are never quantised, never bounded: a float input_bounds does not apply to them."""
    model, (ids,) = models.gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = transform(model, (ids,), input_bounds=1.0)  # ids go up to 127: must not raise
    row = next(r for r in sm.report.rows if r["kind"] == "input")
    assert row["format"] is None and "not floating point" in row["note"]
    ph = next(n for n in sm.graph.nodes if n.op == "placeholder")
    consumers = {str(u.target) for u in ph.users}
    assert not any("fxscale" in c for c in consumers), consumers
    ids2 = torch.randint(0, 128, (3, 8))
    y = sm(ids2)
    with torch.no_grad():
        ref = model(ids2)
    assert y.logits.dtype == ref.logits.dtype
    assert _rel_err(y.logits, ref.logits) <= REL_ERR["e4m3"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to put the input elsewhere than the model")
def test_input_on_another_device_than_the_model_raises_a_clear_error():
    _, x, sm = _mlp_sm(input_bounds=BOUND)
    with pytest.raises((RuntimeError, ValueError), match="device"):
        sm(x.cuda())


# ============================================================================ capture failures
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent control flow
            return y * 2
        return y


class UsesNumpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(torch.from_numpy(x.numpy() * 2))


class NoRule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.special.erfinv(torch.tanh(self.a(x)) * 0.5))


def _assert_helpful(err: BaseException, where: str) -> None:
    msg = str(err)
    assert where in msg, msg  # names the place in the model's code
    assert 'torch.compile(model, backend="fxscale")' in msg and 'capture="symbolic_trace"' in msg
    assert len(msg) < 4000


@pytest.mark.parametrize(("cls", "where"), [(DataDependent, "if y.sum() > 0"), (UsesNumpy, "x.numpy()")])
def test_uncapturable_model_raises_capture_error_naming_place_and_alternatives(cls, where):
    torch.manual_seed(0)
    with pytest.raises(CaptureError) as e:
        transform(cls().eval(), (torch.randn(4, 8),))
    _assert_helpful(e.value, where)
    assert "test_bad_input.py" in str(e.value)


def test_gpt2_with_use_cache_is_transformed_without_its_cache_saying_so():
    """Every ...ForCausalLM defaults to use_cache=True, whose DynamicCache export cannot return
    (the README's call raised): captured with use_cache=False, a warning naming what to use for
    a cache, the model's own flag left as it was, the logits those of the model."""
    model, args = models.gpt2(use_cache=True)
    with pytest.warns(UserWarning, match=r"use_cache=False.*fxscale\.llm\.wrap"):
        sm = transform(model, args)
    assert model.config.use_cache is True
    out = sm(*args)
    assert out.past_key_values is None
    assert fxscale.sqnr_db(model(*args).logits, out.logits) > 20


def test_op_without_rule_runs_in_high_precision_with_a_fallback_row():
    torch.manual_seed(0)
    model = NoRule().eval()
    x = torch.randn(4, 8)
    sm = transform(model, (x,))
    rows = [r for r in sm.report.rows if "erfinv" in r["op"]]
    # the op itself runs in high precision; its output feeds a matmul, so it is stored
    # low-precision with a run-time amax (no proven bound)
    assert rows and rows[0]["kind"] == "fallback" and "no rule" in rows[0]["note"]
    assert rows[0]["runtime_amax"] and rows[0]["scale"] is None
    assert _rel_err(sm(x), model(x)) <= REL_ERR["e4m3"]


@torch.no_grad()
def test_on_overflow_clamp__clamps_in_graph_without_a_host_check():
    """'clamp' is the CUDA-graph friendly mode: no reduction, no sync, no warning."""
    import warnings as _w

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    sm = transform(model, (torch.randn(4, 16),), input_bounds=2.0, on_overflow="clamp")
    x = torch.randn(4, 16) * 10
    with _w.catch_warnings():
        _w.simplefilter("error")
        y = sm(x)
    assert torch.equal(y, sm(x.clamp(-2.0, 2.0)))
    assert sm._fxscale_checks is None  # nothing runs on the host before the graph
    compiled = torch.compile(sm, fullgraph=True)  # the clamp traces into one graph
    assert torch.allclose(compiled(x), y, rtol=1e-5, atol=1e-5)


def _ffn(d=64, h=256):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, d)).eval()


@torch.no_grad()
def test_declared_row_norm__makes_the_ffn_static_at_the_default_threshold():
    """max |x| alone leaves row norms at sqrt(D) max|x|; declaring them tightens every bound."""
    model = _ffn()
    x = torch.randn(32, 64)
    only_abs = transform(model, (x,), input_bounds=4.0)
    both = transform(model, (x,), input_bounds=[(4.0, 12.0)])
    assert sum(r["requantise"] for r in both.report.rows) <= sum(r["requantise"] for r in only_abs.report.rows)
    assert "stats" not in both.code  # every scale a constant
    # The hidden value (relu, which the first linear computes in its epilogue: one node of the
    # final graph) has a tighter proven bound: less projected headroom over the same observed max.
    relu = {r["node"]: r for r in both.report.rows}["relu"]
    assert relu["wasted_bits"] < {r["node"]: r for r in only_abs.report.rows}["relu"]["wasted_bits"]
    xt = torch.randn(16, 64).clamp(-4, 4)
    xt = xt * (12.0 / xt.norm(dim=-1, keepdim=True)).clamp(max=1)
    from fxscale import audit, sqnr_db

    assert sqnr_db(model(xt), both(xt)) >= 20
    # Rows at the declared norm, aligned with the weight row that gains most: still no saturation.
    w = model[0].weight
    j = int(w.norm(dim=-1).argmax())
    adversarial = (12.0 * w[j] / w[j].norm()).clamp(-4, 4).expand(8, 64).contiguous()
    assert all(r["ratio"] <= 1.0 for r in audit(both, adversarial))


@torch.no_grad()
def test_declared_row_norm__overflow_raises_saturates_or_clamps():
    model = _ffn()
    x = torch.randn(8, 64)
    big_rows = torch.full((2, 64), 1.0)  # max |x| = 1 <= 4, row norm = 8 > 5
    sm = transform(model, (x,), input_bounds=[(4.0, 5.0)])
    with pytest.raises(ValueError, match=r"max row norm = 8 beyond its declared bound 5"):
        sm(big_rows)
    sat = transform(model, (x,), input_bounds=[(4.0, 5.0)], on_overflow="saturate")
    with pytest.warns(UserWarning, match="row norm"):
        y = sat(big_rows)
    assert torch.allclose(y, sat(big_rows * (5.0 / 8.0)), atol=1e-6)
    clamp = transform(model, (x,), input_bounds=[(4.0, 5.0)], on_overflow="clamp")
    assert torch.allclose(torch.compile(clamp, fullgraph=True)(big_rows), y, atol=1e-5)


def test_declared_bound_below_the_example__warns_at_transform_naming_the_input():
    m = torch.nn.Sequential(torch.nn.Linear(16, 8)).eval()
    x = torch.full((4, 16), 2.5)
    with pytest.warns(UserWarning, match=r"example inputs break their declared bounds: input 'input' has max \|x\| = 2.5"):
        sm = transform(m, (x,), input_bounds=0.1)
    with pytest.raises(ValueError, match="beyond its declared bound"):
        sm(x)


def test_wrong_feature_size__error_says_the_dim_is_fixed_at_the_examples_size():
    sm = transform(torch.nn.Sequential(torch.nn.Linear(16, 8)).eval(), (torch.randn(4, 16),))
    with pytest.raises(ValueError, match=r"dim 1 of input 'input' is fixed at 16, the example's size"):
        sm(torch.randn(4, 12))


def test_declared_dim_below_its_min__error_names_the_range():
    from torch.export import Dim

    class M(torch.nn.Module):
        def forward(self, x):
            return x.sum(-1, keepdim=True) * x

    sm = transform(M(), (torch.randn(2, 8),), dynamic_shapes=({1: Dim("n", min=4, max=16)},))
    with pytest.raises(ValueError, match=r"outside the range declared for it in dynamic_shapes"):
        sm(torch.randn(2, 3))


def test_a_list_where_the_example_had_a_tensor__type_error_names_the_input():
    sm = transform(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval(), (torch.randn(3, 4),))
    with pytest.raises(TypeError, match="example held 1"):
        sm(torch.randn(3, 4).tolist())


def test_user_trial_dec7__messages_name_the_real_cause():
    """A batch beyond its declared Dim's max is said to be outside the range (was: "fixed to the
    example's size ... a warning said why", none had); an example outside a Dim's range is said
    to be so (was: advice about graph breaks); 1.0000001 against a bound of 1 shows its digits."""
    from torch.export import Dim

    import fxscale
    from passes.capture import CaptureError

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    x = torch.randn(2, 16, 32)
    sm = fxscale.transform(m, (x,), dynamic_shapes=({0: Dim("b", max=4), 1: Dim("seq", max=64)},))
    with pytest.raises(ValueError, match=r"dim 0 of input 'input' is outside the range declared .* <= 4"):
        sm(torch.randn(5, 8, 32))
    with pytest.raises(CaptureError, match="outside the range its Dim declares"):
        fxscale.transform(m, (x,), dynamic_shapes=({1: Dim("seq", max=8)},))
    sm = fxscale.transform(m, (x.clamp(-1, 1),), input_bounds=1.0)
    with pytest.raises(ValueError, match=r"max \|x\| = 1.0000001\d* beyond its declared bound 1"):
        sm(torch.full((2, 16, 32), 1.0000001))


def test_user_trial_dec7__a_one_input_pair_is_max_abs_and_row_norm():
    import fxscale

    m = torch.nn.Linear(16, 16)
    x = torch.rand(4, 16) * 2 - 1
    assert (fxscale.transform(m, (x,), input_bounds=(1.0, 8.0)).input_bounds
            == fxscale.transform(m, (x,), input_bounds=[(1.0, 8.0)]).input_bounds)


def test_user_trial_dec7__an_integer_input_beyond_its_bound_warns_as_a_float_one_does():
    """Was a SelfCheckError blaming the aten.to rule ("a compiler bug")."""
    import fxscale

    class E(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = torch.nn.Embedding(50, 16), torch.nn.Linear(17, 16)

        def forward(self, ids, pos):
            return self.lin(torch.cat([self.emb(ids), pos[..., None].float()], -1))

    torch.manual_seed(0)
    ids, pos = torch.randint(0, 50, (2, 6)), torch.arange(6).expand(2, 6).contiguous()
    with pytest.warns(UserWarning, match="break their declared bounds"):
        sm = fxscale.transform(E().eval(), (ids, pos), input_bounds=[None, 3])
    assert sm(ids, pos.clamp(max=3)).shape == (2, 6, 16)


def test_user_trial_dec7__dynamic_shapes_keyed_by_parameter_name_in_any_order():
    """torch.export's dict form: matched by name (its values were taken in order, so a spec for
    GPT-2's input_ids and attention_mask missed the parameters between them)."""
    from torch.export import Dim

    import fxscale

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, unused=None, y=None):
            return self.lin(x) + y

    seq = Dim("seq", max=32)
    ex = {"x": torch.randn(2, 6, 8), "y": torch.randn(2, 6, 8)}
    sm = fxscale.transform(M(), ex, dynamic_shapes={"y": {1: seq}, "x": {1: seq}})
    assert sm(torch.randn(3, 20, 8), y=torch.randn(3, 20, 8)).shape == (3, 20, 8)


def test_user_trial_dec7__transform_under_autocast_says_its_casts_are_baked_in():
    import fxscale

    m = torch.nn.Sequential(torch.nn.Linear(16, 16)).eval()
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="under torch.autocast"):
        sm = fxscale.transform(m, (x,))
    assert sm(x).dtype == torch.bfloat16  # as said: outside autocast too

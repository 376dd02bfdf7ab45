"""Rules for ``aten.exp``, ``linalg_vector_norm`` and the ``x / x.norm(dim=-1, keepdim=True)`` idiom
(CLIP: ``logit_scale.exp()``, normalised embeddings).

Each test tries to break the bound on the op *as PyTorch computes it* (float32 and bf16
kernels, rounding included), not on a float64 reference: magnitudes 2^-30 .. 2^30, signs
aligned, one-hot spikes, rows of equal values, and rows of float32 "dust" whose squares are
subnormal (the one place where the float32 norm comes out well below the true norm).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxscale
from fxscale.bound import Bound
from fxscale.rules import Arg, evaluate, lookup
from fxscale.rules.reductions import L2_NORMALISED
from passes.bounds import build_steps
from passes.capture import capture
from tests.test_rules import FIELDS, MODES, REL_TOL, true_stats

aten = torch.ops.aten
SETTINGS = settings(max_examples=60, deadline=None)
DTYPES = (torch.float32, torch.bfloat16)
ROW_KINDS = ("randn", "aligned", "negative", "spike", "rowspike", "equal", "signs", "wide")
lead_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2)
widths = st.one_of(st.integers(1, 40), st.sampled_from([64, 255, 256, 768, 1024]))
exponents = st.floats(-30, 30)
seeds = st.integers(0, 2**31 - 1)


def rows(shape, kind: str, mag: float, g: torch.Generator) -> torch.Tensor:
    """A float64 tensor of ``shape`` whose values are ~``mag``: adversarial patterns per row."""
    shape = tuple(shape)
    d = shape[-1]
    if kind == "randn":
        return torch.randn(shape, generator=g, dtype=torch.float64) * mag
    if kind == "aligned":  # every value positive, near the bound
        return (1 + 0.01 * torch.rand(shape, generator=g, dtype=torch.float64)) * mag
    if kind == "negative":
        return -torch.full(shape, mag, dtype=torch.float64)
    if kind == "spike":  # one-hot over the whole tensor
        t = torch.zeros(math.prod(shape), dtype=torch.float64)
        t[int(torch.randint(0, t.numel(), (1,), generator=g))] = mag
        return t.reshape(shape)
    if kind == "rowspike":  # a one-hot spike in every row, over a small background
        idx = torch.randint(0, d, shape[:-1], generator=g)
        return F.one_hot(idx, d).to(torch.float64) * mag + torch.randn(shape, generator=g, dtype=torch.float64) * mag * 1e-4
    if kind == "equal":  # each row one value repeated (its norm is sqrt(D) |v| exactly)
        v = torch.randn(shape[:-1] + (1,), generator=g, dtype=torch.float64) * mag
        return v.expand(shape).contiguous()
    if kind == "signs":  # |x| = mag everywhere, random signs
        return (torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1) * mag
    if kind == "wide":  # magnitudes spread over 2^-20 .. 2^20 times mag
        return torch.randn(shape, generator=g, dtype=torch.float64) * mag * torch.exp2(torch.randint(-20, 21, shape, generator=g).double())
    raise ValueError(kind)


def bound_of(op, x: torch.Tensor, out_shape, *args, mode: str = "rownorm", **kwargs) -> Bound:
    b = evaluate(op, (Arg(Bound.of_tensor(x), tuple(x.shape)), *args), kwargs, [tuple(out_shape)], mode=mode)[0]
    assert b is not None, f"{op}: no bound"
    return b


def assert_bounds(op, b: Bound, out: torch.Tensor, fields=FIELDS, what: str = "") -> None:
    true = true_stats(out)
    for f in fields:
        got = float(getattr(b, f))
        assert got >= true[f] * (1 - REL_TOL) - 1e-300, f"{op}: bound {f}={got} < {true[f]} ({out.dtype}, shape {tuple(out.shape)}) {what}"


# ============================================================================ exp
@SETTINGS
@given(lead=lead_shapes, d=widths, kind=st.sampled_from(ROW_KINDS), e=st.floats(-30, 6.4), seed=seeds,
       dtype=st.sampled_from(DTYPES))
def test__exp__never_underestimates_the_kernel(lead, d, kind, e, seed, dtype):
    """``exp`` of float32 / bf16 values ~ up to 2^6.4 = 84 (float32's exp overflows at 88.7; the
    "wide" rows reach further: there the output is Inf, and so must the bound be)."""
    g = torch.Generator().manual_seed(seed)
    x = rows((*lead, d), kind, 2.0**e, g).to(dtype)
    out = torch.exp(x)
    if not torch.isfinite(out).all():
        assert bound_of(aten.exp.default, x, out.shape).absmax == math.inf
        return
    for mode in MODES:
        assert_bounds(aten.exp.default, bound_of(aten.exp.default, x, out.shape, mode=mode), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test__exp__at_the_edge_of_overflow(dtype):
    """Values just below 88 (the rule's cut-off), in both dtypes; above it the bound is INF."""
    for v in (87.9, 88.0, -88.0):
        x = torch.full((3, 5), v, dtype=torch.float64).to(dtype)
        x = x.clamp(max=88.0) if float(x.max()) > 88.0 else x
        out = torch.exp(x)
        b = bound_of(aten.exp.default, x, out.shape)
        assert_bounds(aten.exp.default, b, out)
    for v in (88.5, 2.0**30, 1e300, math.inf):
        b = evaluate(aten.exp.default, (Arg(Bound(v), (4,)),), {}, [(4,)])[0]
        assert b.absmax == math.inf


def test__exp__overflowing_or_nan_bounds_give_inf_not_an_error():
    """Float and 0-d tensor bounds (run-time measurements), finite, huge, infinite and NaN."""
    for v in (1e308, math.inf, math.nan):
        assert evaluate(aten.exp.default, (Arg(Bound(v), (2, 3)),), {}, [(2, 3)])[0].absmax == math.inf
    for v in (1e308, math.inf, math.nan, 100.0):
        b = evaluate(aten.exp.default, (Arg(Bound(torch.tensor(v, dtype=torch.float64)), (2, 3)),), {}, [(2, 3)])[0]
        assert isinstance(b.absmax, torch.Tensor) and float(b.absmax) == math.inf
    b = evaluate(aten.exp.default, (Arg(Bound(torch.tensor(2.0, dtype=torch.float64)), (2, 3)),), {}, [(2, 3)])[0]
    assert math.exp(2.0) < float(b.absmax) < math.exp(2.0) * 1.05
    assert lookup(aten.log.default) is None  # (log is unbounded near 0: left without a rule)


# ============================================================================ linalg_vector_norm
@SETTINGS
@given(lead=lead_shapes, d=widths, kind=st.sampled_from(ROW_KINDS), e=exponents, seed=seeds,
       dtype=st.sampled_from(DTYPES), ord=st.sampled_from([1, 2, 2.0, math.inf]),
       dim=st.sampled_from([None, -1, 0, "first_last"]), keepdim=st.booleans())
def test__vector_norm__never_underestimates_the_kernel(lead, d, kind, e, seed, dtype, ord, dim, keepdim):
    g = torch.Generator().manual_seed(seed)
    x = rows((*lead, d), kind, 2.0**e, g).to(dtype)
    dims = [0, -1] if dim == "first_last" else dim
    if dims == [0, -1] and x.dim() == 1:
        dims = [0]
    out = torch.linalg.vector_norm(x, ord, dims, keepdim)
    if not torch.isfinite(out).all():
        return  # (a sum of squares above 2^128 overflows: Inf, the nonfinite policy's business)
    for mode in MODES:
        b = bound_of(aten.linalg_vector_norm.default, x, out.shape, ord, dims, keepdim, mode=mode)
        assert_bounds(aten.linalg_vector_norm.default, b, out)
    if dims is not None and ord != math.inf:
        out = torch.ops.aten.norm.ScalarOpt_dim(x, ord, [dims] if isinstance(dims, int) else dims, keepdim)
        b = bound_of(aten.norm.ScalarOpt_dim, x, out.shape, ord, [dims] if isinstance(dims, int) else dims, keepdim)
        assert_bounds(aten.norm.ScalarOpt_dim, b, out)


def test__vector_norm__other_orders_have_no_rule():
    b = evaluate(aten.linalg_vector_norm.default, (Arg(Bound(1.0), (3, 4)), 3.0, [-1], True), {}, [(3, 1)])
    assert b == [None]


# ============================================================================ x / ||x||
def normalised(x: torch.Tensor) -> torch.Tensor:
    """What the idiom computes, with PyTorch's kernels in x's dtype."""
    return x / torch.linalg.vector_norm(x, 2, [-1], True)


def check_normalised(x: torch.Tensor, what: str = "") -> torch.Tensor:
    """The rule's bound against the kernels' output; rows with Inf / NaN (a row whose squares all
    underflow: x / 0) are the nonfinite policy's business and are left out. Returns the output."""
    out = normalised(x)
    for mode in MODES:
        b = bound_of(L2_NORMALISED, x, out.shape, mode=mode)
        if torch.isfinite(out).all():
            assert_bounds(L2_NORMALISED, b, out, what=what)
        else:
            flat = out.reshape(-1, out.shape[-1])
            ok = flat[torch.isfinite(flat).all(-1)]
            if ok.numel():
                assert_bounds(L2_NORMALISED, b, ok, fields=("absmax", "rownorm", "rowsum"), what=what)
    return out


@SETTINGS
@given(lead=lead_shapes, d=widths, kind=st.sampled_from(ROW_KINDS), e=exponents, seed=seeds,
       dtype=st.sampled_from(DTYPES))
def test__l2_normalised__never_underestimates_the_kernel(lead, d, kind, e, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = rows((*lead, d), kind, 2.0**e, g).to(dtype)
    out = check_normalised(x, f"kind {kind}, 2^{e:.1f}")
    if kind != "wide":  # (2^-30 .. 2^30: no square under- or overflows; 0 / 0 for a zero row)
        zero_rows = (x == 0).all(-1, keepdim=True)
        assert (torch.isfinite(out) | zero_rows).all()


@SETTINGS
@given(lead=lead_shapes, d=widths, kind=st.sampled_from(ROW_KINDS), e=st.floats(-80, -58), seed=seeds,
       dtype=st.sampled_from(DTYPES))
def test__l2_normalised__holds_for_rows_of_float32_dust(lead, d, kind, e, seed, dtype):
    """Rows around 2^-75 .. 2^-60, whose squares are subnormal or zero in float32: the computed
    norm comes out well below the true one, and the bound must still hold."""
    g = torch.Generator().manual_seed(seed)
    check_normalised(rows((*lead, d), kind, 2.0**e, g).to(dtype), f"kind {kind}, 2^{e:.1f}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 16, 64, 768])
def test__l2_normalised__worst_dust_rows_exceed_one_and_stay_bounded(dtype, d):
    """The worst cases of the rule's docstring, built on purpose: one entry whose square rounds
    up to 2^-149 and the rest rounding to 0 give max |y| = 1.22 and a row norm ~sqrt(D / 2):
    real outputs of the float32 kernel above 1, which is why the bound is not 1."""
    big = math.sqrt(1.49) * 2.0**-74.5
    small = math.sqrt(0.49) * 2.0**-74.5
    x = torch.full((2, d), small, dtype=torch.float64)
    x[:, 0] = big
    x = x.to(dtype)
    out = check_normalised(x)
    assert torch.isfinite(out).all()
    if d >= 2:  # (a single element's norm is its |x|: no squaring)
        assert float(out.abs().max()) > 1.2  # the float32 norm is 2^-74.5, the true one larger
        rn = float(torch.linalg.vector_norm(out.double(), dim=-1).max())
        assert rn > math.sqrt(1.49 + 0.49 * (d - 1)) * 0.99
    # one order of magnitude above, the squares are normal and the output is at 1
    out = check_normalised((x.double() * 2.0**16).to(dtype))
    assert float(out.abs().max()) <= 1 + 2.0**-7


def test__l2_normalised__zero_and_vanishing_rows_are_nonfinite_not_bounded():
    """0 / 0 is NaN and x / 0 (every square underflowed) is Inf: the nonfinite policy's business,
    as in the float model; the other rows keep the bound."""
    x = torch.randn(3, 8)
    x[0] = 0
    x[1] = 2.0**-80
    out = check_normalised(x)
    assert torch.isnan(out[0]).all() and torch.isinf(out[1]).all() and torch.isfinite(out[2]).all()


def test__l2_normalised__bound_is_near_one_where_it_matters():
    """max |y| <= sqrt(1.5) (1 + 2^-6) plus the registry's margin: with power-of-two scales it
    picks the scale a bound of 1 would."""
    b = evaluate(L2_NORMALISED, (Arg(Bound.unknown(), (4, 512)),), {}, [(4, 512)])[0]
    assert 1.0 < b.absmax < 1.26
    fmt = fxscale.formats.get_format(torch.float8_e4m3fn)
    assert fmt.scale_for(b.absmax) == fmt.scale_for(1.0)
    assert b.rownorm < math.sqrt(513) * 1.03


# ============================================================================ the idiom in a graph
class _Norm(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


IDIOMS = {
    "norm_dim": lambda x: x / x.norm(dim=-1, keepdim=True),
    "norm_p2": lambda x: x / x.norm(p=2, dim=-1, keepdim=True),
    "vector_norm_last": lambda x: x / torch.linalg.vector_norm(x, dim=x.dim() - 1, keepdim=True),
    "F_normalize": lambda x: F.normalize(x, dim=-1),
    "aten_norm": lambda x: x / torch.ops.aten.norm.ScalarOpt_dim(x, 2, [-1], True),
}
NOT_IDIOMS = {
    "other_numerator": lambda x: (x + 1) / x.norm(dim=-1, keepdim=True),
    "column_norm": lambda x: x / x.norm(dim=0, keepdim=True),
    "l1_norm": lambda x: x / x.norm(p=1, dim=-1, keepdim=True),
    "inverted": lambda x: x.norm(dim=-1, keepdim=True) / x,
}


def _div_steps(f, x):
    gm = capture(_Norm(f), (x,), dynamic_batch=False)
    divs = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.div.Tensor]
    steps = {s.name: s for s in build_steps(gm)}
    assert divs
    return [steps[n] for n in divs]


@pytest.mark.parametrize("name", sorted(IDIOMS))
@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 8), (16,)])
def test__idiom__is_recognised(name, shape):
    if name == "vector_norm_last" and len(shape) == 1:
        pytest.skip("(the same as norm_dim for one row)")
    steps = _div_steps(IDIOMS[name], torch.randn(shape))
    assert [s.op for s in steps] == [L2_NORMALISED]


@pytest.mark.parametrize("name", sorted(NOT_IDIOMS))
def test__idiom__is_not_recognised_elsewhere(name):
    steps = _div_steps(NOT_IDIOMS[name], torch.randn(4, 16))
    assert all(s.op is aten.div.Tensor for s in steps)


def test__idiom__one_row_without_keepdim():
    steps = _div_steps(lambda x: x / x.norm(), torch.randn(16))
    assert [s.op for s in steps] == [L2_NORMALISED]


# ============================================================================ end to end
class _Clip(torch.nn.Module):
    """CLIP's two gaps in one: normalised rows into a matmul, and a parameter's exp."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(64, 32, generator=g) / 8)
        self.W2 = torch.nn.Parameter(torch.randn(64, 32, generator=g) / 8)
        self.p = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's logit_scale

    def forward(self, x):
        return (x / x.norm(dim=-1, keepdim=True)) @ self.W + (x * self.p.exp()) @ self.W2


def _adversarial_inputs(g):
    yield torch.randn(8, 64, generator=g)
    yield torch.randn(8, 64, generator=g) * 2.0**20
    yield torch.randn(8, 64, generator=g) * 2.0**-30
    yield torch.full((8, 64), 3.0)  # rows of equal values
    yield F.one_hot(torch.arange(8) % 64, 64).float() * 5.0  # one-hot rows
    yield torch.sign(torch.randn(8, 64, generator=g)) * 7.0  # |x| equal, signs aligned to nothing
    big, small = math.sqrt(1.49) * 2.0**-74.5, math.sqrt(0.49) * 2.0**-74.5
    dust = torch.full((8, 64), small)
    dust[:, 0] = big
    yield torch.cat([dust[:4], torch.randn(4, 64, generator=g)])  # float32 dust rows beside normal rows


def test__end_to_end__normalised_rows_and_exp_get_static_bounds():
    m = _Clip().eval()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 64, generator=g)
    sm = fxscale.transform(m, (x0,))
    rows_ = {r["node"]: r for r in sm.report.rows}
    div = next(r for r in rows_.values() if r["op"] == "aten.div")
    assert div["bound"] is not None and div["bound"] <= 1.26, div
    assert not div["bound_measured"] and not div["runtime_amax"] and not div["dynamic"], div
    assert div["kind"] != "fallback" and "run-time amax" not in div["note"], div
    exp = next(r for r in rows_.values() if r["op"] == "aten.exp")
    assert exp["kind"] != "fallback" and exp["bound"] is not None, exp
    assert exp["observed"] <= exp["bound"] <= exp["observed"] * 1.05, exp
    norm = next(r for r in rows_.values() if r["op"] == "aten.linalg_vector_norm")
    assert norm["kind"] != "fallback", norm
    for x in _adversarial_inputs(g):
        ratios = [r["ratio"] for r in fxscale.audit(sm, x)]
        assert ratios and all(r <= 1 for r in ratios), ratios
        with torch.no_grad():
            ref, y = m(x), sm(x)
        assert fxscale.sqnr_db(ref, y) > 25, fxscale.sqnr_db(ref, y)


def test__marker_op__pickles_and_copies_as_itself():
    """(Steps are copied and may be pickled with a transformed module: the marker stays the one
    object the rule table knows.)"""
    import copy
    import pickle

    assert pickle.loads(pickle.dumps(L2_NORMALISED)) is L2_NORMALISED
    assert copy.deepcopy(L2_NORMALISED) is L2_NORMALISED
    x = torch.randn(3, 5)
    torch.testing.assert_close(L2_NORMALISED(x), F.normalize(x, dim=-1))


def test__end_to_end__bf16_model():
    m = _Clip().to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(2)
    sm = fxscale.transform(m, (torch.randn(8, 64, generator=g).to(torch.bfloat16),))
    div = next(r for r in sm.report.rows if r["op"] == "aten.div")
    assert div["bound"] <= 1.26 and not div["runtime_amax"] and not div["dynamic"], div
    for x in _adversarial_inputs(g):
        x = x.to(torch.bfloat16)
        ratios = [r["ratio"] for r in fxscale.audit(sm, x)]
        assert ratios and all(r <= 1 for r in ratios), ratios
        with torch.no_grad():
            assert fxscale.sqnr_db(m(x).float(), sm(x).float()) > 20

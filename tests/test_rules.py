"""Soundness of the rule table: no rule ever under-estimates any field of its output Bound.

Each test computes the true output with real torch ops in float64 and compares every Bound
field (absmax, rownorm along the last dim, colnorm along dim -2, the L1 versions, and the
spectral norm of the trailing matrices) with what ``fxscale.rules.evaluate`` proves from the
inputs' exact stats, in both rule strengths, on random and adversarial inputs.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_map

from fxscale.bound import Bound
from fxscale.rules import Arg, evaluate

aten = torch.ops.aten
FIELDS = ("absmax", "rownorm", "colnorm", "rowsum", "colsum", "spectral")
MODES = ("rownorm", "absmax")
REL_TOL = 1e-9  # float64 arithmetic in the reference; the rules add their own margin
SETTINGS = settings(max_examples=25, deadline=None)
KINDS = ("randn", "bound", "positive", "spike", "rowspike", "zeros", "tiny")


# ============================================================================ helpers
def true_stats(t: torch.Tensor) -> dict[str, float]:
    """Exact norms of ``t`` (a 1-D tensor counts as one row, like Bound.of_tensor)."""
    x = t.detach().to(torch.float64)
    if x.numel() == 0:
        return dict.fromkeys(FIELDS, 0.0)
    if x.dim() == 0:
        return dict.fromkeys(FIELDS, float(x.abs()))
    a = x.abs()
    am = float(a.max())
    rn = float(torch.linalg.vector_norm(x, dim=-1).max())
    rs = float(a.sum(-1).max())
    if x.dim() == 1:
        return {"absmax": am, "rownorm": rn, "colnorm": am, "rowsum": rs, "colsum": am, "spectral": rn}
    return {
        "absmax": am,
        "rownorm": rn,
        "colnorm": float(torch.linalg.vector_norm(x, dim=-2).max()),
        "rowsum": rs,
        "colsum": float(a.sum(-2).max()),
        "spectral": float(torch.linalg.matrix_norm(x, ord=2).max()),
    }


def _to_arg(x):
    return Arg(Bound.of_tensor(x), tuple(x.shape)) if isinstance(x, torch.Tensor) else x


def check(op, args: tuple, kwargs: dict | None = None, *, modes=MODES) -> None:
    """Assert ``evaluate(op, ...)`` bounds every field of ``op(*args)``'s true stats."""
    kwargs = kwargs or {}
    out = op(*args, **kwargs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    rargs, rkwargs = tree_map(_to_arg, args), tree_map(_to_arg, kwargs)
    for mode in modes:
        bounds = evaluate(op, rargs, rkwargs, [tuple(o.shape) for o in outs], mode=mode)
        for i, (o, b) in enumerate(zip(outs, bounds)):
            assert b is not None, f"{op}: rule gave no bound"
            true = true_stats(o)
            for f in FIELDS:
                got = float(getattr(b, f))
                assert got >= true[f] * (1 - REL_TOL) - 1e-300, (
                    f"{op} ({mode}) output {i} shape {tuple(o.shape)}: bound {f}={got} < true {true[f]}; "
                    f"input shapes {[tuple(a.shape) for a in tree_leaves_t(args)]}"
                )


def tree_leaves_t(args):
    from torch.utils._pytree import tree_leaves

    return [a for a in tree_leaves(args) if isinstance(a, torch.Tensor)]


def make(shape, kind: str, g: torch.Generator, mag: float = 1.0) -> torch.Tensor:
    """A float64 tensor of ``shape``: random, all at the bound, one-hot spikes, zeros, ..."""
    shape = tuple(shape)
    if kind == "randn":
        return torch.randn(shape, generator=g, dtype=torch.float64) * mag
    if kind == "tiny":
        return torch.randn(shape, generator=g, dtype=torch.float64) * 1e-30
    if kind == "bound":  # every element at the bound, random signs
        s = torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1
        return s * mag
    if kind == "positive":
        return torch.full(shape, mag, dtype=torch.float64)
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.float64)
    n = math.prod(shape)
    if kind == "spike":
        t = torch.zeros(n, dtype=torch.float64)
        if n:
            t[int(torch.randint(0, n, (1,), generator=g))] = mag * 7.0
        return t.reshape(shape)
    if kind == "rowspike":  # a one-hot spike in every row
        if not shape or shape[-1] == 0:
            return torch.full(shape, mag, dtype=torch.float64)
        idx = torch.randint(0, shape[-1], shape[:-1], generator=g)
        return F.one_hot(idx, shape[-1]).to(torch.float64) * mag * 5.0
    raise ValueError(kind)


def matmul_operands(m: int, k: int, n: int, kind: str, g: torch.Generator):
    """(a, b) for ``a @ b``, including inputs that make each bound tight."""
    b = make((k, n), "randn", g, 3.0)
    if kind in KINDS:
        return make((m, k), kind, g, 2.0), make((k, n), kind, g, 3.0)
    cols = torch.randint(0, n, (m,), generator=g)
    if kind == "aligned":  # |a| at the bound with signs aligned to a column of b: hits max|a| ||b_:j||_1
        return 2.0 * torch.sign(b[:, cols]).t().contiguous(), b
    if kind == "parallel":  # rows parallel to a column of b: Cauchy-Schwarz is equality
        return (b[:, cols] / b[:, cols].norm(dim=0).clamp_min(1e-30)).t().contiguous() * 2.0, b
    if kind == "singular":  # rows along b's top left singular vector: ||a_i b|| = ||a_i|| ||b||_2
        u = torch.linalg.svd(b)[0][:, 0]
        return u.expand(m, k).contiguous() * 2.0, b
    raise ValueError(kind)


MM_KINDS = (*KINDS, "aligned", "parallel", "singular")
dims = st.integers(1, 6)
seeds = st.integers(0, 2**31 - 1)


# ============================================================================ matmuls
@SETTINGS
@given(m=dims, k=dims, n=dims, kind=st.sampled_from(MM_KINDS), seed=seeds)
def test_mm_rule__never_underestimates(m, k, n, kind, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = matmul_operands(m, k, n, kind, g)
    check(aten.mm.default, (a, b))
    check(aten.matmul.default, (a, b))
    # a batch of them, and broadcasting a batched lhs against a matrix
    a3 = torch.stack([a, make(a.shape, "randn", g)])
    b3 = torch.stack([b, -b])
    check(aten.bmm.default, (a3, b3))
    check(aten.matmul.default, (a3, b))
    check(aten.matmul.default, (a3, b3))


@SETTINGS
@given(m=dims, k=dims, n=dims, kind=st.sampled_from(KINDS), seed=seeds)
def test_matmul_rule__vector_operands_never_underestimate(m, k, n, kind, seed):
    g = torch.Generator().manual_seed(seed)
    a, v, w = make((m, k), kind, g, 2.0), make((k,), kind, g, 3.0), make((k, n), kind, g)
    check(aten.matmul.default, (a, v))  # (m, k) @ (k,) -> (m,): its last dim is m
    check(aten.matmul.default, (v, w))  # (k,) @ (k, n) -> (n,)
    check(aten.matmul.default, (v, v))  # dot
    check(aten.matmul.default, (torch.stack([a, a]), v))  # (2, m, k) @ (k,) -> (2, m)
    check(aten.matmul.default, (v, torch.stack([w, -w])))  # (k,) @ (2, k, n) -> (2, n)


def test_matmul_rule__matrix_vector_all_ones():
    """``ones(m, k) @ ones(k)`` has L2 norm ``k sqrt(m)`` along its (only) dim."""
    check(aten.matmul.default, (torch.ones(5, 4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)))


@SETTINGS
@given(m=dims, k=dims, n=dims, kind=st.sampled_from(MM_KINDS), seed=seeds,
       beta=st.sampled_from([0.0, 1.0, -0.5]), alpha=st.sampled_from([1.0, 2.0, -1.0]))
def test_addmm_and_linear_rules__never_underestimate(m, k, n, kind, seed, beta, alpha):
    g = torch.Generator().manual_seed(seed)
    a, b = matmul_operands(m, k, n, kind, g)
    bias = make((n,), kind if kind in KINDS else "randn", g, 4.0)
    check(aten.addmm.default, (bias, a, b), {"beta": beta, "alpha": alpha})
    check(aten.addmm.default, (make((m, n), "randn", g), a, b))
    w = b.t().contiguous()  # nn.Linear stores (n, k)
    check(aten.linear.default, (a, w, bias))
    check(aten.linear.default, (a, w))
    check(aten.linear.default, (torch.stack([a, -a]), w, bias))


# ============================================================================ elementwise
BCAST = ("same", "row", "col", "vector", "scalar", "batch")


def _other_shape(shape, how):
    r, d = shape[-2], shape[-1]
    return {"same": shape, "row": (1, d), "col": (r, 1), "vector": (d,), "scalar": (), "batch": (r, d)}[how]


@SETTINGS
@given(r=dims, d=dims, kind=st.sampled_from(KINDS), kind2=st.sampled_from(KINDS), how=st.sampled_from(BCAST),
       seed=seeds, alpha=st.sampled_from([1.0, -2.0, 0.5]))
def test_add_sub_mul_rules__never_underestimate(r, d, kind, kind2, how, seed, alpha):
    g = torch.Generator().manual_seed(seed)
    shape = (2, r, d) if how == "batch" else (r, d)
    a, b = make(shape, kind, g, 2.0), make(_other_shape(shape, how), kind2, g, 3.0)
    check(aten.add.Tensor, (a, b), {"alpha": alpha})
    check(aten.sub.Tensor, (a, b), {"alpha": alpha})
    check(aten.mul.Tensor, (a, b))
    check(aten.add.Tensor, (b, a))
    check(aten.mul.Tensor, (a, -1.5))
    check(aten.add.Tensor, (a, 0.25))


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), kind=st.sampled_from(KINDS), seed=seeds,
       mag=st.sampled_from([1e-3, 1.0, 50.0]))
def test_activation_rules__never_underestimate(shape, kind, seed, mag):
    g = torch.Generator().manual_seed(seed)
    x = make(shape, kind, g, mag)
    for op, kw in [(aten.relu.default, {}), (aten.gelu.default, {}), (aten.gelu.default, {"approximate": "tanh"}),
                   (aten.silu.default, {}), (aten.tanh.default, {}), (aten.hardswish.default, {}),
                   (aten.mish.default, {}), (aten.erf.default, {}), (aten.sin.default, {}), (aten.cos.default, {}),
                   (aten.elu.default, {}), (aten.elu.default, {"alpha": 1.6733, "scale": 1.0507}),
                   (aten.leaky_relu.default, {"negative_slope": -0.5})]:
        check(op, (x,), kw)
        check(op, (-x,), kw)
    for lo, hi in [(0.0, 6.0), (-1.0, 1.0), (0.5, 2.0), (-3.0, -1.0), (None, 0.25), (0.25, None), (-2.0, None)]:
        check(aten.clamp.default, (x, lo, hi))
        check(aten.clamp.default, (-x, lo, hi))
        if lo is not None and hi is not None:
            check(aten.hardtanh.default, (x, lo, hi))
    check(aten.clamp_min.default, (x, 0.5))
    check(aten.clamp_max.default, (x, -0.5))


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), kind=st.sampled_from(KINDS), seed=seeds,
       mag=st.sampled_from([1e-3, 1.0, 100.0]), dim=st.integers(-3, 2))
def test_softmax_rule__never_underestimates(shape, kind, seed, mag, dim):
    g = torch.Generator().manual_seed(seed)
    x = make(shape, kind, g, mag)
    dim = dim % len(shape)
    check(aten._softmax.default, (x, dim, False))
    check(aten.softmax.int, (x, dim))


@SETTINGS
@given(r=dims, d=st.integers(1, 9), kind=st.sampled_from(KINDS), seed=seeds, affine=st.sampled_from(["none", "w", "wb", "aligned"]))
def test_layer_norm_rule__never_underestimates(r, d, kind, seed, affine):
    g = torch.Generator().manual_seed(seed)
    x = make((2, r, d), kind, g, 3.0)
    w = b = None
    if affine != "none":
        w = make((d,), "randn", g, 2.0)
    if affine == "wb":
        b = make((d,), "randn", g, 1.5)
    if affine == "aligned":  # bias with the sign of the normalised spike
        x = make((2, r, d), "rowspike", g, 3.0)
        w, b = torch.full((d,), 2.0, dtype=torch.float64), torch.full((d,), 1.0, dtype=torch.float64)
    check(aten.layer_norm.default, (x, [d], w, b, 1e-5))


@SETTINGS
@given(lq=dims, lk=dims, e=dims, ev=dims, kind=st.sampled_from(KINDS), seed=seeds, causal=st.booleans(),
       mask=st.booleans())
def test_sdpa_rule__never_underestimates(lq, lk, e, ev, kind, seed, causal, mask):
    g = torch.Generator().manual_seed(seed)
    q, k = make((2, lq, e), "randn", g, 3.0), make((2, lk, e), "randn", g, 3.0)
    v = make((2, lk, ev), kind, g, 2.0)
    kw = {"is_causal": causal and lq <= lk}
    if mask and not kw["is_causal"]:
        kw["attn_mask"] = make((lq, lk), "randn", g, 2.0)
    check(aten.scaled_dot_product_attention.default, (q, k, v), kw)


def test_sdpa_rule__dropout_scales_the_bound():
    """With dropout_p > 0 the kept weights are scaled by 1/(1-p): the rule must allow for it."""
    torch.manual_seed(0)
    q = torch.zeros(1, 8, 4, dtype=torch.float64)
    v = torch.ones(1, 8, 4, dtype=torch.float64)
    for _ in range(5):
        check(aten.scaled_dot_product_attention.default, (q, q, v), {"dropout_p": 0.5})


# ============================================================================ shape ops
def _reshapes(shape):
    n = math.prod(shape)
    outs = [(n,), (1, n), (n, 1), tuple(reversed(shape))]
    if len(shape) >= 2:
        outs += [(math.prod(shape[:-1]), shape[-1]), (shape[0], math.prod(shape[1:])), (*shape, 1), (1, *shape)]
        outs += [(*shape[:-1], 1, shape[-1])]
    for f in (2, 3):
        if shape[-1] % f == 0:
            outs += [(*shape[:-1], f, shape[-1] // f), (*shape[:-1], shape[-1] // f, f)]
    return outs


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=4), kind=st.sampled_from(KINDS), seed=seeds)
def test_shape_rules__never_underestimate(shape, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = make(shape, kind, g, 2.0)
    nd = len(shape)
    for o in _reshapes(tuple(shape)):
        check(aten.view.default, (x, list(o)))
        check(aten.reshape.default, (x, list(o)))
    for d0 in range(nd):
        for d1 in range(nd):
            check(aten.transpose.int, (x, d0, d1))
    perms = torch.randperm(math.factorial(nd), generator=g)[:6].tolist()


    all_perms = list(itertools.permutations(range(nd)))
    for p in perms:
        check(aten.permute.default, (x, list(all_perms[p])))
    for dim in range(nd):
        y = make(shape, "randn" if kind != "randn" else "rowspike", g, 3.0)
        check(aten.cat.default, ([x, y],), {"dim": dim})
        check(aten.cat.default, ([x, x, y], dim))
        check(aten.split.Tensor, (x, max(1, shape[dim] // 2), dim))
        if shape[dim] > 1:
            check(aten.split_with_sizes.default, (x, [1, shape[dim] - 1], dim))


# ============================================================================ quantised bound
@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), kind=st.sampled_from(KINDS), seed=seeds,
       fmt=st.sampled_from(["int8", "float8_e4m3fn", "float8_e5m2", "bfloat16"]))
def test_quantised_bound__covers_the_rounded_tensor(shape, kind, seed, fmt):
    from fxscale.bound import quantised_bound
    from fxscale.formats import get_format

    g = torch.Generator().manual_seed(seed)
    f = get_format(fmt)
    x = make(shape, kind, g, 3.0).to(torch.float32)
    scale = f.scale_for(float(x.abs().max()) if x.numel() else 0.0)
    y = f.cast(x / scale).to(torch.float64) * scale
    b = quantised_bound(Bound.of_tensor(x.double()), f, scale, tuple(shape))
    true = true_stats(y)
    for fld in FIELDS:
        assert float(getattr(b, fld)) >= true[fld] * (1 - REL_TOL), (fld, float(getattr(b, fld)), true[fld])


@pytest.mark.parametrize("mode", MODES)
def test_evaluate__seed_rule_is_selectable(mode):
    a, b = Arg(Bound.of_tensor(torch.ones(4, 64)), (4, 64)), Arg(Bound.of_tensor(torch.ones(64, 8)), (64, 8))
    out = evaluate(aten.mm.default, (a, b), {}, [(4, 8)], mode=mode)[0]
    assert out.absmax == pytest.approx(64 * (1 + 2**-7))


@pytest.mark.parametrize("mag", [1e-30, 1.0, 1e30])
def test_bound_of_tensor__spectral_never_underflows(mag):
    """Bug fixed in bound.py: the float32 Gram matrix of tiny entries underflowed to 0."""
    x = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * mag
    true = float(torch.linalg.matrix_norm(x, ord=2))
    got = Bound.of_tensor(x).spectral
    assert true <= got <= true * 1.01

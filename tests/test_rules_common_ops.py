"""Rules for common ops that had none (issue 14, item 5): ``hardsigmoid``, ``cumsum``, ``pad``,
``type_as``. Each never under-estimates any field, checked as in tests/test_rules.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxscale.rules import lookup
from tests.test_rules import KINDS, SETTINGS, check, dims, make, seeds

aten = torch.ops.aten


@pytest.mark.parametrize("op", [aten.hardsigmoid.default, aten.cumsum.default, aten.pad.default,
                                aten.constant_pad_nd.default, aten.type_as.default,
                                aten.repeat_interleave.self_int, aten.stack.default])
def test__common_ops__have_rules(op):
    assert lookup(op) is not None


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), kind=st.sampled_from(KINDS), seed=seeds,
       mag=st.sampled_from([1e-3, 1.0, 50.0]))
def test__hardsigmoid_and_cumsum__never_underestimate(shape, kind, seed, mag):
    g = torch.Generator().manual_seed(seed)
    x = make(shape, kind, g, mag)
    for y in (x, -x):
        check(aten.hardsigmoid.default, (y,))
        for dim in range(-len(shape), len(shape)):
            check(aten.cumsum.default, (y, dim))


@SETTINGS
@given(shape=st.lists(dims, min_size=2, max_size=3), kind=st.sampled_from(KINDS), seed=seeds,
       pads=st.sampled_from([[1, 0], [0, 2], [1, 1, 2, 0], [0, 0, 0, 1]]), value=st.sampled_from([0.0, -7.0, 0.5]))
def test__pad__never_underestimates(shape, kind, seed, pads, value):
    g = torch.Generator().manual_seed(seed)
    x = make(shape, kind, g, 2.0)
    check(aten.pad.default, (x, pads), {"mode": "constant", "value": value})
    check(aten.constant_pad_nd.default, (x, pads, value))
    if len(pads) == 2 and max(pads) < shape[-1]:
        for mode in ("reflect", "replicate", "circular"):
            check(aten.pad.default, (x, pads), {"mode": mode})


def test__type_as__keeps_the_bound_up_to_rounding():
    g = torch.Generator().manual_seed(0)
    x = make((3, 5), "randn", g, 3.0)
    check(aten.type_as.default, (x, torch.zeros(2, dtype=torch.float64)))


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), kind=st.sampled_from(KINDS), seed=seeds,
       repeats=st.sampled_from([1, 2, 3]))
def test__repeat_interleave__never_underestimates(shape, kind, seed, repeats):
    """GPT-J's rotary sin / cos (repeated along the last dim): every field, every dim."""
    g = torch.Generator().manual_seed(seed)
    x = make(shape, kind, g, 2.0)
    check(aten.repeat_interleave.self_int, (x, repeats))
    for dim in range(-len(shape), len(shape)):
        check(aten.repeat_interleave.self_int, (x, repeats, dim))


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), kind=st.sampled_from(KINDS), seed=seeds,
       n=st.sampled_from([1, 2, 3]))
def test__stack__never_underestimates(shape, kind, seed, n):
    """Tensors of different magnitudes stacked at every position (a new last dim: rotate_every_two)."""
    g = torch.Generator().manual_seed(seed)
    xs = [make(shape, kind, g, 2.0 ** i) for i in range(n)]
    for dim in range(-len(shape) - 1, len(shape) + 1):
        check(aten.stack.default, (xs, dim))


@SETTINGS
@given(hw=st.tuples(st.integers(2, 5), st.integers(2, 5)), kind=st.sampled_from(KINDS), seed=seeds,
       mode=st.sampled_from(["nearest", "nearest-exact", "bilinear", "bilinear-aa", "bilinear-corners"]),
       scale=st.sampled_from([2.0, 3.0, 0.5, 1.7]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test__upsample__never_underestimates(hw, kind, seed, mode, scale, dtype):
    """UNet / VAE upsamplers (F.interpolate, as export captures it): nearest copies elements,
    (bi)linear mixes them convexly, as PyTorch's kernels compute it in float32 and bf16."""
    import torch.nn.functional as F

    from passes.capture import capture

    g = torch.Generator().manual_seed(seed)
    kw = {"mode": mode.split("-")[0] if mode != "nearest-exact" else mode, "scale_factor": scale}
    if mode == "bilinear-aa":
        kw["antialias"] = True
        dtype = torch.float32  # (no bf16 antialias kernel on the CPU)
    if mode == "bilinear-corners":
        kw["align_corners"] = True

    x = make((2, 3, *hw), kind, g, 3.0).to(dtype)

    class Up(torch.nn.Module):
        def forward(self, t):
            return F.interpolate(t, **kw)

    gm = capture(Up(), (x,), dynamic_batch=False)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert lookup(node.target) is not None, node.target
    check(node.target, (x, *node.args[1:]), dict(node.kwargs))


@pytest.mark.parametrize("dims", [1, 2])
def test__conv_transpose__quantised_close_to_float32_and_its_bound_holds_at_the_worst_input(dims):
    """nn.ConvTranspose1d/2d export as aten.conv_transpose1d/2d, which had no rule: unbounded, in
    float32, and the next layer needed a run-time amax (found by a user trial). Now a float8
    reference op (``fxscale::scaled_conv_transpose2d``). Gradient ascent inside |x| <= 1 looks
    for an output above the proven bound."""
    import fxscale
    from fxscale.metrics import sqnr_db

    torch.manual_seed(0)
    cls = torch.nn.ConvTranspose1d if dims == 1 else torch.nn.ConvTranspose2d
    conv = cls(4, 8, 3, stride=2, padding=1, output_padding=1, groups=2)
    m = torch.nn.Sequential(conv, torch.nn.ReLU()).eval()
    x = torch.rand(2, 4, *([6] * dims)) * 2 - 1
    sm = fxscale.transform(m, (x,), input_bounds=1.0)
    row = next(r for r in sm.report.rows if "conv_transpose" in r["node"] and r["kind"] == "quantised")
    assert row["computes"] == "float8_e4m3fn"
    x3 = torch.rand(3, *x.shape[1:]) * 2 - 1
    with torch.no_grad():
        assert sqnr_db(m(x3), sm(x3)) > 22  # measured 28-29 dB
    worst = torch.ones_like(x).requires_grad_()
    opt = torch.optim.Adam([worst], lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        (-conv(worst.clamp(-1, 1)).abs().max()).backward()
        opt.step()
    with torch.no_grad():
        seen = conv(worst.clamp(-1, 1)).abs().max().item()
    assert 0 < seen <= row["bound"]


@pytest.mark.parametrize("dims,padding,kernel", [(2, "same", 3), (2, "valid", 3), (1, "same", 5), (2, "same", 4)])
def test__conv_string_padding__quantised_where_symmetric_else_says_why(dims, padding, kernel):
    """nn.Conv2d(padding="same") exports as aten.conv2d.padding, which was never quantised and
    gave no reason (SigLIP's patch embedding, every EfficientNet conv; found by a user trial)."""
    import fxscale
    from fxscale.metrics import sqnr_db

    torch.manual_seed(0)
    conv = (torch.nn.Conv1d if dims == 1 else torch.nn.Conv2d)(8, 16, kernel, padding=padding)
    m = torch.nn.Sequential(conv, torch.nn.ReLU()).eval()
    x = torch.randn(2, 8, *([9] * dims))
    sm = fxscale.transform(m, (x,))
    row = next(r for r in sm.report.rows if r["node"].startswith("conv") and r["kind"] != "plumbing")
    if kernel % 2:
        assert row["computes"] == "float8_e4m3fn"
        with torch.no_grad():
            assert sqnr_db(m(x), sm(x)) > 22
    else:
        assert 'padding="same" with an even kernel' in row["note"]


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), kind=st.sampled_from(KINDS), seed=seeds,
       mag=st.sampled_from([1e-3, 1.0, 50.0]))
def test__sqrt_rsub_glu__never_underestimate(shape, kind, seed, mag):
    """Rules added after a user trial (a written-out LayerNorm's sqrt, ``1.0 - mask``, GLU
    subsamplers): on the op as PyTorch computes it, aligned signs and spikes included."""
    g = torch.Generator().manual_seed(seed)
    x = make(shape, kind, g, mag)
    y = make(shape, kind, g, mag)
    check(aten.sqrt.default, (x.abs(),))
    for alpha in (1, 2.5):
        check(aten.rsub.Tensor, (x, y), {"alpha": alpha})
        check(aten.rsub.Scalar, (x, 1.0), {"alpha": alpha})
    for dim in range(-len(shape), len(shape)):
        if shape[dim] % 2 == 0:
            check(aten.glu.default, (x, dim))
            check(aten.glu.default, (-x, dim))


@SETTINGS
@given(kind=st.sampled_from(KINDS), seed=seeds, mag=st.sampled_from([1e-3, 1.0, 50.0]))
def test__einsum__never_underestimates(kind, seed, mag):
    """Attention and pooling written as einsum (Funnel, BigBird) had no rule: fallbacks and
    run-time amaxes. Aligned signs (``kind``) make the sums of products reach the bound."""
    g = torch.Generator().manual_seed(seed)
    a, b = make([2, 3, 5, 8], kind, g, mag), make([2, 3, 7, 8], kind, g, mag)
    for eq, ops in [("bhqd,bhkd->bhqk", (a, b)), ("...qd,...kd->...qk", (a, b)), ("bhqd,bhkd", (a, b)),
                    ("bhqd->bq", (a,)), ("i,j->ij", (a[0, 0, 0], b[0, 0, 0])), ("bhqd,bhqd->", (a, a))]:
        check(aten.einsum.default, (eq, list(ops)))


@SETTINGS
@given(shape=st.lists(dims, min_size=1, max_size=3), kind=st.sampled_from(KINDS), seed=seeds)
def test__index_select_gather_repeat__never_underestimate(shape, kind, seed):
    """Rules added after a user trial (DeBERTa's relative positions, Speech2Text's subsampler)."""
    g = torch.Generator().manual_seed(seed)
    x = make(shape, kind, g, 3.0)
    for dim in range(len(shape)):
        idx = torch.randint(0, shape[dim], (5,), generator=g)
        check(aten.index_select.default, (x, dim, idx))
        gidx = torch.randint(0, shape[dim], tuple(shape), generator=g)
        check(aten.gather.default, (x, dim, gidx))
    check(aten.repeat.default, (x, [2] + [1] * (len(shape) - 1) + [3]))

"""The two-pass LayerNorm (``torch.ops.fxscale.layer_norm``) and its proven bound.

Tries to break ``|y| <= sqrt(D) (1 + (D + 16) u)`` (times the affine weight) with the op itself
on the rows that break PyTorch's Welford kernel: near-constant rows with a large offset, eps
1e-12 and 1e-5, float32 and bf16 (issue 11 case 3).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fxscale
from fxscale.bound import Bound
from fxscale.rules import evaluate
from fxscale.rules.registry import Arg

LN = torch.ops.fxscale.layer_norm.default


def _bound(d: int, eps: float, amax: float, w=None, b=None) -> float:
    x = Arg(Bound(amax).tighten((4, d)), (4, d))
    wa = Arg(Bound(float(w.abs().max())), (d,), w) if w is not None else None
    ba = Arg(Bound(float(b.abs().max())), (d,), b) if b is not None else None
    return float(evaluate(LN, (x, [d], wa, ba, eps), {}, [(4, d)])[0].absmax)


def _near_constant(d: int, log2_a: float, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = 1.3 * 2.0**log2_a
    ulp = 2 * 2.0**-24 * a
    x = torch.full((512, d), a) + ulp * torch.randint(-3, 4, (512, d), generator=g).float()
    x[::2, 0] += ulp * torch.randint(1, 200, (256,), generator=g).float()  # one outlier per row
    x[1::4] = a + ulp * torch.randint(-1, 2, (128, d), generator=g).float()  # all but flat
    x[3::8, :] = a
    x[3::8, d // 2] = a + ulp
    return x.to(dtype)


@pytest.mark.parametrize("d", [2, 4, 16, 384, 768])
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
@pytest.mark.parametrize("log2_a", [0, 10, 20, 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_layer_norm__near_constant_rows_stay_within_sqrt_d(d, eps, log2_a, dtype):
    x = _near_constant(d, log2_a, dtype)
    y = LN(x, [d], None, None, eps)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    bound = _bound(d, eps, float(x.abs().max()))
    assert float(y.float().abs().max()) <= bound <= math.sqrt(d) * 1.02
    # PyTorch's own kernel on the same rows can exceed sqrt(D) at these offsets (the reason for the op).


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_layer_norm__affine_and_one_hot_rows_within_bound(eps, dtype):
    torch.manual_seed(0)
    d = 64
    w, b = torch.randn(d), torch.randn(d)
    x = torch.randn(256, d) * 2.0 ** torch.randint(-20, 30, (256, 1)).float()
    x[:64] = 0.0
    x[torch.arange(64), torch.arange(64)] = 1e6  # one-hot rows reach sqrt(D - 1) exactly
    x = x.to(dtype)
    y = LN(x, [d], w.to(dtype), b.to(dtype), eps)
    assert float(y.float().abs().max()) <= _bound(d, eps, float(x.abs().max()), w, b)


@pytest.mark.parametrize("d", [4, 16, 64])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_layer_norm__sqrt_d_minus_1_branch_holds_on_spikes_offsets_and_a_search(d, eps, dtype):
    """Where max|x| / sqrt(eps) is moderate the rule proves sqrt(D - 1) plus the mean's rounding
    (tighter than sqrt(D)). Rows that reach sqrt(D - 1) in exact arithmetic (one spike over a
    constant, either sign, at every offset in the box), near-constant rows, and the best of a
    random-restart ascent on |xhat_0| inside the box must all stay under it."""
    g = torch.Generator().manual_seed(d)
    box = 4.0
    rows = []
    for c in torch.linspace(-box, box, 33):
        for a in (box, -box, c + 2.0**-10, c - 1e-3):
            r = torch.full((d,), float(c))
            r[int(torch.randint(d, (1,), generator=g))] = float(max(-box, min(box, float(a))))
            rows.append(r)
    rows += [torch.full((d,), 3.0) + 2.0**-20 * torch.randint(-3, 4, (d,), generator=g).float() for _ in range(64)]
    x = torch.stack(rows)
    x = torch.cat([x, (torch.rand(256, d, generator=g) * 2 - 1) * box])
    x.requires_grad_(True)  # ascent on each row's first element, kept inside the box
    for _ in range(30):
        y0 = LN(x, [d], None, None, eps)[:, 0].abs().sum()
        (grad,) = torch.autograd.grad(y0, x)
        with torch.no_grad():
            x += 0.05 * grad.sign()
            x.clamp_(-box, box)
    x = x.detach().to(dtype)
    bound = _bound(d, eps, box)
    assert bound < math.sqrt(d) * (1 + 2.0**-7)  # the sqrt(D - 1) branch is the one proven
    y = LN(x, [d], None, None, eps)
    assert float(y.float().abs().max()) <= bound
    assert float(y.float().abs().max()) >= 0.99 * math.sqrt(d - 1)  # the attack reaches the exact-math maximum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_layer_norm__matches_pytorch_on_ordinary_rows(dtype):
    torch.manual_seed(0)
    x, w, b = torch.randn(8, 5, 48).to(dtype), torch.randn(48).to(dtype), torch.randn(48).to(dtype)
    want = F.layer_norm(x.float(), (48,), w.float(), b.float(), 1e-5)
    got = LN(x, [48], w, b, 1e-5).float()
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_transform__layer_norm_bound_is_sqrt_d_at_eps_1e_12_whatever_the_input_bound():
    """BERT's eps = 1e-12 with a large declared input bound: the static bound stays sqrt(D) * |w| + |b|
    (no rounding term), and rows that break PyTorch's kernel stay within it after transform."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(16, eps=1e-12), torch.nn.Linear(16, 8)).eval()
    a = 2.0**20
    sm = fxscale.transform(model, (torch.randn(8, 16),), format="int8", input_bounds=a + 4)
    row = next(r for r in sm.report.rows if r["op"] == "fxscale.layer_norm")
    ln = model[0]
    assert row["bound"] <= (4.0 * float(ln.weight.detach().abs().max()) + float(ln.bias.detach().abs().max())) * 1.02
    x = torch.full((64, 16), a)
    x[:, 0] += 2.0**-3 * torch.randint(1, 20, (64,)).float()
    y = LN(x, [16], ln.weight.detach(), ln.bias.detach(), 1e-12)
    assert float(y.abs().max()) <= row["bound"]
    torch.testing.assert_close(sm(x), model[1](y), rtol=0.1, atol=0.1 * float(model[1](y).abs().max()))


# ------------------------------------------------------------------------- GroupNorm
def _gn_model(affine: bool = True):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(2, 8, affine=affine), torch.nn.SiLU(),
                            torch.nn.Conv2d(8, 4, 1)).eval()
    if affine:
        with torch.no_grad():
            m[1].weight.uniform_(-2, 2)
            m[1].bias.uniform_(-1, 1)
    return m


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm__rewritten_as_a_layer_norm_per_group_computes_the_same(affine):
    from passes.capture import capture
    from passes.layer_norm import group_norm_as_layer_norm

    m = _gn_model(affine)
    gm = capture(m, (torch.randn(2, 4, 6, 6),))
    assert group_norm_as_layer_norm(gm) == 1
    assert not any(n.target is torch.ops.aten.group_norm.default for n in gm.graph.nodes)
    x = torch.randn(5, 4, 6, 6) * 3 + 1
    torch.testing.assert_close(gm(x), m(x), rtol=1e-5, atol=1e-5)


def test_group_norm__transform_proves_its_bound_and_has_no_fallback():
    """GroupNorm had no rule (a run-time amax per call); through the per-group LayerNorm its
    output is proven, and the model is as accurate as per-tensor dynamic scaling."""
    m = _gn_model()
    x = torch.randn(2, 4, 6, 6)
    sm = fxscale.transform(m, (x,))
    assert "group_norm" not in str(sm.report) and sm.report.summary_line().count(" 0 fallback(s)") == 1
    x2 = torch.randn(7, 4, 6, 6)  # another batch size
    dyn = fxscale.dynamic_baseline(m, (x,))
    assert fxscale.sqnr_db(m(x2), sm(x2)) > fxscale.sqnr_db(m(x2), dyn(x2)) - 1.0


@pytest.mark.parametrize("log2_a", [0, 10, 20])
def test_group_norm__near_constant_groups_with_a_large_offset_never_saturate(log2_a):
    """The inputs that break a Welford-kernel bound (issue 11 case 3), group by group: the
    audit of every static scale stays <= 1."""
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.GroupNorm(2, 8, eps=1e-12), torch.nn.Conv2d(8, 4, 1)).eval()
    a = 2.0 ** log2_a
    x = torch.randn(2, 8, 4, 4)
    sm = fxscale.transform(m, (x,), input_bounds=2 * a)
    g = torch.Generator().manual_seed(2)
    hard = a + a * 2.0**-22 * torch.randint(-3, 4, (3, 8, 4, 4), generator=g).float()
    rows = fxscale.audit(sm, hard)
    assert rows and max(r["ratio"] for r in rows) <= 1.0, rows
    assert torch.isfinite(sm(hard)).all()

"""Residual add fused into the linear: ``x + proj(a)`` -> ``scaled_linear(..., residual=x)``
(``transform(..., fuse_residual=True)``; off by default, see TransformConfig).

CPU: the op's reference adds in float32 before the single rounding; the lowering fuses only an
add of two same-shape, same-dtype values whose linear output has no other user, and the fused
module computes what the unfused one does (float32 models: bit for bit). GPU (skipped without
CUDA): each kernel family with a residual against the CPU reference, eager and compiled (the
inductor lowering keeps ``_scaled_mm`` + add below ``_RESIDUAL_OP_MIN_M`` and the custom op
from there on). Thresholds as in test_kernels_gpu.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxscale
from fxscale.formats import get_format

fxops = torch.ops.fxscale


def _transform(model, x, fuse=True, **kw):
    return fxscale.transform(model, (x,), fuse_residual=fuse, **kw)


def _residual_linears(gm):
    return [n for n in gm.graph.nodes if n.target is fxops.scaled_linear.default and len(n.args) > 9]


class PreLN(nn.Module):
    """Two residual adds, operands in both orders; the second linear's input depends on the first add."""

    def __init__(self, d=64):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        x = x + self.a(self.ln(x))
        return self.b(torch.relu(x)) + x


def test_reference__adds_in_float32_before_the_one_rounding():
    f = get_format("e4m3")
    g = torch.Generator().manual_seed(0)
    x, w, r = torch.randn(8, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(8, 16, generator=g)
    one = torch.ones(())
    xq, wq = f.cast(x), f.cast(w)
    plain = fxops.scaled_linear(xq, one, wq, one, None, "relu", None, None, torch.float32)
    fused = fxops.scaled_linear(xq, one, wq, one, None, "relu", None, None, torch.float32, r)
    assert torch.equal(fused, plain + r)  # activation first, then the residual
    s = torch.tensor(0.25)
    q = fxops.scaled_linear(xq, one, wq, one, None, "relu", s, "float8_e4m3fn", torch.float32, r)
    assert torch.equal(q, f.cast((plain + r) / s))


@torch.no_grad()
def test_lowering__fuses_both_adds__same_result_as_unfused():
    torch.manual_seed(0)
    model = PreLN().eval()
    x = torch.randn(8, 64)
    fused, unfused = _transform(model, x), _transform(model, x, fuse=False)
    assert len(_residual_linears(fused)) == 2 and not _residual_linears(unfused)
    assert not _residual_linears(fxscale.transform(model, (x,)))  # off by default (measured slower)
    assert not any(n.target is torch.ops.aten.add.Tensor and any(a.target is fxops.scaled_linear.default
                                                              for a in n.all_input_nodes)
                   for n in fused.graph.nodes)
    for xt in (x, torch.randn(3, 64) * 2):  # another batch size too (dynamic batch)
        assert torch.equal(fused(xt), unfused(xt))
    notes = {r["node"]: r["note"] for r in fused.report.rows}
    assert "fused into the matmul epilogue" in notes["add"]
    assert "residual add fused" in notes["add"]  # the fused linear computes the add's value: its name


@torch.no_grad()
def test_lowering__bf16_model__fused_is_at_least_as_accurate():
    torch.manual_seed(1)
    model = PreLN().eval()
    x = torch.randn(16, 64)
    ref = model(x)
    m16 = PreLN().to(torch.bfloat16).eval()
    m16.load_state_dict(model.state_dict())
    x16 = x.to(torch.bfloat16)
    fused, unfused = _transform(m16, x16), _transform(m16, x16, fuse=False)
    s_f, s_u = fxscale.sqnr_db(ref, fused(x16).float()), fxscale.sqnr_db(ref, unfused(x16).float())
    assert s_f >= s_u - 0.1, (s_f, s_u)  # one rounding instead of two
    assert s_f > 20.0


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.v = nn.Parameter(torch.randn(32))

    def forward(self, x):
        return self.a(x) + self.v  # a broadcast add: not a residual


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)

    def forward(self, x):
        y = self.a(x)
        return y + x, y * 2  # the linear's output is needed on its own too


@pytest.mark.parametrize("model", [Broadcast(), TwoUsers()], ids=["broadcast", "two-users"])
@torch.no_grad()
def test_lowering__leaves_adds_it_cannot_fuse(model):
    x = torch.randn(4, 32)
    sm = _transform(model.eval(), x)
    assert not _residual_linears(sm)
    out, ref = sm(x), model(x)
    out, ref = (out, ref) if isinstance(ref, tuple) else ((out,), (ref,))
    assert all(fxscale.sqnr_db(r, o) > 20 for r, o in zip(ref, out))


# ----------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gpu_helpers():
    from tests import test_kernels_gpu as k

    return k


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["cublas", "triton", "auto"])
@pytest.mark.parametrize("M", [16, 300])
@pytest.mark.parametrize("out", ["bfloat16", "float8_e4m3fn"])
def test_kernels__residual_matches_reference(family, M, out, monkeypatch):
    monkeypatch.setenv("FXSCALE_AUTOTUNE", "0")
    k = _gpu_helpers()
    cuda = k._cuda()
    cuda.force(None if family == "auto" else family)
    try:
        xq, xs, wq, ws, b = k._operands(M, 512, 256)
        res = torch.randn(M, 256, device="cuda").to(torch.bfloat16)
        out_fmt = out if out.startswith("float8") else None
        os_ = None
        if out_fmt:  # the sound scale of the linear, plus the residual's max
            lin = k._out_scale(xq, xs, wq, ws, b, "relu", out_fmt)
            os_ = torch.tensor(get_format(out_fmt).scale_for(float(lin) * 448 + float(res.abs().max())),
                               device="cuda")
        got = fxops.scaled_linear(xq, xs, wq, ws, b, "relu", os_, out_fmt, torch.bfloat16, res)
        ref = fxops.scaled_linear(*[t.cpu() for t in (xq, xs, wq, ws, b)], "relu",
                                  None if os_ is None else os_.cpu(), out_fmt, torch.bfloat16, res.cpu())
        k._check(got, ref, os_, out_fmt)
    finally:
        cuda.force(None)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("M", [16, 256, 4096])
def test_compiled__residual_matches_eager(M):
    """Decode (custom op), mid M (``_scaled_mm`` + add in inductor), large M (custom op again)."""
    k = _gpu_helpers()
    xq, xs, wq, ws, b = k._operands(M, 512, 512)
    res = torch.randn(M, 512, device="cuda").to(torch.bfloat16)

    def f(xq, res):
        return fxops.scaled_linear(xq, xs, wq, ws, b, "none", None, None, torch.bfloat16, res)

    torch._dynamo.reset()
    try:
        got = torch.compile(f)(xq, res)
    finally:
        torch._dynamo.reset()
    assert k._rel(got, f(xq, res)) < 1e-2


@gpu
@pytest.mark.gpu
@torch.no_grad()
def test_transformed_block__fused_matches_unfused_on_gpu():
    torch.manual_seed(0)
    model = PreLN(256).cuda().to(torch.bfloat16).eval()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    fused, unfused = _transform(model, x), _transform(model, x, fuse=False)
    ref = copy.deepcopy(model).float()(x.float())
    assert abs(fxscale.sqnr_db(ref, fused(x).float()) - fxscale.sqnr_db(ref, unfused(x).float())) < 1.0

"""The CUDA kernels of fxscale against the CPU reference ops (skipped without CUDA).

Error thresholds (stated per check): outputs in bf16/fp32 within 1e-2 relative (Frobenius)
of the reference -- fp8 products are exact, fast accumulation and bf16 rounding cost ~1e-3;
fp8 outputs within one fp8 ulp elementwise (|a - b| <= 2**-3 * max(|a|, |b|)), plus an
absolute 2**-8 * max |ref| for the tensor cores' fast accumulation (it matters only where a
sum nearly cancels), plus the smallest subnormal times the scale: a float32 result that differs
in the last bits can round to the neighbouring fp8 value. Every check draws fresh random data.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxscale  # registers the ops and, on CUDA, the kernels
from fxscale.formats import get_format

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
ACTS = ["none", "relu", "gelu", "gelu_tanh", "silu"]


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Tests pin each candidate family; autotuning would hide all but the winner."""
    monkeypatch.setenv("FXSCALE_AUTOTUNE", "0")
    yield
    from fxscale.kernels import cuda

    cuda.force(None)


def _cuda():
    from fxscale.kernels import cuda

    return cuda


def _operands(M, K, N, *, fmt="float8_e4m3fn", lead=(), seed=None, device="cuda"):
    f = get_format(fmt)
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(1 << 30, ())))
    x = torch.randn(*lead, M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) * 0.1
    xs = torch.tensor(f.scale_for(float(x.abs().max())))
    ws = torch.tensor(f.scale_for(float(w.abs().max())))
    xq, wq = f.cast(x / xs), f.cast(w / ws)
    return [t.to(device) for t in (xq, xs, wq, ws, b)]


def _ref_linear(xq, xs, wq, ws, b, act, out_scale, out_fmt, out_dtype):
    cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in (xq, xs, wq, ws, b, out_scale)]
    return torch.ops.fxscale.scaled_linear(*cpu[:5], act, cpu[5], out_fmt, out_dtype)


def _rel(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _assert_fp8_close(out, ref, scale, fmt, aggregate=True):
    """Within one fp8 ulp elementwise (see the module docstring); NaN exactly where ref is NaN.
    ``aggregate``: also few such differences overall (meaningless where rows repeat)."""
    f = get_format(fmt)
    a = out.cpu().float() * float(scale)
    r = ref.cpu().float() * float(scale)
    assert torch.equal(torch.isnan(a), torch.isnan(r))
    fin = ~torch.isnan(r)
    a, r = a[fin], r[fin]
    tol = (2.0 ** -f.mantissa_bits * torch.maximum(a.abs(), r.abs()) + f.smallest_subnormal * float(scale)
           + 2.0**-8 * r.abs().max())
    bad = (a - r).abs() > tol
    assert not bool(bad.any()), f"{int(bad.sum())} of {a.numel()} elements beyond one ulp"
    # a few elements a rounding apart: e4m3 0.03 overall, twice that for e5m2's coarser grid
    if aggregate:
        assert _rel(a, r) < 0.03 * 2.0 ** (3 - f.mantissa_bits)


def _check(out, ref, out_scale, out_fmt, aggregate=True):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out_fmt is not None:
        _assert_fp8_close(out, ref, out_scale, out_fmt, aggregate)
    else:
        assert _rel(out, ref) < 1e-2


def _out_scale(xq, xs, wq, ws, b, act, fmt):
    """A sound static output scale: Cauchy-Schwarz on the operands as quantised."""
    f = get_format(fmt)
    xn = (xq.float() * xs).norm(dim=-1).max()
    wn = (wq.float() * ws).norm(dim=-1).max()
    return torch.tensor(f.scale_for(float(xn * wn + b.abs().max())), device=xq.device)


FAMILIES = ["cublas", "triton", "auto"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("out", ["bfloat16", "float8_e4m3fn"])
def test_scaled_linear__matches_reference__activations(family, act, out):
    cuda = _cuda()
    cuda.force(None if family == "auto" else family)
    xq, xs, wq, ws, b = _operands(256, 512, 384)
    out_fmt = out if out.startswith("float8") else None
    os_ = _out_scale(xq, xs, wq, ws, b, act, out) if out_fmt else None
    got = torch.ops.fxscale.scaled_linear(xq, xs, wq, ws, b, act, os_, out_fmt, torch.bfloat16)
    ref = _ref_linear(xq, xs, wq, ws, b, act, os_, out_fmt, torch.bfloat16)
    _check(got, ref, os_, out_fmt)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("out", ["float32", "float8_e5m2", "bfloat16-nobias"])
def test_scaled_linear__matches_reference__outputs(family, out):
    cuda = _cuda()
    cuda.force(None if family == "auto" else family)
    xq, xs, wq, ws, b = _operands(128, 256, 256)
    if out == "bfloat16-nobias":
        b = None
    bb = b if b is not None else torch.zeros(1, device="cuda")
    out_fmt = "float8_e5m2" if out == "float8_e5m2" else None
    odt = torch.float32 if out == "float32" else torch.bfloat16
    os_ = _out_scale(xq, xs, wq, ws, bb, "relu", out_fmt) if out_fmt else None
    got = torch.ops.fxscale.scaled_linear(xq, xs, wq, ws, b, "relu", os_, out_fmt, odt)
    ref = _ref_linear(xq, xs, wq, ws, b, "relu", os_, out_fmt, odt)
    _check(got, ref, os_, out_fmt)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", [(16, 4096, 1024), (1, 512, 256), (300, 640, 272), (3, 40, 64, 128)])
def test_scaled_linear__matches_reference__shapes(family, shape):
    cuda = _cuda()
    cuda.force(None if family == "auto" else family)
    lead = shape[:-3]
    M, K, N = shape[-3:]
    xq, xs, wq, ws, b = _operands(M, K, N, lead=lead)
    os_ = _out_scale(xq, xs, wq, ws, b, "relu", "e4m3")
    got = torch.ops.fxscale.scaled_linear(xq, xs, wq, ws, b, "relu", os_, "float8_e4m3fn", torch.bfloat16)
    ref = _ref_linear(xq, xs, wq, ws, b, "relu", os_, "float8_e4m3fn", torch.bfloat16)
    _check(got, ref, os_, "float8_e4m3fn")
    got = torch.ops.fxscale.scaled_linear(xq, xs, wq, ws, b, "none", None, None, torch.bfloat16)
    _check(got, _ref_linear(xq, xs, wq, ws, b, "none", None, None, torch.bfloat16), None, None)


def test_scaled_linear__unaligned_dims__warns_and_matches():
    xq, xs, wq, ws, b = _operands(33, 40, 24)
    os_ = _out_scale(xq, xs, wq, ws, b, "relu", "e4m3")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = torch.ops.fxscale.scaled_linear(xq, xs, wq, ws, b, "relu", os_, "float8_e4m3fn", torch.bfloat16)
    assert any("multiple of 16" in str(r.message) for r in rec)
    _check(got, _ref_linear(xq, xs, wq, ws, b, "relu", os_, "float8_e4m3fn", torch.bfloat16), os_,
           "float8_e4m3fn")


def test_triton_linear__every_tiling__matches_reference():
    cuda = _cuda()
    tk = cuda._tk
    if tk is None:
        pytest.skip("triton not available")
    for M, pool in [(300, tk.CONFIGS_LARGE + tk.CONFIGS_GENERIC + tk.small_configs(64)),
                    (16, tk.small_configs(16))]:
        xq, xs, wq, ws, b = _operands(M, 1024, 512)
        os_ = _out_scale(xq, xs, wq, ws, b, "relu", "e4m3")
        ref = _ref_linear(xq, xs, wq, ws, b, "relu", os_, "float8_e4m3fn", torch.bfloat16)
        refb = _ref_linear(xq, xs, wq, ws, b, "gelu", None, None, torch.bfloat16)
        for cfg in pool:
            got = tk.linear(xq, xs, wq, ws, b, "relu", os_, E4M3, cfg)
            _check(got, ref, os_, "float8_e4m3fn")
            _check(tk.linear(xq, xs, wq, ws, b, "gelu", None, torch.bfloat16, cfg), refb, None, None)


@pytest.mark.parametrize("family", ["triton", "intmm", "auto"])
def test_scaled_linear__int8__matches_reference(family):
    cuda = _cuda()
    cuda.force(None if family == "auto" else family)
    xq, xs, wq, ws, b = _operands(64, 256, 128, fmt="int8")
    got = torch.ops.fxscale.scaled_linear(xq, xs, wq, ws, b, "gelu", None, None, torch.float32)
    ref = _ref_linear(xq, xs, wq, ws, b, "gelu", None, None, torch.float32)
    _check(got, ref, None, None)


@pytest.mark.parametrize("family", ["triton", "auto"])
@pytest.mark.parametrize("M", [16, 200])
@pytest.mark.parametrize(("act", "fmt"), [("none", "float8_e4m3fn"), ("relu", "float8_e4m3fn"),
                                          ("gelu", "float8_e4m3fn"), ("relu", "float8_e5m2"),
                                          ("relu", "float8_e4m3fn:exact")])
def test_scaled_linear_requantise__matches_reference(family, M, act, fmt):
    cuda = _cuda()
    cuda.force(None if family == "auto" else family)
    f = get_format(fmt)
    xq, xs, wq, ws, b = _operands(M, 512, 256)
    data, scale, st = torch.ops.fxscale.scaled_linear_requantise(xq, xs, wq, ws, b, act, fmt)
    cpu = [t.cpu() for t in (xq, xs, wq, ws, b)]
    rd, rs, rst = torch.ops.fxscale.scaled_linear_requantise(*cpu, act, fmt)
    assert data.dtype == f.dtype and scale.shape == () and st.shape == (2,)
    assert _rel(st, rst) < 1e-2
    # amax / scale <= max: exactly for powers of two; an exact scale is amax / max rounded to
    # float32, up to one float32 ulp small -- far inside the fp8 rounding interval of max.
    assert float(st[0]) / float(scale) <= f.max * (1 if f.pow2 else 1 + 2**-23)
    if f.pow2:  # the power of two that fits amax: equal unless amax sits on a binade edge
        assert float(scale) in (float(rs), 2 * float(rs), 0.5 * float(rs))
    else:  # amax / max: as close as the two amaxes (accumulation order)
        assert abs(float(scale) / float(rs) - 1) < 1e-2
    if float(scale) == float(rs):
        _assert_fp8_close(data, rd, scale, fmt)
    assert _rel(data.float() * scale, rd.float() * rs) < 0.05


def test_scaled_linear_requantise__empty_batch():
    xq, xs, wq, ws, b = _operands(16, 256, 128)
    data, scale, st = torch.ops.fxscale.scaled_linear_requantise(xq[:0], xs, wq, ws, b, "relu", "float8_e4m3fn")
    assert data.shape == (0, 128) and float(scale) == 1.0 and st.tolist() == [0.0, 0.0]


def test_scaled_linear_requantise__nan_propagates():
    xq, xs, wq, ws, b = _operands(64, 256, 128)
    xq[3, 5] = float("nan")
    data, _, st = torch.ops.fxscale.scaled_linear_requantise(xq, xs, wq, ws, b, "relu", "float8_e4m3fn")
    assert bool(torch.isnan(st).all())
    assert bool(torch.isnan(data[3].float()).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_scaled_linear__adversarial_at_declared_bound__no_overflow(family):
    """Inputs at their declared bound, aligned with the weight row of largest norm: the
    output reaches its Cauchy-Schwarz bound exactly, and still fits the format, unclamped."""
    cuda = _cuda()
    cuda.force(None if family == "auto" else family)
    f = get_format("e4m3")
    M, K, N = 64, 512, 256
    bound = 3.0  # declared max |x|
    xs = torch.tensor(f.scale_for(bound), device="cuda")
    w = torch.randn(N, K, device="cuda") / K**0.5
    ws = torch.tensor(f.scale_for(float(w.abs().max())), device="cuda")
    wq = f.cast(w / ws)
    wdq = wq.float() * ws
    j = int(wdq.norm(dim=1).argmax())
    # x_i = bound * sign(w_j): |x| == bound everywhere, x . w_j == bound * ||w_j||_1
    xq = f.cast(bound * torch.sign(wdq[j]).expand(M, K) / xs)
    b = torch.full((N,), 0.25, device="cuda")
    hb = bound * K**0.5 * float(wdq.norm(dim=1).max()) + 0.25
    os_ = torch.tensor(f.scale_for(hb), device="cuda")
    for act in ("none", "relu"):
        got = torch.ops.fxscale.scaled_linear(xq, xs, wq, ws, b, act, os_, f.name, torch.bfloat16)
        ref = _ref_linear(xq, xs, wq, ws, b, act, os_, f.name, torch.bfloat16)
        y = got.float()
        assert bool(torch.isfinite(y).all())
        assert float(y.abs().max()) < f.max  # not saturated: the scale is sound
        # every row is the same here, so one element a rounding apart counts M times: the
        # elementwise one-ulp check is the criterion (seen: cuBLAS, 5% aggregate, H100)
        _check(got, ref, os_, f.name, aggregate=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_scaled_linear__too_small_scale__saturates_and_nan_stays_nan(family):
    cuda = _cuda()
    cuda.force(None if family == "auto" else family)
    xq, xs, wq, ws, b = _operands(32, 256, 128)
    xq[1, 0] = float("nan")
    tiny = torch.tensor(2.0**-20, device="cuda")
    got = torch.ops.fxscale.scaled_linear(xq, xs, wq, ws, b, "none", tiny, "float8_e4m3fn", torch.bfloat16)
    y = got.float().cpu()
    assert bool(torch.isnan(y[1]).all())
    rest = torch.cat([y[:1], y[2:]])
    assert not bool(torch.isnan(rest).any())
    assert float(rest.abs().max()) == 448.0
    ref = _ref_linear(xq, xs, wq, ws, b, "none", tiny, "float8_e4m3fn", torch.bfloat16).float()
    # Elements within ~1e-3 of zero may round either way (accumulation order; cuBLAS folds the
    # output scale into a bf16 bias): compare the rest, which must saturate with the right sign.
    y_hp = _ref_linear(xq, xs, wq, ws, b, "none", None, None, torch.float32).float()
    sat = (ref.abs() == 448.0) & (y_hp.abs() > 1e-2)
    assert float(sat.float().mean()) > 0.9
    assert torch.equal(y[sat], ref[sat])


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_relu_fp8__exact_for_every_byte(dtype):
    te = _cuda()._te
    if te is None:
        pytest.skip("triton not available")
    d = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).repeat(40).cuda()
    ref = torch.relu(d.cpu().float())
    got = te.relu_fp8(d.clone()).cpu().float()
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert torch.equal(got[fin], ref[fin])


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fn:exact"])
def test_requant_cast__scale_stats_and_data_match_format(fmt):
    te = _cuda()._te
    if te is None:
        pytest.skip("triton not available")
    f = get_format(fmt)
    y = (torch.randn(1000, 77) * 100).to(torch.bfloat16).float()
    amax = y.abs().max()
    buf = torch.cat([amax.reshape(1), y.pow(2).sum(dim=1)]).cuda()
    data, scale, st = te.requant_cast(y.to(torch.bfloat16).cuda(), buf, f)
    ref_scale = f.scale_tensor(amax)
    assert float(scale) == float(ref_scale)
    assert float(st[0]) == float(amax)
    assert abs(float(st[1]) / float(y.norm(dim=1).max()) - 1) < 1e-5
    _assert_fp8_close(data, f.cast(y / ref_scale), scale, fmt)


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2", "float8_e4m3fn:exact", "float8_e5m2:exact"])
def test_requant_cast__scale_choice_at_the_edges(fmt):
    """Zero, NaN, Inf, exact powers of two, one ulp above, subnormal and huge amax: the scale the
    kernel picks from the bits equals ``Format.scale_tensor`` exactly."""
    te = _cuda()._te
    if te is None:
        pytest.skip("triton not available")
    f = get_format(fmt)
    edges = [0.0, 1.0, f.max, f.max * 2**-3, f.max * (1 + 2**-20), 3.7, 1e-30, 1e-45, 2**-140, 1e30, 3e38,
             float("inf"), float("nan")]
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(100, generator=g) * torch.exp2(torch.randint(-60, 60, (100,), generator=g).float())
    for a in torch.tensor(edges + rand.tolist(), dtype=torch.float32):
        buf = torch.tensor([float(a), 4.0, 9.0]).cuda()
        _, scale, st = te.requant_cast(torch.zeros(2, 3, dtype=torch.bfloat16, device="cuda"), buf, f)
        ref = f.scale_tensor(a)
        assert torch.equal(scale.cpu(), ref) or (bool(ref.isnan()) and bool(scale.isnan())), float(a)
        if bool(a.isnan()):
            assert bool(st.isnan().all())
        else:
            assert st.tolist() == [float(a), 3.0]


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int8"])
def test_scaled_matmul__batched__matches_reference(dtype):
    f = get_format(dtype)
    a = torch.randn(2, 3, 64, 96)
    b = torch.randn(3, 96, 80)
    sa, sb = torch.tensor(f.scale_for(float(a.abs().max()))), torch.tensor(f.scale_for(float(b.abs().max())))
    aq, bq = f.cast(a / sa), f.cast(b / sb)
    ref = torch.ops.fxscale.scaled_matmul(aq, sa, bq, sb, torch.bfloat16)
    got = torch.ops.fxscale.scaled_matmul(aq.cuda(), sa.cuda(), bq.cuda(), sb.cuda(), torch.bfloat16)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert _rel(got, ref) < 1e-2


def test_scaled_linear__cuda_graph_capture_and_replay():
    """After warm-up nothing syncs with the host: the op records into a CUDA graph."""
    xq, xs, wq, ws, b = _operands(16, 1024, 512)
    _, _, w2, w2s, b2 = _operands(16, 512, 256)
    os_ = _out_scale(xq, xs, wq, ws, b, "relu", "e4m3")

    def chain(x):
        h = torch.ops.fxscale.scaled_linear(x, xs, wq, ws, b, "relu", os_, "float8_e4m3fn", torch.bfloat16)
        return torch.ops.fxscale.scaled_linear(h, os_, w2, w2s, b2, "none", None, None, torch.bfloat16)

    static = xq.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            chain(static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain(static)
    fresh, *_ = _operands(16, 1024, 512)
    static.copy_(fresh)
    g.replay()
    torch.cuda.synchronize()
    assert _rel(out, chain(fresh)) < 1e-6


def _measured_relu_layer(x, f, wq, ws, b, os_):
    """x measured on the device, quantised with that scale, through a ReLU layer into ``f``."""
    st = torch.ops.fxscale.stats(x)
    s = f.scale_tensor(st[0])
    q = torch.ops.fxscale.quantise(x, s, f.name)
    return torch.ops.fxscale.scaled_linear(q, s, wq, ws, b, "relu", os_, f.name, torch.bfloat16)


def _chain_operands(M, K, N):
    """e4m3 operands of a two-layer chain: x, a weight / scale / bias, the ReLU layer's out scale."""
    xq, xs, wq, ws, b = _operands(M, K, N)
    return xq.float() * xs, wq, ws, b, _out_scale(xq, xs, wq, ws, b, "relu", "e4m3")


def test_compiled_chain__matches_eager():
    """torch.compile sees the ops through their fake impls and calls the CUDA kernels."""
    f = get_format("e4m3")
    x, wq, ws, b, os_ = _chain_operands(64, 256, 256)

    def chain(x):
        h = _measured_relu_layer(x, f, wq, ws, b, os_)
        return torch.ops.fxscale.scaled_linear(h, os_, wq, ws, b, "none", None, None, torch.float32)

    assert _rel(torch.compile(chain)(x), chain(x)) < 1e-2


@pytest.mark.parametrize("lowering", [True, False])
def test_compiled_chain__large_m__inductor_lowering_matches_eager(lowering):
    """M > 64: torch.compile lowers scaled_linear to torch._scaled_mm (or, switched off, keeps
    the custom op); either way the result is the eager op's."""
    from fxscale.kernels import lowering as lowering_mod

    f = get_format("e4m3")
    x, wq, ws, b, os_ = _chain_operands(256, 512, 512)

    def chain(x):
        h = _measured_relu_layer(x, f, wq, ws, b, os_)
        return h, torch.ops.fxscale.scaled_linear(h, os_, wq, ws, b, "none", None, None, torch.bfloat16)

    lowering_mod.set_inductor_lowering(lowering)
    try:
        torch._dynamo.reset()
        hc, yc = torch.compile(chain)(x)
    finally:
        lowering_mod.set_inductor_lowering(True)
        torch._dynamo.reset()
    he, ye = chain(x)
    _assert_fp8_close(hc, he, os_, f.name)
    assert _rel(yc, ye) < 1e-2


def _bf16_ffn_256():
    """A 256 -> 1024 -> 256 ReLU FFN in bf16 on the GPU and an input of M=256 rows."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    return model.cuda().to(torch.bfloat16).eval(), x


def _compiled_with_code(fn, x, **inductor_config):
    """``fn(x)`` compiled afresh (compile caches off, under no_grad) and inductor's generated code."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, **inductor_config), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            y, code = run_and_get_code(fn, x)
    finally:
        torch._dynamo.reset()
    return y, "\n".join(code)


@pytest.mark.parametrize("relu_cublas_max_m", [None, 1024])
@pytest.mark.parametrize("freezing", [False, True])
def test_compiled_transform__relu_gemm__no_custom_op_call_frozen_or_not(relu_cublas_max_m, freezing):
    """A transformed FFN at M=256 compiles with no custom-op call, frozen or not: the ReLU GEMM is
    the autotuner's choice launched from inductor's code (a triton_op kernel or ``_scaled_mm``),
    or, with the switch at 1024, ``_scaled_mm`` + a ReLU pass. The result is the uncompiled
    module's (1e-2 relative)."""
    from fxscale.kernels import lowering

    model, x = _bf16_ffn_256()
    t = fxscale.transform(model, (x,), input_bounds=8.0, on_overflow="clamp")
    lowering.set_inductor_lowering(True, relu_cublas_max_m=relu_cublas_max_m)
    try:
        y, code = _compiled_with_code(torch.compile(t), x, freezing=freezing)
    finally:
        lowering.set_inductor_lowering(True)
    assert "fxscale_kernels.scaled_linear" not in code
    assert code.count("_scaled_mm(") >= (2 if relu_cublas_max_m else 1)
    with torch.no_grad():
        assert _rel(y, t(x)) < 1e-2


def test_compiled_backend__cuda_ffn__inductor_with_freezing_lowers_every_gemm():
    """torch.compile(model, backend="fxscale") on the GPU: the transformed region goes through
    inductor with freezing, so at M=256 both GEMMs become torch._scaled_mm calls in the
    compiled code (no custom-op dispatch), and the result is the transformed module's
    (1e-2 relative)."""
    model, x = _bf16_ffn_256()
    y, code = _compiled_with_code(torch.compile(model, backend="fxscale", options={"strict": True}), x)
    assert "fxscale_kernels.scaled_linear" not in code and code.count("_scaled_mm(") >= 2
    with torch.no_grad():
        assert _rel(y, fxscale.transform(model, (x,))(x)) < 1e-2

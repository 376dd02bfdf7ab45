"""fxscale's fused GEMM as a triton_op, its inductor lowering (symbolic M) and the AOTInductor
package, on the GPU (skipped without CUDA).

Thresholds as in test_kernels_gpu.py: plain outputs within 1e-2 relative (Frobenius) of the CPU
reference, fp8 outputs within one fp8 step elementwise (plus fast-accumulation slack); compiled
and packaged modules within 1e-2 relative of the uncompiled transformed module.
"""

from __future__ import annotations

import pytest
import torch

import fxscale

from .test_kernels_gpu import _check, _compiled_with_code, _operands, _out_scale, _ref_linear, _rel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def _pinned_triton(monkeypatch):
    """Autotuning off, the Triton family pinned: the lowering then always takes the triton_op."""
    from fxscale.kernels import cuda

    monkeypatch.setenv("FXSCALE_AUTOTUNE", "0")
    cuda.force("triton")
    yield
    cuda.force(None)


def _tilings():
    from fxscale.kernels import triton_fp8 as tk

    return [tk.CONFIGS_LARGE[0], tk.CONFIGS_LARGE[1], tk.CONFIGS_LARGE[4], tk.CONFIGS_GENERIC[0],
            tk.small_configs(16)[0], tk.small_configs(16)[5]]


@pytest.mark.parametrize("i", range(6))
@pytest.mark.parametrize(("act", "out"), [("relu", "float8_e4m3fn"), ("gelu_tanh", "float8_e4m3fn"),
                                          ("none", "bfloat16"), ("silu", "float32")])
def test_linear_triton__every_tiling__matches_reference(i, act, out):
    """Each tiling of the triton_op, called eagerly (device TMA descriptors included), computes the
    op's contract on fresh data; M=300 is not a multiple of any tile."""
    from fxscale.kernels import triton_ops

    cfg = _tilings()[i]
    xq, xs, wq, ws, b = _operands(300, 512, 384)
    fmt = out if out.startswith("float8") else None
    dt = getattr(torch, out)
    os_ = _out_scale(xq, xs, wq, ws, b, act, fmt) if fmt else None
    y = torch.ops.fxscale_kernels.linear_triton(xq, xs, wq, ws, b, None, os_, act, dt,
                                                triton_ops.tiling_args(cfg))
    ref = _ref_linear(xq, xs, wq, ws, b, act, os_, fmt, dt)
    _check(y, ref, os_, fmt)


def test_linear_triton__residual__matches_reference():
    from fxscale.kernels import triton_fp8 as tk
    from fxscale.kernels import triton_ops

    xq, xs, wq, ws, b = _operands(200, 256, 256)
    r = torch.randn(200, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.ops.fxscale_kernels.linear_triton(xq, xs, wq, ws, b, r, None, "none", torch.bfloat16,
                                                triton_ops.tiling_args(tk.CONFIGS_LARGE[0]))
    ref = _ref_linear(xq, xs, wq, ws, b, "none", None, None, torch.float32) + r.float().cpu()
    assert _rel(y.float().cpu(), ref) < 1e-2


def test_linear_triton__traced__only_the_output_is_written():
    """Inductor's mutation analysis of the kernels sees that only the output is written, so it
    clones no input (a failed analysis would copy the weight on every call)."""
    from functorch.compile import aot_function

    from fxscale.kernels import triton_ops

    graphs = []

    def grab(gm, _):
        graphs.append(gm)
        return gm

    for cfg in _tilings():
        xq, xs, wq, ws, b = _operands(100, 256, 256)
        tiling = triton_ops.tiling_args(cfg)
        f = aot_function(lambda x, xs, w, ws, b, tiling=tiling: torch.ops.fxscale_kernels.linear_triton(
            x, xs, w, ws, b, None, None, "relu", torch.bfloat16, tiling), fw_compiler=grab)
        f(xq, xs, wq, ws, b)
    for gm in graphs:
        hops = [n for n in gm.graph.nodes if "triton_kernel_wrapper_functional" in str(n.target)]
        assert hops
        for n in hops:
            assert set(n.kwargs["tensors_to_clone"]) <= {"c_ptr", "part_ptr"}, n.kwargs["tensors_to_clone"]


def _ffn(d=256, h=1024):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, d))
    return model.cuda().to(torch.bfloat16).eval()


@pytest.mark.parametrize("bounds", [None, 8.0])
def test_compiled_transform__default__fused_gemm_launched_by_inductor(bounds):
    """The plain ``torch.compile(fxscale.transform(m))``: the ReLU GEMM's Triton kernel is launched
    from inductor's code (no custom-op call left), the other GEMM is ``_scaled_mm``; same result
    as the uncompiled module."""
    model = _ffn()
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    kw = {} if bounds is None else {"input_bounds": bounds, "on_overflow": "clamp"}
    sm = fxscale.transform(model, (x,), **kw)
    y, code = _compiled_with_code(torch.compile(sm), x)
    assert "fxscale_kernels.scaled_linear" not in code and "fxscale.scaled_linear" not in code
    assert "_linear_tma_dev_kernel" in code or "_linear_ptr_kernel" in code
    with torch.no_grad():
        assert _rel(y, sm(x)) < 1e-2


def test_compiled_transform__symbolic_batch__guards_on_the_tiling_family():
    """``dynamic=True``: one compiled graph serves every M of a tiling family (M > 64 here), a
    decode batch (M <= 16) recompiles with its own tiling; every result matches eager."""
    model = _ffn()
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    sm = fxscale.transform(model, (x,))
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["stats"]
    c = torch.compile(sm, dynamic=True)
    with torch.no_grad():
        for m in (256, 100, 333):
            xm = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
            assert _rel(c(xm), sm(xm)) < 1e-2
        after_large = frames["unique_graphs"]
        for m in (8, 13):
            xm = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
            assert _rel(c(xm), sm(xm)) < 1e-2
    assert frames["unique_graphs"] - after_large >= 1  # the decode family compiled anew
    torch._dynamo.reset()


@pytest.mark.parametrize("bounds", [None, 8.0])
def test_aoti_package__dynamic_batch__round_trip_matches(bounds, tmp_path):
    """``fxscale.save`` -> ``fxscale.load``: the package runs batches other than the example's and
    matches the transformed module; the fused GEMM is in it as a kernel, no fxscale op is a
    Python call."""
    model = _ffn()
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    kw = {} if bounds is None else {"input_bounds": bounds, "on_overflow": "clamp"}
    sm = fxscale.transform(model, (x,), **kw)
    path = fxscale.save(sm, (x,), tmp_path / "ffn.pt2",
                        inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"})
    assert fxscale.deploy.package_custom_ops(path) == []
    run = fxscale.load(path)
    with torch.no_grad():
        for m in (256, 100, 512):
            xm = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
            assert _rel(run(xm), sm(xm)) < 1e-2


def test_compiled_transform__freezing_flag_still_works():
    """Inductor's freezing (no longer needed for speed) still compiles and matches."""
    model = _ffn()
    x = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    sm = fxscale.transform(model, (x,), input_bounds=8.0, on_overflow="clamp")
    y, code = _compiled_with_code(torch.compile(sm), x, freezing=True)
    assert "fxscale_kernels.scaled_linear" not in code
    with torch.no_grad():
        assert _rel(y, sm(x)) < 1e-2


def test_compiled_int8__stays_correct():
    """int8 operands through the lowering (the Triton int8 kernel: fp32 out, bf16 here)."""
    xq, xs, wq, ws, b = _operands(128, 256, 256, fmt="int8")

    def fn(x):
        return torch.ops.fxscale.scaled_linear(x, xs, wq, ws, b, "relu", None, None, torch.bfloat16)

    y, _ = _compiled_with_code(torch.compile(fn), xq)
    _check(y, _ref_linear(xq, xs, wq, ws, b, "relu", None, None, torch.bfloat16), None, None)

"""``fxscale::gated_requantise``: a gated MLP's ``act(gate) * up`` requantised in one op.

References are written from the op's definition in float64 (``h = act(gate) * up`` rounded to
the inputs' dtype as eager rounds it; ``s`` the power of two that fits ``max |h|``; data
``cast(h / s)``). Thresholds: the data dequantises to within half an e4m3 step of ``h``
(relative 2^-4, or 2^-10 s among the subnormals); the stats match float64 to 1e-6 relative.

* CPU, always: the reference op, adversarial inputs (spikes, aligned signs, NaN / Inf), and the
  fusion on a tiny Llama: the transformed graph has the op and its logits are bit-identical to
  the unfused graph's;
* ``TRITON_INTERPRET=1`` with triton importable: the two Triton passes on CPU tensors (float32
  inputs: the interpreter's casts to bf16 / fp8 are wrong, so there the stats and scale are
  checked exactly and the data only to the right element within a binade);
* CUDA: the triton_op against the reference bit for bit, eager and under torch.compile.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import fxscale
from passes import fusions

OP = torch.ops.fxscale.gated_requantise.default
ACT = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": torch.relu}
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


def _h(g, u, act):
    """h as eager computes it (each op rounded to the inputs' dtype), in float64."""
    return (ACT[act](g) * u).double()


def _check(g, u, act, data, scale, st, *, step: float | None = 2.0**-4):
    h = _h(g, u, act)
    fin = torch.isfinite(h)
    a = torch.where(fin, h.abs(), 0.0)
    amax, rn = a.max(), a.norm(dim=-1).max()
    assert abs(float(st[0]) - float(amax)) <= 1e-6 * float(amax)
    assert abs(float(st[1]) - float(rn)) <= 1e-6 * float(rn)
    s = float(scale)
    assert s >= float(amax) / 448 and (amax == 0 or s < 2 * float(amax) / 448 or s == 2.0**-126)  # fits, tightly
    got = data.double() * s
    assert bool((torch.isfinite(got) == fin).all()), "non-finite values must stay non-finite, finite ones finite"
    if step is None:  # the interpreter's fp32 -> fp8 cast is off by up to a binade: the right element only
        big = fin & (h.abs() >= 2.0**-5 * s)
        ratio = got[big] / h[big]
        assert bool(((ratio > 0.45) & (ratio < 1.1)).all())
        return
    err = (got - h).abs()[fin]
    assert bool((err <= step * (h.abs()[fin] + 2.0**-6 * s)).all())  # subnormals: absolute steps


@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference__matches_the_float64_definition(act, dtype):
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(3, 5, 96, generator=g) * 3).to(dtype), torch.randn(3, 5, 96, generator=g).to(dtype)
    data, scale, st = OP(gate, up, act, "e4m3")
    assert data.shape == gate.shape and data.dtype == torch.float8_e4m3fn
    _check(gate, up, act, data, scale, st)


def test_reference__adversarial_inputs_never_saturate_a_finite_value():
    """A spike far above the rest, aligned signs, NaN / Inf and a zero row: the scale comes from
    the finite amax, so no finite value clamps at 448 and no row turns NaN."""
    gate = torch.full((4, 64), 2.0)
    up = torch.full((4, 64), 3.0)
    gate[0, 5], up[0, 5] = 60.0, 1e4  # spike: 6e5
    up[1, 7], up[2, 9], gate[3] = float("nan"), float("inf"), 0.0
    data, scale, st = OP(gate, up, "silu", "e4m3")
    _check(gate, up, "silu", data, scale, st)
    assert 0 < float(data[0, 5].float()) < 448  # the spike sets the scale and fits under it
    assert bool(torch.isnan(data[1, 7].float())) and bool(torch.isnan(data[2, 9].float()))  # e4m3fn: Inf -> NaN
    assert bool((data[3].float() == 0).all())


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), torch.randint(0, 256, (2, 16))


def test_fusion__llama_mlp_becomes_one_gated_requantise_and_its_logits_do_not_change(monkeypatch):
    lm, ids = _tiny_llama()
    sm = fxscale.transform(lm, (ids,), threshold=1.0)  # the product's wasted bits pass 1: requantised
    gated = [n for n in sm.graph.nodes if n.target is OP]
    assert [n.name for n in gated] == ["mul_15", "mul_24"]
    assert not any(n.target is torch.ops.aten.silu.default for n in sm.graph.nodes)
    assert "one gated requantise" in sm.report.table()
    monkeypatch.setattr(fusions, "EPILOGUE", tuple(f for f in fusions.EPILOGUE if f.name != "gated requantise"))
    unfused = fxscale.transform(lm, (ids,), threshold=1.0)
    assert not any(n.target is OP for n in unfused.graph.nodes)
    with torch.no_grad():
        a, b = sm(ids), unfused(ids)
    a, b = (getattr(t, "logits", t) for t in (a, b))
    a, b = (t[0] if isinstance(t, tuple) else t for t in (a, b))
    assert torch.equal(a, b)


@pytest.mark.skipif(not _INTERPRET, reason="needs triton and TRITON_INTERPRET=1 (the kernels on CPU)")
@pytest.mark.parametrize("shape", [(37, 300), (1, 700), (5, 1, 64)])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_kernels_interpreted__match_the_float64_definition(shape, act):
    from fxscale.kernels import triton_gated as tg

    g = torch.Generator().manual_seed(2)
    gate, up = torch.randn(*shape, generator=g) * 4, torch.randn(*shape, generator=g)
    data, scale, st = tg.gated_requantise(gate, up, act, torch.float8_e4m3fn)
    _check(gate, up, act, data, scale, st, step=None)


@pytest.mark.skipif(not _INTERPRET, reason="needs triton and TRITON_INTERPRET=1 (the kernels on CPU)")
def test_kernels_interpreted__read_strided_halves_of_a_fused_output():
    from fxscale.kernels import triton_gated as tg

    y = torch.randn(6, 2 * 96, generator=torch.Generator().manual_seed(3)) * 2
    gate, up = y[:, :96], y[:, 96:]  # what the sibling-fused gate/up GEMM hands over
    data, scale, st = tg.gated_requantise(gate, up, "silu", torch.float8_e4m3fn)
    _check(gate, up, "silu", data, scale, st, step=None)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 8192])
def test_gpu__triton_op_equals_the_reference(m):
    g = torch.Generator(device="cuda").manual_seed(4)
    y = torch.randn(m, 2 * 1408, device="cuda", generator=g).bfloat16() * 3
    gate, up = y[:, :1408], y[:, 1408:]
    data, scale, st = OP(gate, up, "silu", "e4m3")  # the CUDA kernel: the triton_op
    rd, rs, _ = torch.ops.fxscale.gated_requantise(gate.cpu(), up.cpu(), "silu", "e4m3")
    _check(gate.cpu(), up.cpu(), "silu", data.cpu(), scale.cpu(), st.cpu())
    assert float(scale) == float(rs)
    assert (data.cpu().float() != rd.float()).float().mean() < 1e-3  # silu's formula: an ulp here and there


@gpu
@pytest.mark.gpu
def test_gpu__compiled_equals_eager():
    y = torch.randn(64, 2 * 512, device="cuda").bfloat16()

    def f(y):
        return OP(y[:, :512], y[:, 512:], "silu", "e4m3")

    eager = f(y)
    comp = torch.compile(f)(y)
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(eager, comp))

"""``fxscale_kernels::kv_decode_attention``: decode attention read straight from the float8 cache.

Every result is compared with a float64 reference written from the op's definition (slots,
masks, softmax), independent of both implementations. Error: ``max |got - ref| / max |ref|``;
thresholds: 1e-5 for float32 queries (float32 arithmetic throughout), 2e-2 for bf16 (bf16
inputs, probabilities and output: a few bf16 steps of 2^-8).

* CPU, always: the op's ATen reference (the body off CUDA), and its bounds rule on adversarial V;
* ``TRITON_INTERPRET=1`` with triton importable: the Triton kernels on CPU tensors (float32 dots),
  run locally with ``PYTHONPATH=<triton site> TRITON_INTERPRET=1 pytest tests/test_decode_attention.py``;
* CUDA: the kernels in bf16 at decode shapes, and under ``torch.compile(mode="reduce-overhead")``;
* ``fxscale.llm.wrap`` of a tiny Llama with the op in its step graph (its CPU reference).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import fxscale  # noqa: F401  (registers the ops)
from fxscale.kernels import decode_attention as da
from fxscale.rules import Arg, Bound, evaluate

OP = torch.ops.fxscale_kernels.kv_decode_attention.default
F8 = torch.float8_e4m3fn
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


def _case(b=2, hkv=2, rep=4, s=1, cache=96, d=32, p0=50, window=0, pad=None, dtype=torch.float32, device="cpu",
          k_scale=0.5, v_scale=0.25, seed=0):
    """Random op arguments: float8 cache bytes (finite), new K/V and queries in ``dtype``."""
    g = torch.Generator().manual_seed(seed)

    def fp8(*shape):
        return (torch.randn(*shape, generator=g) * 4).to(F8).view(torch.uint8).to(device)

    def new(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    pad_t = None if pad is None else torch.tensor(pad, device=device)
    return (new(b, hkv, rep * s, d), fp8(b, hkv, cache, d), fp8(b, hkv, cache, d), new(b, hkv, s, d),
            new(b, hkv, s, d), torch.arange(p0, p0 + s, device=device), k_scale, v_scale, pad_t, d**-0.5, window)


def _ref64(q, kc, vc, kn, vn, pos, ks, vs, pad, scaling, window):
    """The op's definition in float64, slot by slot."""
    b, _, r, _ = q.shape
    s, length = kn.shape[2], kc.shape[2]
    p0 = int(pos[0])
    k = kc.view(F8).double() * ks
    v = vc.view(F8).double() * vs
    k[:, :, p0:p0 + s], v[:, :, p0:p0 + s] = kn.double(), vn.double()
    j = torch.arange(length, device=q.device)
    qp = p0 + torch.arange(r, device=q.device) % s  # row r * S + i is at position p0 + i
    seen = j[None] <= qp[:, None]
    if window:
        seen = seen & (j[None] > qp[:, None] - window)
    seen = seen.expand(b, r, length)
    if pad is not None:
        seen = (seen & (j[None, None] >= pad[:, None, None])) | (j[None, None] == qp[None, :, None])
    scores = torch.einsum("bhrd,bhld->bhrl", q.double(), k) * scaling
    scores = scores.masked_fill(~seen[:, None], float("-inf"))
    return torch.softmax(scores, -1) @ v


def _err(got, ref) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max())


# (description, case arguments): GQA rep 1 and 4, S 1 and 3, mid-cache positions, windows, padding.
CASES = [
    ("rep4 S1 mid-cache", {}),
    ("rep1 S1", {"rep": 1}),
    ("rep4 S3", {"s": 3}),
    ("rep1 S3 near the end", {"rep": 1, "s": 3, "p0": 93}),
    ("first step", {"s": 1, "p0": 0}),
    ("window 17", {"s": 3, "window": 17}),
    ("window 1 (own slot only)", {"window": 1}),
    ("pad", {"s": 3, "pad": [0, 20]}),
    ("pad beyond the new slots", {"s": 3, "pad": [7, 52]}),
    ("pad and window", {"s": 3, "pad": [30, 5], "window": 24}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_op_on_cpu__matches_the_float64_definition(kwargs, dtype):
    args = _case(dtype=dtype, **kwargs)
    out = OP(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert _err(out, _ref64(*args)) < TOL[dtype]


def test_op__is_one_node_under_export_and_decomposes_under_compile():
    """torch.export keeps the op (its rule bounds it); torch.compile traces its body."""
    args = _case(s=3)

    class M(torch.nn.Module):
        def forward(self, q, kc, vc, kn, vn, pos):
            return OP(q, kc, vc, kn, vn, pos, *args[6:])

    ep = torch.export.export(M(), args[:6])
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"] == [OP]
    got = torch.compile(M(), fullgraph=True)(*args[:6])
    assert _err(got, _ref64(*args)) < TOL[torch.float32]


def _rule_bound(args) -> Bound:
    q, kc, _, kn, vn = args[:5]
    av = [Arg(Bound(float(t.float().abs().max())).tighten(tuple(t.shape)), tuple(t.shape)) for t in (q, kn, vn)]
    cache = Arg(Bound(float("inf")), tuple(kc.shape))
    call = (av[0], cache, cache, av[1], av[2], Arg(Bound(float("inf")), (kn.shape[2],)), *args[6:8], None,
            *args[9:])
    return evaluate(OP, call, {}, [tuple(q.shape)])[0]


@pytest.mark.parametrize("v_new_scale", [0.5, 1.0, 4.0], ids=["cache-dominated", "equal", "new-dominated"])
def test_rule__bounds_the_output_on_adversarial_values(v_new_scale):
    """Every V cache byte at the format's max (448) with one sign per batch row, v_new at +-max
    with the same sign: the output never exceeds the bound, and where the cache and the new rows
    are equal (a convex mix of equal rows) it reaches it up to the rule's margin."""
    args = list(_case(s=3, pad=[0, 9], window=40))
    vc = torch.full_like(args[2], 0x7E)  # e4m3fn 448
    vc[1] = 0xFE  # -448 in the second row of the batch
    args[2] = vc
    top = 448 * args[7] * v_new_scale
    args[4] = torch.where(torch.arange(2)[:, None, None, None] == 0, top, -top).expand_as(args[4]).clone()
    bound = _rule_bound(args)
    for q_scale in (1.0, 100.0):  # also near-one-hot softmaxes
        out = OP(args[0] * q_scale, *args[1:])
        assert float(out.abs().max()) <= float(bound.absmax)
        assert float(out.norm(dim=-1).max()) <= float(bound.rownorm)
        assert float(out.abs().sum(-1).max()) <= float(bound.rowsum)
    if v_new_scale == 1.0:
        top = 448 * args[7]
        assert abs(float(out.abs().max()) - top) <= 1e-5 * top and top >= float(bound.absmax) / (1 + 2**-6)


# ---------------------------------------------------------------------------- the kernels, interpreted
@pytest.mark.skipif(not _INTERPRET, reason="needs triton and TRITON_INTERPRET=1 (the kernels on CPU)")
@pytest.mark.parametrize("nsplit", [1, 3])
@pytest.mark.parametrize("kwargs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_kernels_interpreted__match_the_float64_definition(kwargs, nsplit):
    args = _case(**kwargs)
    out = da.decode_attention_triton(*args, block_n=16, nsplit=nsplit)
    assert _err(out, _ref64(*args)) < TOL[torch.float32]


@pytest.mark.skipif(not _INTERPRET, reason="needs triton and TRITON_INTERPRET=1 (the kernels on CPU)")
def test_kernels_interpreted__bf16_queries_and_more_splits_than_blocks():
    args = _case(s=3, pad=[4, 0], window=30, dtype=torch.bfloat16, cache=200, p0=150)
    out = da.decode_attention_triton(*args, block_n=16, nsplit=16)
    assert out.dtype == torch.bfloat16
    assert _err(out, _ref64(*args)) < TOL[torch.bfloat16]


# ---------------------------------------------------------------------------- the kernels on the GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available() or not da.HAS_TRITON, reason="needs CUDA and triton")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("cache", [1088, 4160])
@pytest.mark.parametrize("b", [1, 16])
def test_kernels_on_gpu__bf16_decode_shapes_match_the_float64_definition(b, cache):
    for p0, s, window in ((cache - 64, 1, 0), (cache // 3, 1, 0), (cache // 2, 3, 500)):
        args = _case(b=b, hkv=8, rep=4, s=s, cache=cache, d=128, p0=p0, window=window, dtype=torch.bfloat16,
                     device="cuda")
        assert da._kernel_takes(args[0])
        out = OP(*args)
        assert _err(out, _ref64(*args)) < TOL[torch.bfloat16], (p0, s, window)


@gpu
@pytest.mark.gpu
def test_kernels_on_gpu__under_compile_with_cuda_graphs_follow_the_positions():
    """The compiled, graph-replayed op reads p0 on the device: moving positions needs no recompile."""
    args = _case(b=4, hkv=8, rep=4, cache=1088, d=128, p0=700, dtype=torch.bfloat16, device="cuda")
    const = args[6:]

    def f(q, kc, vc, kn, vn, pos):
        return OP(q, kc, vc, kn, vn, pos, *const) * 2

    cf = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    pos = args[5].clone()
    for p0 in (700, 700, 701, 1000, 5):
        pos.fill_(p0)
        out = cf(*args[:5], pos)
        assert _err(out / 2, _ref64(*args[:5], pos, *const)) < TOL[torch.bfloat16], p0


# ---------------------------------------------------------------------------- fxscale.llm
@pytest.mark.slow
@torch.no_grad()
def test_wrap__with_the_op_in_the_step_graph_matches_the_sdpa_path(monkeypatch):
    """A tiny Llama wrapped with the op (its CPU reference): the same K/V scales, prefill and
    decode logits as the kv_read + SDPA step graph, and the same greedy tokens, padded or not."""
    import fxscale.llm
    from fxscale import kv_attention

    from .test_llm import _llama

    lm = _llama()
    plain = fxscale.llm.wrap(lm, max_len=64)
    monkeypatch.setattr(kv_attention, "DECODE_OP_DEVICES", ("cuda", "cpu"))
    flm = fxscale.llm.wrap(lm, max_len=64)
    assert OP in [n.target for n in flm.sm.graph.nodes]
    assert flm.scales == plain.scales
    ids = torch.randint(1, 100, (2, 9))
    got, want = flm(ids[:, :8]).logits, plain(ids[:, :8]).logits  # prefill
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got, want = flm(ids).logits[:, -1], plain(ids).logits[:, -1]  # one decode step
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert fxscale.sqnr_db(lm(ids, use_cache=False).logits[:, -1], got) > 20
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    for m in (None, mask):
        out = flm.generate(ids, attention_mask=m, max_new_tokens=6, do_sample=False, pad_token_id=0)
        ref = plain.generate(ids, attention_mask=m, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref)

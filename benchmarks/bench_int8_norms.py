"""int8 GEMMs, and inductor's LayerNorm / softmax + quantise kernels against the memory roofline.

    PYTHONPATH=. python benchmarks/bench_int8_norms.py [--m 8192 1024 16] [--md out.md]

1. The FFN's two GEMM shapes with int8 operands: ``torch._int_mm`` (+ epilogue in torch) vs
   the Triton int8 kernel (fused epilogue) vs bf16 ``F.linear``: where int8 wins.
2. ``quantise(layer_norm(x))`` and ``quantise(softmax(x))`` (bf16 in, e4m3 out, static scale)
   as torch.compile generates them, against a hand-written Triton kernel for each (one row per
   program, x read once; written here for this A/B, not used by fxscale) and against the copy
   bandwidth measured here (the floor for any kernel). The hand kernels' outputs are checked
   against inductor's: within one e4m3 step elementwise.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fxscale  # noqa: F401  (registers the ops and kernels)
from benchmarks.common import device_line, emit, ffn_shape_args, time_ms
from fxscale.formats import get_format
from fxscale.kernels.triton_fp8 import _to_out


@triton.jit
def _layer_norm_fp8_kernel(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = (xc * rstd * w + b).to(tl.bfloat16).to(tl.float32)  # layer_norm's bf16 result, as eager rounds it
    z = _to_out(y, tl.load(s_ptr), 1, 448.0)
    tl.store(y_ptr + row * D + offs, z.to(tl.float8e4nv), mask=mask)


@triton.jit
def _softmax_fp8_kernel(x_ptr, s_ptr, y_ptr, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=-float("inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    y = (e / tl.sum(e, axis=0)).to(tl.bfloat16).to(tl.float32)
    z = _to_out(y, tl.load(s_ptr), 1, 448.0)
    tl.store(y_ptr + row * D + offs, z.to(tl.float8e4nv), mask=mask)


def hand_layer_norm_fp8(x, w, b, s, eps=1e-5):
    M, D = x.shape
    y = torch.empty(M, D, device=x.device, dtype=torch.float8_e4m3fn)
    _layer_norm_fp8_kernel[(M,)](x, w, b, s, y, D, eps, BLOCK=triton.next_power_of_2(D), num_warps=8)
    return y


def hand_softmax_fp8(x, s):
    M, D = x.shape
    y = torch.empty(M, D, device=x.device, dtype=torch.float8_e4m3fn)
    _softmax_fp8_kernel[(M,)](x, s, y, D, BLOCK=triton.next_power_of_2(D), num_warps=8)
    return y


def e4m3_steps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise difference in units of e4m3's step at the larger magnitude (2^-3
    relative), with the subnormal step 2^-9 as the floor."""
    a, b = a.float(), b.float()
    step = torch.maximum(torch.maximum(a.abs(), b.abs()) * 2.0**-3, torch.full_like(a, 2.0**-9))
    return float(((a - b).abs() / step).max())


def copy_gbs(n_bytes: int = 1 << 30) -> float:
    a = torch.empty(n_bytes // 2, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = time_ms(lambda _: b.copy_(a), [None])
    return 2 * n_bytes / ms / 1e6


def int8_rows(M, d, h, out):
    from fxscale.kernels import cuda

    i8 = get_format("int8")
    op = torch.ops.fxscale.scaled_linear
    g = M <= 64
    for name, (K, N) in {"GEMM1 (d -> 4d)": (d, h), "GEMM2 (4d -> d)": (h, d)}.items():
        w = torch.randn(N, K, device="cuda") / K**0.5
        ws = torch.tensor(i8.scale_for(float(w.abs().max())), device="cuda")
        wq = i8.cast(w / ws)
        b = torch.randn(N, device="cuda") * 0.1
        xs = torch.tensor(i8.scale_for(4.0), device="cuda")
        xq = [i8.cast(torch.randn(M, K, device="cuda").clamp(-4, 4) / xs) for _ in range(3)]
        wb, bb = w.bfloat16(), b.bfloat16()
        xb = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        flops = 2.0 * M * K * N
        t_bf16 = time_ms(lambda x, wb=wb, bb=bb: F.linear(x, wb, bb), xb, graph=g)
        out.append(f"| {M} | {name} | bf16 F.linear | {t_bf16:.4f} | {flops / t_bf16 / 1e9:.0f} | 1.00x |")
        def run(x, wq=wq, ws=ws, b=b, xs=xs):
            return op(x, xs, wq, ws, b, "none", None, None, torch.bfloat16)

        for fam in ("intmm", "triton"):
            if fam == "intmm" and M <= 16:
                out.append(f"| {M} | {name} | int8 intmm | n/a: torch._int_mm needs M > 16 | | |")
                continue
            cuda.force(fam)
            cuda.clear_cache()
            try:
                t = time_ms(run, xq, graph=g)
                out.append(f"| {M} | {name} | int8 {fam} | {t:.4f} | {flops / t / 1e9:.0f} | {t_bf16 / t:.2f}x |")
            except Exception as e:  # noqa: BLE001  (a family that cannot run this shape is a result)
                out.append(f"| {M} | {name} | int8 {fam} | failed: {type(e).__name__} | | |")
            finally:
                cuda.force(None)
        print("\n".join(out[-3:]), flush=True)


def norm_rows(M, d, bw, out):
    f = get_format("e4m3")
    s = torch.tensor(2.0**-5, device="cuda")
    w = 1.0 + 0.1 * torch.randn(d, device="cuda", dtype=torch.bfloat16)
    b = 0.1 * torch.randn(d, device="cuda", dtype=torch.bfloat16)
    xs = [torch.randn(M, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    graph = M <= 64
    cases = {
        "quantise(layer_norm(x))": (
            lambda x: torch.ops.fxscale.quantise(F.layer_norm(x, (d,), w, b), s, f.name),
            lambda x: hand_layer_norm_fp8(x, w, b, s)),
        "quantise(softmax(x))": (
            lambda x: torch.ops.fxscale.quantise(torch.softmax(x, dim=-1), s, f.name),
            lambda x: hand_softmax_fp8(x, s)),
        "layer_norm(x), bf16 out (reference)": (lambda x: F.layer_norm(x, (d,), w, b), None),
    }
    for name, (fn, hand) in cases.items():
        c = torch.compile(fn)
        t = time_ms(c, xs, graph=graph)
        out_bytes = 2 if "bf16 out" in name else 1
        floor = M * d * (2 + out_bytes) / bw / 1e6  # ms at the copy bandwidth
        row = f"| {M} | {name} | {t:.4f} | {100 * floor / t:.0f}% |"
        if hand is None:
            row += " | | |"
        else:
            try:
                steps = e4m3_steps(hand(xs[0]), c(xs[0]))
                th = time_ms(hand, xs, graph=graph)
                row += f" {th:.4f} | {100 * floor / th:.0f}% | {t / th:.2f}x, {steps:.2g} |"
            except Exception as e:  # noqa: BLE001  (a hand kernel that fails is a result)
                row += f" failed: {type(e).__name__}: {str(e)[:80]} | | |"
        out.append(row + f" {floor:.4f} |")
        print(out[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ffn_shape_args(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_gbs()
    out = [f"## int8 GEMMs and fp8-out norms ({device_line()}; copy bandwidth {bw:.0f} GB/s)\n",
           "| M | GEMM | variant | ms | TFLOP/s | vs bf16 |", "|---|---|---|---|---|---|"]
    for M in args.m:
        int8_rows(M, args.d, args.hidden, out)
    head = ("| M | fp8-out kernel | inductor ms | of floor | hand Triton ms | of floor | "
            "inductor / hand, max diff (e4m3 steps) | floor ms |")
    out += ["", head, "|---|---|---|---|---|---|---|---|"]
    for M in args.m:
        norm_rows(M, args.d, bw, out)
    text = "\n".join(out)
    emit(text, args.md)


if __name__ == "__main__":
    main()

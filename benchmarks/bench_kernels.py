"""Per-kernel timings of the FFN's two GEMMs: every candidate the autotuner considers.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--m 8192 1024 16]

GEMM1: x(M, d) @ W0(4d, d).T + b0, ReLU, static scale, e4m3 out (the fused epilogue).
GEMM2: h(M, 4d) @ W1(d, 4d).T + b1, bf16 out. Also bf16 cuBLAS (F.linear) for the same shapes,
cuBLAS fp8 alone (no ReLU), the x quantisation, and the requantise op (amax in the epilogue).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fxscale  # noqa: F401
from benchmarks.common import device_line, emit, ffn_shape_args, time_ms
from fxscale.formats import get_format


def main() -> None:
    ap = argparse.ArgumentParser()
    ffn_shape_args(ap)
    args = ap.parse_args()
    from fxscale.kernels import cuda

    f = get_format("e4m3")
    dev = "cuda"
    d, h = args.d, args.hidden
    out = [f"## Kernels ({device_line()})\n", "| M | op | variant | ms | TFLOP/s or GB/s |", "|---|---|---|---|---|"]
    w0 = torch.randn(h, d, device=dev) / d**0.5
    w1 = torch.randn(d, h, device=dev) / h**0.5
    b0, b1 = torch.randn(h, device=dev) * 0.1, torch.randn(d, device=dev) * 0.1
    w0s = torch.tensor(f.scale_for(float(w0.abs().max())), device=dev)
    w1s = torch.tensor(f.scale_for(float(w1.abs().max())), device=dev)
    w0q, w1q = f.cast(w0 / w0s), f.cast(w1 / w1s)
    w0b, w1b, b0b, b1b = w0.bfloat16(), w1.bfloat16(), b0.bfloat16(), b1.bfloat16()

    def row(M, op, name, ms, flops=None, nbytes=None):
        rate = f"{flops / ms / 1e9:.0f} TFLOP/s" if flops else f"{nbytes / ms / 1e6:.0f} GB/s"
        out.append(f"| {M} | {op} | {name} | {ms:.4f} | {rate} |")
        print(out[-1], flush=True)

    xs = torch.tensor(f.scale_for(8.0), device=dev)  # declared |x| <= 8
    hs = torch.tensor(1.0, device=dev)
    for M in args.m:
        xs_ = [torch.randn(M, d, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        xq = [f.cast(x.float() / xs) for x in xs_]
        hq = [torch.relu(torch.randn(M, h, device=dev)).to(f.dtype) for _ in range(3)]
        f1, f2 = 2.0 * M * d * h, 2.0 * M * d * h
        g = M <= 64
        row(M, "quantise x", "torch.compile(quantise)",
            time_ms(torch.compile(lambda x: torch.ops.fxscale.quantise(x, xs, f.name)), xs_, graph=g),
            nbytes=M * d * 3)
        row(M, "stats+quantise x", "torch.compile",
            time_ms(torch.compile(lambda x: torch.ops.fxscale.quantise(
                x, f.scale_tensor(torch.ops.fxscale.stats(x)[0]), f.name)), xs_, graph=g), nbytes=M * d * 5)
        row(M, "GEMM1", "bf16 F.linear + relu", time_ms(lambda x: torch.relu(F.linear(x, w0b, b0b)), xs_, graph=g),
            f1)
        row(M, "GEMM2", "bf16 F.linear", time_ms(lambda x: F.linear(x, w1b, b1b),
                                                 [torch.randn(M, h, device=dev, dtype=torch.bfloat16)], graph=g), f2)
        row(M, "GEMM1", "cuBLAS fp8 out, no relu", time_ms(lambda x: torch._scaled_mm(
            x, w0q.t(), xs, w0s, bias=b0b, scale_result=hs, out_dtype=f.dtype, use_fast_accum=True), xq, graph=g), f1)
        cuda.clear_cache()
        for _ in range(2):
            torch.ops.fxscale.scaled_linear(xq[0], xs, w0q, w0s, b0, "relu", hs, f.name, torch.bfloat16)
            torch.ops.fxscale.scaled_linear(hq[0], hs, w1q, w1s, b1, "none", None, None, torch.bfloat16)
            torch.ops.fxscale.scaled_linear_requantise(xq[0], xs, w0q, w0s, b0, "relu", f.name)
        for key, c in cuda.choices().items():
            op = {("linear", "relu"): "GEMM1 relu e4m3", ("linear", "none"): "GEMM2 bf16",
                  ("requant", "relu"): "GEMM1 requantise"}[(key[0], key[8])]
            fl = f1 if op.startswith("GEMM1") else f2
            for name, ms in c.timings:
                if ms is not None:
                    row(M, op, name + (" **chosen**" if name == c.label else ""), ms, fl)
                else:
                    out.append(f"| {M} | {op} | {name} | failed | |")
        g1 = lambda x: torch.ops.fxscale.scaled_linear(x, xs, w0q, w0s, b0, "relu", hs, f.name, torch.bfloat16)
        row(M, "GEMM1", "op as dispatched" + (" (graph)" if g else ""), time_ms(g1, xq, graph=g), f1)
    fails = cuda.failures()
    if fails:
        out.append("\nfailed candidates:\n" + "\n".join(f"- {k}: {v}" for k, v in fails.items()))
    text = "\n".join(out) + "\n"
    emit(text, args.md)


if __name__ == "__main__":
    main()

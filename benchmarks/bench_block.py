"""GPT-style block (pre-LN, causal SDPA in bf16, MLP 4x GELU) at d=4096 on one GPU.

    PYTHONPATH=. python benchmarks/bench_block.py [--shape 4x2048 1x16] [--md out.md]

Variants and method as in bench_ffn.py. TFLOP/s counts the linears and the causal attention
(half the score matrix). Ratios against the faster of bf16 eager and bf16 torch.compile.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import (
    Block,
    HandBlock,
    aoti_package,
    baseline_variants,
    compile_fresh,
    device_line,
    emit,
    fxscale_transform,
    init_,
    kernel_breakdown,
    run_variants,
    table,
    torchao_fp8,
    torchao_version,
)


def build_variants(model, inputs):
    variants = [
        *baseline_variants(model, inputs[0]),
        ("fxscale.transform(fuse_residual=True) + compile",
         lambda: torch.compile(fxscale_transform(model, inputs[0], fuse_residual=True))),
        ("fxscale hand block (compile)", lambda: torch.compile(HandBlock(model))),
        ("fxscale.transform + compile (freezing)",
         lambda: compile_fresh(fxscale_transform(model, inputs[0]), inputs[0], freezing=True)),
        ("fxscale.transform + AOTI package", lambda: aoti_package(fxscale_transform(model, inputs[0]), inputs[0])),
    ]
    return variants


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs="+", default=["4x2048", "1x16"], help="BxT")
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--md", default=None)
    ap.add_argument("--log", default=None)
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--only", nargs="*", default=[], help="run only variants whose name contains one of these (or equals it, spaces as _)")
    ap.add_argument("--breakdown", action="store_true")
    args = ap.parse_args()
    log = open(args.log, "a") if args.log else None  # noqa: SIM115
    torch.manual_seed(0)
    dev = "cuda"
    d = args.d
    head = f"GPT block d={d}, {args.heads} heads, MLP 4x GELU; {device_line()}; torchao {torchao_version()}"
    print(head, flush=True)
    md = [f"## {head}\n"]
    model = init_(Block(d, args.heads)).to(dev, torch.bfloat16).eval()
    ref_model = Block(d, args.heads).to(dev).eval()
    ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    for shape in args.shape:
        B, T = (int(v) for v in shape.split("x"))
        modes = ("graph",) if B * T <= 64 else ("plain",)
        inputs = [torch.randn(B, T, d, device=dev, dtype=torch.bfloat16) for _ in range(3)]
        ref_in = torch.randn(B, T, d, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            ref_out = ref_model(ref_in.float())
        flops = 2.0 * B * T * 12 * d * d + 2.0 * B * T * T * d
        print(f"B={B} T={T} ({', '.join(modes)})", flush=True)
        variants = [v for v in build_variants(model, inputs) if not any(s in v[0] for s in args.skip)
                    and (not args.only or any(s in v[0] or s == v[0].replace(' ', '_') for s in args.only))]
        rows = run_variants(variants, inputs, ref_in, ref_out, flops, modes=modes, log=log)
        md.append(table(rows, f"{B}x{T} = {B * T} tokens"))
        if args.breakdown and B * T > 64:
            for name, build in [("bf16 eager", lambda: model),
                                ("fxscale.transform + compile (the default path)",
                                 lambda x=inputs[0]: torch.compile(fxscale_transform(model, x))),
                                ("torchao fp8 rowwise (compile)", lambda: torch.compile(torchao_fp8(model, rowwise=True)))]:
                try:
                    bd = kernel_breakdown(build(), inputs[0], top=16)
                except Exception as e:  # noqa: BLE001
                    bd = f"failed: {e}\n"
                md.append(f"\nPer-kernel, {name}, {B}x{T}:\n\n{bd}")
                print(f"per-kernel {name}\n{bd}", flush=True)
                torch._dynamo.reset()
    text = "\n".join(md)
    emit(text, args.md)


if __name__ == "__main__":
    main()

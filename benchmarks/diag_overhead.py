"""Where the host time of one fxscale FFN call goes (plain calls, no CUDA graph).

    PYTHONPATH=. python benchmarks/diag_overhead.py [--m 1024]

Prints: the host cost of single op calls; then, per compiled variant, any host synchronisation
inside a call (torch.cuda sync debug mode), host time per call against plain-call and
CUDA-graph device time, the kernels launched per call and the host operators that cost the most
(torch.profiler, self CPU time per call).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fxscale
from benchmarks.common import FFN, HandFFN, compile_fresh, host_and_device_us, init_, time_ms


def host_ops(fn, x, iters=20, top=10) -> str:
    """Kernels launched per call and the host operators with the most self CPU time per call."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn(x)
        torch.cuda.synchronize()
    evs = prof.key_averages()
    kernels = sum(e.count for e in evs if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    rows = sorted(((e.self_cpu_time_total / iters, e.count / iters, e.key) for e in evs), reverse=True)[:top]
    lines = [f"    kernels per call: {kernels / iters:g}"]
    lines += [f"    {t:8.1f} us  x{c:g}  {k[:100]}" for t, c, k in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    ap.add_argument("--skip-ops", action="store_true", help="skip the single-op timings")
    args = ap.parse_args()

    def compile_(m):
        return torch.compile(m, mode=args.mode)

    model = init_(FFN(4096, 16384)).cuda().to(torch.bfloat16).eval()
    xs = [torch.randn(args.m, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    x = xs[0]

    def bounds():
        return fxscale.transform(model, (x,), input_bounds=8.0, threshold=8.0, on_overflow="clamp")

    from fxscale.kernels import cuda

    xq = torch.randn(16, 256, device="cuda").to(torch.float8_e4m3fn)
    wq = torch.randn(256, 256, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    b = torch.zeros(256, device="cuda")
    op = torch.ops.fxscale.scaled_linear
    cases = {
        "op tiny bf16 (dispatcher)": lambda _: op(xq, one, wq, one, b, "none", None, None, torch.bfloat16),
        "python impl tiny bf16 (no dispatcher)": lambda _: cuda.scaled_linear_cuda(
            xq, one, wq, one, b, "none", None, None, torch.bfloat16),
        "op tiny relu e4m3": lambda _: op(xq, one, wq, one, b, "relu", one, "float8_e4m3fn", torch.bfloat16),
        "torch._scaled_mm tiny": lambda _: torch._scaled_mm(xq, wq.t(), one, one, out_dtype=torch.bfloat16),
    }
    with torch.no_grad():
        for name, fn in ({} if args.skip_ops else cases).items():
            fn(None)
            h, t = host_and_device_us(fn, None, 200)
            print(f"{name:45s} host {h:7.1f} us/call  (wall {t:7.1f})", flush=True)
        builders = [
            ("hand static (compile)", lambda: compile_(HandFFN(model, input_bound=8.0))),
            ("transform, input_bounds=8, clamp (compile)", lambda: compile_(bounds())),
            ("transform, bounds (compile, freezing)",
             lambda: compile_fresh(bounds(), x, freezing=True, mode=args.mode)),
            ("transform, bounds (freezing, ReLU fused Triton)",
             lambda: compile_fresh(bounds(), x, freezing=True, relu_cublas_max_m=0, mode=args.mode)),
            ("transform, dynamic (compile, freezing)", lambda: compile_fresh(
                fxscale.transform(model, (x,)), x, freezing=True, mode=args.mode)),
            ("hand dynamic (compile)", lambda: compile_(HandFFN(model))),
            ("transform, dynamic (compile)", lambda: compile_(fxscale.transform(model, (x,)))),
            ("bf16 compile", lambda: compile_(model)),
        ]
        for name, build in builders:
            mod = build()
            for _ in range(3):
                mod(x)
            torch.cuda.synchronize()
            try:
                torch.cuda.set_sync_debug_mode("error")
                mod(x)
                sync = "none"
            except RuntimeError as e:
                sync = str(e).splitlines()[0][:200]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            h, t = host_and_device_us(mod, x)
            plain = time_ms(mod, xs) * 1e3  # three inputs rotated, as the benchmarks do
            dev = time_ms(mod, [x], graph=args.mode is None) * 1e3
            print(f"{name:45s} host {h:7.1f} us/call, wall {t:7.1f}, plain {plain:7.1f}, "
                  f"device (graph) {dev:7.1f}; sync: {sync}", flush=True)
            print(host_ops(mod, x), flush=True)
            torch._dynamo.reset()


if __name__ == "__main__":
    main()

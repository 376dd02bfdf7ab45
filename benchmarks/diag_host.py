"""Host cost of a transformed FFN per plain call, and what it is spent on (GPU machine).

    PYTHONPATH=. python benchmarks/diag_host.py [--m 1024]

Prints host us per call, plain-call and CUDA-graph device time, the kernels launched per call,
and the host operators that cost the most (torch.profiler, self CPU time per call), for bf16
compile and fxscale.transform (declared bounds / input measured) + compile.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fxscale
from benchmarks.common import FFN, init_, time_ms
from benchmarks.diag_overhead import host_us


def host_ops(fn, x, iters=20, top=10) -> str:
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
    args = ap.parse_args()

    model = init_(FFN(4096, 16384)).cuda().to(torch.bfloat16).eval()
    xs = [torch.randn(args.m, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    x = xs[0]
    builds = {
        "bf16 compile": lambda: torch.compile(model),
        "transform, bounds": lambda: torch.compile(fxscale.transform(
            model, (x,), input_bounds=8.0, threshold=8.0, on_overflow="clamp")),
        "transform, dynamic": lambda: torch.compile(fxscale.transform(model, (x,))),
    }
    with torch.no_grad():
        for name, build in builds.items():
            torch._dynamo.reset()
            fn = build()
            for _ in range(3):
                fn(x)
            h, _ = host_us(fn, x, 100)
            plain = time_ms(fn, xs) * 1e3
            graph = time_ms(fn, xs, graph=True) * 1e3
            print(f"{name:20s} host {h:6.1f} us/call, plain {plain:6.1f} us, graph {graph:6.1f} us", flush=True)
            print(host_ops(fn, x), flush=True)

if __name__ == "__main__":
    main()

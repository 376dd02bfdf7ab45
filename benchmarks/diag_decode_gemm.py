"""Decode-sized GEMMs (M <= 64) of a Llama-3-8B layer: every fp8 candidate against bf16, cold L2.

    PYTHONPATH=. python benchmarks/diag_decode_gemm.py [--m 1 16] [--md out.md]

A decode step reads each weight once from HBM, so every time here is measured with the operands
out of the L2 cache (``fxscale.kernels.autotune.cold_copies``: enough copies that one pass does not
fit in it). Prints one row per (M, K, N): bf16 ``F.linear``, cuBLAS fp8 ``torch._scaled_mm``, the
best Triton tiling and the worst, the autotuner's choice timed warm (the same operands over and
over, how it measured before) and cold, and the achieved weight bandwidth of the cold choice.
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate

from fxscale.kernels import autotune, cuda

#: (name, K, N) of the Llama-3-8B decode GEMMs (q, k/v, o share K=4096).
SHAPES = [("q / o", 4096, 4096), ("k / v", 4096, 1024), ("gate / up", 4096, 14336), ("down", 14336, 4096),
          ("lm head", 4096, 128256)]


def _warm_copies(args):
    return [args]


def _operands(m: int, k: int, n: int) -> tuple:
    """scaled_linear's prepared arguments for an (m, k) x (k, n) fp8 GEMM into bf16."""
    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, device=dev) * 0.5).to(torch.float8_e4m3fn)
    xs, ws = torch.tensor(0.01, device=dev), torch.tensor(0.002, device=dev)
    return cuda._linear_call(x, xs, w, ws, None, "none", None, None, torch.bfloat16)[1]


def candidates_us(m: int, k: int, n: int, cold: bool) -> list[tuple[str, float]]:
    """Device time (us) of each candidate of fxscale's scaled_linear for an (m, k) x (k, n) fp8
    GEMM into bf16."""
    args = _operands(m, k, n)
    saved = autotune.cold_copies
    autotune.cold_copies = saved if cold else _warm_copies
    try:
        out = []
        for name, cfg in cuda._candidates(args[0], args[2], None, torch.bfloat16, "none"):
            if name == "reference":
                continue
            fn = cuda._impl(name, cfg)
            try:
                fn(*args)
                torch.cuda.synchronize()
                out.append((autotune.label(name, cfg), 1e3 * autotune.time_ms(fn, args)))
            except Exception as e:  # noqa: BLE001  (a tiling that does not compile here)
                out.append((f"{autotune.label(name, cfg)} ({type(e).__name__})", float("nan")))
        return out
    finally:
        autotune.cold_copies = saved


def sweep(m: int, k: int, n: int, top: int = 4) -> list[tuple[float, str]]:
    """The fastest pointer tilings (cold L2) of a grid wider than ``small_configs``: the
    candidates to add to it."""
    from fxscale.kernels.triton_fp8 import Config

    args = _operands(m, k, n)
    out = []
    for bn in (16, 32, 64, 128):
        for bk in (128, 256, 512):
            for split in (1, 2, 4, 8, 16):
                for stages, warps in ((3, 4), (4, 4), (4, 2), (6, 4)):
                    if bn * bk > 64 * 512 or (bn >= 128 and warps == 2):
                        continue
                    cfg = Config(16, bn, bk, stages, warps, group_m=1, tma=False, split_k=split)
                    fn = cuda._impl("triton", cfg)
                    try:
                        fn(*args)
                        torch.cuda.synchronize()
                        out.append((1e3 * autotune.time_ms(fn, args), repr(cfg)))
                    except Exception:  # noqa: BLE001  (out of shared memory)
                        torch.cuda.synchronize()
    return sorted(out)[:top]


def bf16_us(m: int, k: int, n: int) -> float:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    return 1e3 * autotune.time_ms(torch.nn.functional.linear, (x, w))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--md", default=None)
    ap.add_argument("--sweep", action="store_true", help="also a wider grid of pointer tilings at M=1")
    a = ap.parse_args()
    if a.sweep:
        for name, k, n in SHAPES[:4]:
            best = sweep(1, k, n)
            print(f"| sweep {name} M=1 | " + " | ".join(f"{t:.1f} us {c} ({k * n / t / 1e6:.2f} TB/s)" for t, c in best),
                  flush=True)
    rows = []
    for m in a.m:
        for name, k, n in SHAPES:
            cold = [c for c in candidates_us(m, k, n, cold=True) if c[1] == c[1]]
            warm = dict(c for c in candidates_us(m, k, n, cold=False) if c[1] == c[1])
            tri = sorted((t, lab) for lab, t in cold if lab.startswith("triton"))
            cub = next((t for lab, t in cold if lab == "cublas"), float("nan"))
            warm_pick = min(warm, key=warm.get)
            cold_pick, cold_t = min(cold, key=lambda c: c[1])
            b16 = bf16_us(m, k, n)
            rows.append([f"{name} M={m}", f"{k}x{n}", f"{b16:.1f}", f"{cub:.1f}",
                         f"{tri[0][0]:.1f} {tri[0][1][7:]}" if tri else "-", f"{tri[-1][0]:.1f}" if tri else "-",
                         f"{warm_pick} -> {dict(cold)[warm_pick]:.1f}", f"{cold_pick}", f"{b16 / cold_t:.2f}x",
                         f"{k * n / cold_t / 1e6:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    head = ["GEMM", "K x N", "bf16 us", "cuBLAS fp8 us", "best Triton us", "worst Triton us",
            "warm-timed pick (cold us)", "cold pick", "bf16 / cold pick", "weight TB/s"]
    table = tabulate(rows, head, tablefmt="github")
    print(table)
    if a.md:
        with open(a.md, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

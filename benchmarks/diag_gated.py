"""Where the gated requantise's statistics pass loses time, and what to try instead.

On the H200 (run 42, 2-layer Llama at 4x2048) ``_gated_stats_kernel`` took 478 us where the cast
pass, reading the same ``gate`` and ``up``, took 328 us (~2 TB/s against ~3.6). Keeping whole
rows in registers did not help; the suspects left are the tiling (16 x 512 tiles, 4 warps: a
float64 copy of each tile is 128 registers a thread) and the float64 squares themselves. This
times, on the GPU, with operands larger than the L2:

* the shipped kernel over a grid of tilings (rows per program, columns per tile, warps,
  column chunks);
* ``f32``: a variant that squares in float32, each tile's rows first scaled by a power of two
  (exact) that puts their max in [1, 4), and bounds the float32 sum's rounding by an explicit
  margin before adding it, in float64, to the row's total: an upper bound still, never below
  the exact sum of squares;
* the cast pass and the whole op, for reference.

Every variant is first checked against a float64 reference: ``max |h|`` exactly, each row's sum
of squares not below the exact one and within 2^-12 relative of it.

    python benchmarks/diag_gated.py [--m 8192 16] [--n 14336] [--md out.md]

On a CPU (``TRITON_INTERPRET=1``, small shapes) only the checks run: ``--check-only``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics

import torch
import triton
import triton.language as tl

from fxscale.kernels import triton_gated as G
from fxscale.kernels.triton_fp8 import ACT_CODES


@triton.jit
def _stats_f32_kernel(g_ptr, u_ptr, amax_ptr, rss_ptr, M, N, stride_g, stride_u,
                      ACT: tl.constexpr, ROUND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      CHUNK: tl.constexpr):
    """As ``_gated_stats_kernel``, the squares in float32: per tile and row, ``q = |h| * p`` with
    ``p`` the power of two that puts the row's tile max in [1, 2) (in [2, 4) where it is >= 2^127),
    ``s = sum q^2`` in float32 (each of the BN terms and additions rounds by at most ``u = 2^-24``
    relative; a square below 2^-126 may flush to 0), so ``sum h^2 <= (s (1 + 2 BN u) + BN 2^-126) / p^2``."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    lo = tl.program_id(1) * CHUNK
    amax = tl.zeros([BM], dtype=tl.float32)
    rss = tl.zeros([BM], dtype=tl.float64)
    for k in tl.range(0, CHUNK, BN):
        offs_n = lo + k + tl.arange(0, BN)
        h, valid = G._gated_tile(g_ptr, u_ptr, offs_m, offs_n, M, N, stride_g, stride_u, ACT, ROUND)
        a = tl.where(valid & (tl.abs(h) < float("inf")), tl.abs(h), 0.0)
        m = tl.max(a, axis=1)
        amax = tl.maximum(amax, m)
        e = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF          # biased exponent of the row max
        e = tl.minimum(e, 253)
        p = ((254 - e) << 23).to(tl.float32, bitcast=True)       # 2^(127 - e): m * p in [1, 2)
        q = a * p[:, None]
        s = tl.sum(q * q, axis=1)
        s_ub = s * (1.0 + 2.0 * BN * 5.9604644775390625e-08) + BN * 1.1754943508222875e-38
        inv_p = ((e + 896).to(tl.int64) << 52).to(tl.float64, bitcast=True)   # 1 / p = 2^(e - 127), float64
        rss += s_ub.to(tl.float64) * inv_p * inv_p
    tl.atomic_max(amax_ptr, tl.max(amax, axis=0).to(tl.int32, bitcast=True))
    tl.atomic_add(rss_ptr + offs_m, rss, mask=offs_m < M)


def _reference(gate, up, activation):
    # rounded as eager (and the kernels) round: act(gate) and the product in the inputs' dtype
    act = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[activation]
    h = (act(gate.float()).to(gate.dtype).float() * up.float()).to(gate.dtype).double()
    a = torch.where(torch.isfinite(h), h.abs(), torch.zeros_like(h))
    return a.max(), (a * a).sum(-1)


def _run_stats(kernel, gate, up, activation, bm, bn, split, warps):
    M, N = gate.shape
    amax = gate.new_zeros((1,), dtype=torch.int32)
    rss = gate.new_zeros((M,), dtype=torch.float64)
    chunk = triton.cdiv(triton.cdiv(N, split), bn) * bn
    kernel[(triton.cdiv(M, bm), triton.cdiv(N, chunk))](
        gate, up, amax, rss, M, N, gate.stride(0), up.stride(0), ACT=ACT_CODES[activation],
        ROUND=G._ROUND[gate.dtype], BM=bm, BN=bn, CHUNK=chunk, num_warps=warps)
    return amax.view(torch.float32)[0], rss


def check(kernel, gate, up, activation, bm, bn, split, warps) -> str | None:
    """None if the statistics are right. Against the shipped kernel at its default tiling (the
    same ``h``, element for element): ``max |h|`` exactly, each row's sum of squares at least
    the shipped one (up to float64 rounding) and within 2^-12 relative of it (or 1e-100
    absolute). The shipped kernel against a float64 reference, within 2^-6 (its activation
    rounds as Triton's ``exp`` does, which may move a bf16 ``h`` by an ulp)."""
    M, N = gate.shape
    amax, rss = _run_stats(kernel, gate, up, activation, bm, bn, split, warps)
    bm0, bn0, split0 = G._tiles(M, N, gate.device)
    base_amax, base = _run_stats(G._gated_stats_kernel, gate, up, activation, bm0, bn0, split0, 4)
    ref_amax, ref = _reference(gate, up, activation)
    if abs(float(base_amax) - float(ref_amax)) > 2.0**-6 * float(ref_amax):
        return f"shipped amax {float(base_amax)!r} against the float64 {float(ref_amax)!r}"
    rel = ((base.cpu() - ref.cpu()).abs() / ref.cpu().clamp_min(1e-300)).max().item()
    if rel > 2.0**-6:
        return f"shipped row sums off the float64 reference by {rel:.2e} relative"
    if float(amax) != float(base_amax):
        return f"amax {float(amax)!r} != {float(base_amax)!r}"
    rss, base = rss.cpu(), base.cpu()
    lo = (rss < base * (1 - 2.0**-40)).sum().item()
    over = (rss - base - 1e-100) / base.clamp_min(1e-300)
    if lo or over.max().item() > 2.0**-12:
        return f"row sums: {lo} rows below the shipped kernel's, max relative excess {over.max().item():.2e}"
    return None


def time_us(fn, args: tuple, reps: int = 20) -> float:
    """Median device time of ``fn(*args)`` (CUDA events, one call each: operands beyond the L2)."""
    fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        ts.append(1e3 * start.elapsed_time(end))
    return statistics.median(ts)


def operands(m, n, device, spikes: bool = True):
    gate = torch.randn(m, n, device=device).to(torch.bfloat16)
    up = torch.randn(m, n, device=device).to(torch.bfloat16)
    if spikes:  # values far apart in magnitude: the rescaling and the margin must hold there too
        gate[0, :7] = torch.tensor([3e4, 1e-3, -2e2, 1e-30, 0.0, -5.0, 1e30])
        up[0, :7] = torch.tensor([3e4, 1e-3, 2e2, 1e-8, 7.0, 1e-20, 1.0])
        up[-1] = 0.0
    return gate, up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[8192, 16])
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--activation", default="silu")
    ap.add_argument("--check-only", action="store_true", help="correctness of every variant, no timing")
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels = {"shipped": G._gated_stats_kernel, "f32": _stats_f32_kernel}
    md = []
    for m in args.m:
        gate, up = operands(m, args.n, device)
        bm0, bn0, split0 = G._tiles(m, args.n, gate.device)
        grid = [(bm0, bn0, split0, 4)]
        if not args.check_only:
            grid += [(bm, bn, sp, w) for bm, bn, sp, w in itertools.product(
                (1, 4, 8, 16, 32) if m < 16 else (4, 8, 16, 32), (128, 256, 512, 1024), sorted({1, split0, 4}), (4, 8))
                if bm * bn <= 16 * 1024 and (bm, bn, sp, w) != grid[0]]
        rows = []
        for name, kern in kernels.items():
            for bm, bn, sp, w in grid:
                label = f"{name} BM={bm} BN={bn} split={sp} warps={w}"
                try:
                    err = check(kern, gate, up, args.activation, bm, bn, sp, w)
                except Exception as e:  # noqa: BLE001  (out of resources for this tiling)
                    rows.append((float("inf"), label, f"{type(e).__name__}: {str(e)[:80]}"))
                    continue
                if err is not None:
                    rows.append((float("inf"), label, "WRONG: " + err))
                    continue
                us = float("nan") if args.check_only else time_us(
                    _run_stats, (kern, gate, up, args.activation, bm, bn, sp, w))
                rows.append((us, label, "ok"))
        extra = []
        if not args.check_only:
            whole = time_us(torch.ops.fxscale_kernels.gated_requantise, (gate, up, args.activation, torch.float8_e4m3fn))
            extra.append(f"whole op (stats + cast, shipped tiling): {whole:.1f} us")
        gb = 2 * gate.numel() * gate.element_size() / 1e9
        md.append(f"### gate/up ({m}, {args.n}) bf16, {args.activation}; {gb:.3f} GB read per pass\n")
        md.append("| variant | us | TB/s | check |\n|---|---|---|---|")
        for us, label, ok in sorted(rows, key=lambda r: (r[0] != r[0], r[0]))[:24]:
            tbs = gb / (us * 1e-6) / 1e3 if math.isfinite(us) else float("nan")
            md.append(f"| {label} | {us:.1f} | {tbs:.2f} | {ok} |")
        md += ["", *extra, ""]
        print("\n".join(md[-(len(rows[:24]) + 4 + len(extra)):]), flush=True)
    if args.md:
        with open(args.md, "w") as f:
            f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()

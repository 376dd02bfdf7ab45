"""Decode attention over the K/V cache, one layer, S = 1, on CUDA: device time per call.

Llama-3-8B heads (H 32, Hkv 8, D 128), batch 1/16/64, context 1024/4096 (cache length ctx + 64,
the query at position ctx), each variant under ``torch.compile`` and timed as CUDA-graph replays
(``--calls`` calls per graph, the median over ``--reps`` replays, per call):

* ``bf16 sdpa``: transformers' StaticCache path: the new K/V written into a bf16 cache, the KV
  heads expanded to H (``repeat_kv``), SDPA with a bool mask;
* ``fxscale sdpa``: fxscale.llm's attention before the op: ``kv_read`` of the float8 cache,
  ``index_copy`` of the new K/V, the rep query heads stacked as rows, SDPA with a bool mask;
* ``fxscale op``: ``fxscale_kernels::kv_decode_attention`` (the Triton split-KV kernel reading
  the float8 cache), through ``fxscale.kv_attention._decode_attention`` as the step graph does.

The bf16 cache holds the float8 cache's values exactly (power-of-two scales), so all three compute
the same function: ``max err`` is each fxscale variant's max |difference| from ``bf16 sdpa``.

    python benchmarks/bench_decode_attention.py [--md out.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import fxscale  # noqa: F401  (registers the ops)
from fxscale.kv_attention import _decode_attention

H, HKV, D = 32, 8, 128
K_SCALE, V_SCALE = 2.0**-5, 2.0**-6


def _inputs(b: int, ctx: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    length = ctx + 64

    def cache(scale):
        x = torch.randn(b, HKV, length, D, device="cuda", generator=g) * (2.0 / scale)
        # inside e4m3's range: a cast of |x| > 448 is NaN (run 38's error column read NaN)
        return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)

    kc, vc = cache(K_SCALE), cache(V_SCALE)
    q = torch.randn(b, H, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    kn = torch.randn(b, HKV, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    vn = torch.randn(b, HKV, 1, D, device="cuda", generator=g, dtype=torch.bfloat16)
    deq = {n: (c.view(torch.float8_e4m3fn).float() * s).to(torch.bfloat16) for n, c, s in
           (("k16", kc, K_SCALE), ("v16", vc, V_SCALE))}
    return {"q": q, "kn": kn, "vn": vn, "kc": kc, "vc": vc, "pos": torch.tensor([ctx], device="cuda"), **deq}


def bf16_sdpa(q, kn, vn, pos, k16, v16):
    """StaticCache: write the new K/V in place, expand the KV heads, SDPA with a bool mask."""
    k16.index_copy_(2, pos, kn)
    v16.index_copy_(2, pos, vn)
    b, _, length, _ = k16.shape
    k = k16[:, :, None].expand(b, HKV, H // HKV, length, D).reshape(b, H, length, D)
    v = v16[:, :, None].expand(b, HKV, H // HKV, length, D).reshape(b, H, length, D)
    mask = (torch.arange(length, device=pos.device)[None, :] <= pos[:, None])[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5)


def fxscale_sdpa(q, kn, vn, pos, kc, vc):
    """fxscale.llm's attention without the op (kv_attention._attention's SDPA path)."""
    k_all = torch.ops.fxscale.kv_read(kc, K_SCALE, q.dtype).index_copy(2, pos, kn)
    v_all = torch.ops.fxscale.kv_read(vc, V_SCALE, q.dtype).index_copy(2, pos, vn)
    mask = torch.arange(k_all.shape[2], device=pos.device)[None, :] <= pos[:, None]
    b, h, s, d = q.shape
    rep = h // HKV
    out = F.scaled_dot_product_attention(q.reshape(b, HKV, rep * s, d), k_all, v_all, attn_mask=mask.repeat(rep, 1),
                                         scale=D**-0.5)
    return out.reshape(b, h, s, d)


def fxscale_op(q, kn, vn, pos, kc, vc):
    """The op, called as the step graph calls it (output (B, S, H, D) back to (B, H, S, D))."""
    return _decode_attention(q, kn, vn, kc, vc, pos, K_SCALE, V_SCALE, None, D**-0.5, None).transpose(1, 2)


def _bind(fn, x: dict, bf16_cache: bool):
    caches = (x["k16"], x["v16"]) if bf16_cache else (x["kc"], x["vc"])
    return lambda: fn(x["q"], x["kn"], x["vn"], x["pos"], *caches)


def device_us(fn, calls: int, reps: int) -> float:
    """Median device microseconds per call: ``calls`` calls captured in one CUDA graph, replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--md", help="also write the table to this file")
    a = ap.parse_args()
    t0 = time.time()
    variants = {"bf16 sdpa": bf16_sdpa, "fxscale sdpa": fxscale_sdpa, "fxscale op": fxscale_op}
    compiled = {n: torch.compile(f, fullgraph=True, dynamic=False) for n, f in variants.items()}
    title = (f"Decode attention, one layer, H {H} / Hkv {HKV} / D {D}, S 1, bf16 queries "
             f"({torch.cuda.get_device_name()}, torch {torch.__version__}); device us per call "
             "(CUDA-graph replays, median), max err vs bf16 sdpa")
    head = ("| batch | ctx | bf16 sdpa us | fxscale sdpa us | fxscale op us | op / bf16 | op / fxscale sdpa "
            "| max err sdpa | max err op |")
    lines = [title, "", head, "|---|---|---|---|---|---|---|---|---|"]
    for b in a.batch:
        for ctx in a.ctx:
            x = _inputs(b, ctx)
            calls = {n: _bind(compiled[n], x, n == "bf16 sdpa") for n in variants}
            outs = {n: call().float() for n, call in calls.items()}
            us = {n: device_us(call, a.calls, a.reps) for n, call in calls.items()}
            err = {n: float((outs[n] - outs["bf16 sdpa"]).abs().max()) for n in ("fxscale sdpa", "fxscale op")}
            lines.append(f"| {b} | {ctx} | {us['bf16 sdpa']:.1f} | {us['fxscale sdpa']:.1f} | {us['fxscale op']:.1f} "
                         f"| {us['fxscale op'] / us['bf16 sdpa']:.2f} | {us['fxscale op'] / us['fxscale sdpa']:.2f} "
                         f"| {err['fxscale sdpa']:.2e} | {err['fxscale op']:.2e} |")
            print(lines[-1], flush=True)
            del x, calls, outs
    lines += ["", f"({time.time() - t0:.0f} s in all, compiles included)"]
    text = "\n".join(lines)
    print("\n" + text)
    if a.md:
        with open(a.md, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

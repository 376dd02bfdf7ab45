"""Shared pieces of the GPU benchmarks: timing, SQNR, baselines, the hand-lowered fxscale chain.

Timing (METHOD.md): CUDA events around batches of calls, warm-up first, several fresh random
input sets rotated (so a 64 MB activation is not served from L2), the median over batches.
With ``graph=True`` a variant is captured once into a CUDA graph and its replays are timed
(what a deployment at small batch does; launch overhead then vanishes for every variant alike).
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import fxscale
from fxscale.formats import get_format

E4M3 = torch.float8_e4m3fn


# ------------------------------------------------------------------------------ timing
def time_ms(fn, inputs, *, graph: bool = False, batches: int = 7, target_ms: float = 25.0,
            warmup: int = 3) -> float:
    """Median milliseconds per call of ``fn(x)`` over ``batches`` batches of calls."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    if graph:
        static = inputs[0]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn(static)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(static)
        torch.cuda.synchronize()

        def call(i):
            g.replay()
    else:
        def call(i):
            fn(inputs[i % len(inputs)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(3):
        call(i)
    end.record()
    end.synchronize()
    per = start.elapsed_time(end) / 3
    n = max(3, min(2000, int(target_ms / max(per, 1e-3))))
    ts = []
    for _ in range(batches):
        start.record()
        for i in range(n):
            call(i)
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / n)
    return statistics.median(ts)


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.to(torch.float32)
    ref = ref.to(torch.float32)
    err = (out - ref).pow(2).sum().item()
    sig = ref.pow(2).sum().item()
    if not math.isfinite(err):
        return float("nan")
    return float("inf") if err == 0 else 10.0 * math.log10(sig / err)


def device_line() -> str:
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name} ({p.multi_processor_count} SMs), torch {torch.__version__}, "
            f"triton {_triton_version()}, {datetime.date.today().isoformat()}")


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def torchao_version() -> str:
    try:
        import torchao

        return torchao.__version__
    except ImportError:
        return "missing"


# ------------------------------------------------------------------------------ models
class FFN(nn.Module):
    def __init__(self, d: int, hidden: int, act: str = "relu"):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.act = act

    def forward(self, x):
        h = self.fc1(x)
        h = F.relu(h) if self.act == "relu" else F.gelu(h, approximate="tanh")
        return self.fc2(h)


class Block(nn.Module):
    """GPT-style pre-LN block: x + attn(ln1(x)); then + mlp(ln2(x)) with GELU (tanh)."""

    def __init__(self, d: int, heads: int, mlp: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = FFN(d, mlp * d, act="gelu")

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


def init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Default init, then random biases / LayerNorm affine (so the epilogues do real work)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


# ------------------------------------------------------------------------------ baselines
class DynFP8Linear(nn.Module):
    """Per-tensor dynamic fp8: amax + cast of the activation on every call, weight cast once."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        ws = (w.abs().amax() / 448.0).clamp(min=1e-12)
        self.register_buffer("w", (w / ws).to(E4M3))  # (N, K) row-major: w.t() is column-major
        self.register_buffer("ws", ws)
        self.register_buffer("b", lin.bias.detach().to(torch.bfloat16))

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        xs = (x2.abs().amax().float() / 448.0).clamp(min=1e-12)
        xq = (x2.float() / xs).clamp(-448.0, 448.0).to(E4M3)
        y = torch._scaled_mm(xq, self.w.t(), xs, self.ws, bias=self.b, out_dtype=torch.bfloat16,
                             use_fast_accum=True)
        return y.reshape(*x.shape[:-1], -1)


def dyn_fp8(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, cname, DynFP8Linear(child))
    return m


def torchao_fp8_static(model: nn.Module, calibrate) -> nn.Module:
    """torchao's calibrated static fp8 (per-tensor activation scales from observers):
    ``calibrate(m)`` runs the representative data through the prepared copy."""
    from torchao.quantization import Float8StaticActivationFloat8WeightConfig, quantize_

    m = copy.deepcopy(model)
    quantize_(m, Float8StaticActivationFloat8WeightConfig(step="prepare"))
    with torch.no_grad():
        calibrate(m)
    quantize_(m, Float8StaticActivationFloat8WeightConfig(step="convert"))
    return m


def torchao_fp8(model: nn.Module, rowwise: bool) -> nn.Module:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    m = copy.deepcopy(model)
    quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if rowwise else PerTensor()))
    return m


# ------------------------------------------------------------------------------ fxscale, by hand
class QLinear(nn.Module):
    """A linear layer lowered to ``torch.ops.fxscale.scaled_linear`` as transform emits it."""

    def __init__(self, lin: nn.Linear, fmt: str):
        super().__init__()
        f = get_format(fmt)
        w = lin.weight.detach().float()
        s = f.scale_for(w.abs().max().item())
        data = f.cast(w / s)
        self.register_buffer("w", data)
        self.register_buffer("ws", torch.tensor(s, dtype=torch.float32, device=w.device))
        self.register_buffer("b", lin.bias.detach().float())
        wdq = data.float() * s  # bounds hold for the weights as quantised
        # Cauchy-Schwarz: |x_i . w_j + b_j| <= ||x_i|| * max_j ||w_j|| + max |b|
        self.w_rownorm = float(wdq.norm(dim=1).max())
        self.b_max = float(self.b.abs().max())

    def forward(self, xq, xs, activation="none", out_scale=None, out_fmt=None, out_dtype=torch.bfloat16):
        return torch.ops.fxscale.scaled_linear(xq, xs, self.w, self.ws, self.b, activation, out_scale,
                                               out_fmt, out_dtype)


class HandFFN(nn.Module):
    """x -> stats -> pow2 scale -> quantise -> scaled_linear(relu, static out scale, e4m3)
    -> scaled_linear(bf16). With ``input_bound`` every scale is static (no run-time amax)."""

    def __init__(self, ffn: FFN, fmt: str = "float8_e4m3fn", input_bound: float | None = None):
        super().__init__()
        self.f = get_format(fmt)
        self.fmt = self.f.name
        self.l1 = QLinear(ffn.fc1, fmt)
        self.l2 = QLinear(ffn.fc2, fmt)
        self.act = ffn.act if ffn.act == "relu" else "gelu_tanh"
        self.grow = 1.0 + self.f.rel_rounding  # a quantised row is at most this much longer
        self.input_bound = input_bound
        if input_bound is not None:
            k = ffn.fc1.in_features
            dev = ffn.fc1.weight.device
            self.register_buffer("xs", torch.tensor(self.f.scale_for(input_bound), device=dev))
            # ||x_i|| <= bound * sqrt(K) for any x within the declared bound
            hb = input_bound * math.sqrt(k) * self.grow * self.l1.w_rownorm + self.l1.b_max
            self.register_buffer("hs", torch.tensor(self.f.scale_for(hb), device=dev))

    def hidden_scale(self, x_rownorm):
        hb = x_rownorm * (self.grow * self.l1.w_rownorm) + self.l1.b_max
        return self.f.scale_tensor(hb)

    def forward(self, x):
        if self.input_bound is None:
            st = torch.ops.fxscale.stats(x)
            xs = self.f.scale_tensor(st[0])
            hs = self.hidden_scale(st[1])
        else:
            xs, hs = self.xs, self.hs
        xq = torch.ops.fxscale.quantise(x, xs, self.fmt)
        h = self.l1(xq, xs, self.act, hs, self.fmt)
        return self.l2(h, hs, "none", None, None, x.dtype)


class HandBlock(nn.Module):
    """The GPT block lowered by hand: LayerNorm, softmax/SDPA and the residual stream in bf16;
    every matmul operand in e4m3; the MLP hidden in e4m3 with its Cauchy-Schwarz static scale."""

    def __init__(self, blk: Block, fmt: str = "float8_e4m3fn"):
        super().__init__()
        self.f = get_format(fmt)
        self.fmt = self.f.name
        self.heads = blk.heads
        self.ln1, self.ln2 = blk.ln1, blk.ln2
        self.qkv = QLinear(blk.qkv, fmt)
        self.proj = QLinear(blk.proj, fmt)
        self.fc1 = QLinear(blk.mlp.fc1, fmt)
        self.fc2 = QLinear(blk.mlp.fc2, fmt)
        self.grow = 1.0 + self.f.rel_rounding

    def q(self, x):
        st = torch.ops.fxscale.stats(x)
        s = self.f.scale_tensor(st[0])
        return torch.ops.fxscale.quantise(x, s, self.fmt), s, st

    def forward(self, x):
        B, T, C = x.shape
        hq, hs, _ = self.q(self.ln1(x))
        q, k, v = self.qkv(hq, hs).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        aq, as_, _ = self.q(a)
        x = x + self.proj(aq, as_)
        mq, ms, st = self.q(self.ln2(x))
        hb = st[1] * (self.grow * self.fc1.w_rownorm) + self.fc1.b_max  # gelu never grows |.|
        hsc = self.f.scale_tensor(hb)
        h = self.fc1(mq, ms, "gelu_tanh", hsc, self.fmt)
        return x + self.fc2(h, hsc)


def fxscale_transform(model: nn.Module, example, **options):
    """``fxscale.transform(model, (example,), **options)``."""
    return fxscale.transform(model, (example,), **options)


def compile_fresh(mod: nn.Module, example, *, lowering: bool = True, relu_cublas_max_m: int | None = None,
                  freezing: bool = False, mode: str | None = None, triton_ops: bool = True):
    """``torch.compile(mod)``, compiled now (on ``example``, under no_grad) with these settings
    and the compile caches off (they do not key on fxscale's lowering switches).
    ``freezing``: inductor treats parameters and buffers as constants, so static scale
    arithmetic (reciprocals, scale products, bias / scale) is folded at compile time instead
    of running as small kernels every call."""
    from fxscale.kernels import lowering as lowering_mod

    lowering_mod.set_inductor_lowering(lowering, relu_cublas_max_m=relu_cublas_max_m, triton_ops=triton_ops)
    try:
        c = torch.compile(mod, mode=mode)
        with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False, freezing=freezing), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            c(example)
    finally:
        lowering_mod.set_inductor_lowering(True)
    return c


def aoti_package(sm: nn.Module, example):
    """``fxscale.load(fxscale.save(sm, (example,), tmp))``: the AOTInductor package's callable
    (batch dynamic where the example's batch is at least 2)."""
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="fxscale_aoti_"), "model.pt2")
    fxscale.save(sm, (example,), path, dynamic_batch=example.shape[0] >= 2)
    run = fxscale.load(path)
    return lambda x: run(x)


def host_and_device_us(fn, x, n: int = 50) -> tuple[float, float]:
    """Host time per plain call (enqueueing only: the loop's time before the final sync) and the
    wall time per call with the device, both in us. Host >= wall/1 means host-bound."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def baseline_variants(model: nn.Module, example) -> list:
    """``(name, builder)`` of what every benchmark compares: bf16 eager and compiled, torchao fp8
    (tensorwise, rowwise), the in-bench per-tensor dynamic fp8, ``fxscale.transform`` with its
    defaults (then torch.compile), and the fxscale torch.compile backend."""
    return [
        ("bf16 eager", lambda: model),
        ("bf16 compile", lambda: torch.compile(model)),
        ("torchao fp8 tensorwise (compile)", lambda: torch.compile(torchao_fp8(model, rowwise=False))),
        ("torchao fp8 rowwise (compile)", lambda: torch.compile(torchao_fp8(model, rowwise=True))),
        ("dynamic per-tensor fp8, in-bench (compile)", lambda: torch.compile(dyn_fp8(model))),
        ("fxscale.transform + compile", lambda: torch.compile(fxscale_transform(model, example))),
        ('torch.compile(backend="fxscale")', lambda: torch.compile(model, backend="fxscale")),
    ]


# ------------------------------------------------------------------------------ running
def run_variants(variants, inputs, ref_in, ref_out, flops, *, modes=("plain",), log=None) -> list[dict]:
    """Time each ``(name, builder[, modes])``; builder() -> callable. ``modes``: "plain" calls
    and/or "graph" (CUDA-graph replays). Failures are reported, not fatal."""
    rows = []
    for v in variants:
        name, build = v[0], v[1]
        vmodes = v[2] if len(v) > 2 else modes
        fn, sq, err = None, None, None
        try:
            fn = build()
            with torch.no_grad():
                out = fn(ref_in)
                sq = sqnr_db(out, ref_out)
                del out
        except Exception as e:  # noqa: BLE001  (a failing variant is a result, not a crash)
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            traceback.print_exc(file=log)
        for mode in vmodes:
            row = {"variant": name, "mode": mode, "ms": None, "tflops": None, "sqnr": sq, "error": err}
            if err is None:
                try:
                    with torch.no_grad():
                        row["ms"] = time_ms(fn, inputs, graph=mode == "graph")
                    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    traceback.print_exc(file=log)
            rows.append(row)
            label = f"{name} [{mode}]"
            msg = (f"  {label:58s} " + (f"{row['ms']:8.4f} ms {row['tflops']:7.1f} TFLOP/s  SQNR {sq:6.2f} dB"
                                        if row["ms"] is not None else f"FAILED {row['error']}"))
            print(msg, flush=True)
        del fn
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    for mode in {r["mode"] for r in rows}:
        base = [r["ms"] for r in rows if r["mode"] == mode and r["variant"] in ("bf16 eager", "bf16 compile")
                and r["ms"] is not None]
        best = min(base) if base else None
        for r in rows:
            if r["mode"] == mode:
                r["ratio"] = best / r["ms"] if best and r["ms"] else None
    return rows


def table(rows, title: str) -> str:
    lines = [f"### {title}", "", "| variant | timing | ms | TFLOP/s | vs faster bf16 | SQNR dB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mode = "CUDA graph" if r["mode"] == "graph" else "plain calls"
        if r["ms"] is None:
            lines.append(f"| {r['variant']} | {mode} | failed: {r['error']} | | | |")
        else:
            ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
            lines.append(f"| {r['variant']} | {mode} | {r['ms']:.4f} | {r['tflops']:.1f} | {ratio} | "
                         f"{r['sqnr']:.2f} |")
    return "\n".join(lines) + "\n"


def kernel_breakdown(fn, x, *, iters: int = 10, top: int = 12) -> str:
    """Per-kernel device time per call of ``fn(x)`` (torch.profiler), as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn(x)
            torch.cuda.synchronize()
    evs = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if t and t > 0:
            evs.append((t / iters, e.count / iters, e.key))
    evs.sort(reverse=True)
    total = sum(t for t, _, _ in evs)
    lines = ["| kernel | us/call | calls | share |", "|---|---|---|---|"]
    for t, c, k in evs[:top]:
        lines.append(f"| `{k[:90]}` | {t:.1f} | {c:g} | {100 * t / total:.0f}% |")
    lines.append(f"| total | {total:.1f} | | |")
    return "\n".join(lines) + "\n"


def ffn_shape_args(ap) -> None:
    """The FFN benchmarks' shared options: token counts, model width, hidden width, markdown out."""
    ap.add_argument("--m", type=int, nargs="+", default=[8192, 1024, 16])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=16384)
    ap.add_argument("--md", default=None, help="append markdown tables here")


def emit(text: str, md_path: str | None) -> None:
    """Print ``text`` and, with ``md_path``, append it to that markdown file."""
    print(text)
    if md_path:
        with open(md_path, "a") as fh:
            fh.write(text + "\n")


def log_file(path):
    return open(path, "a") if path else sys.stderr

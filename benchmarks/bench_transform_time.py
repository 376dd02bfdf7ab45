"""How long ``fxscale.transform`` takes on a 12-layer GPT-2-size graph, on CPU, per phase.

Target (DESIGN.md): under 2 s. The model is transformers' ``GPT2Model`` (and, optionally,
``GPT2LMHeadModel``, whose tied 50257x768 head is one more matmul operand) built from
``GPT2Config(n_layer=12, n_embd=768, n_head=12, use_cache=False)`` with random weights; the
input is ``(1, 32)`` token ids. We time the whole ``transform`` (median of 3 runs) and read
each compiler pass's wall time from the pipeline itself (``sm.pass_times``, recorded by
``passes.run``), plus the time to render the report; ``--profile`` adds a cProfile of the
``analyse`` pass.

    .venv/bin/python benchmarks/bench_transform_time.py [--lm-head] [--runs 3] [--write]

``--write`` rewrites ``benchmarks/RESULTS_cpu.md`` with the numbers and the machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import time
import warnings

import torch

import fxscale
from fxscale.api import transform

DATE = "2026-11-26"  # the date this benchmark was run for the results file


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_model(lm_head: bool):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, use_cache=False)
    model = (GPT2LMHeadModel if lm_head else GPT2Model)(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 32))
    return model, (ids,)


def report_time(sm) -> float:
    """Seconds to render ``sm.report`` as text (the table the user prints)."""
    t = time.perf_counter()
    str(sm.report)
    return time.perf_counter() - t


def profile_analyse(model, args, top: int = 12) -> str:
    """cProfile of the pipeline's ``analyse`` pass (the passes before it run first), by own time."""
    import passes
    from fxscale.config import TransformConfig

    c = passes.run(model, args, TransformConfig(format="float8_e4m3fn"), until="precision")  # the passes before it
    pr = cProfile.Profile()
    pr.enable()
    passes.resume(c, until="analyse")
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def bench(lm_head: bool, runs: int) -> dict:
    model, args = build_model(lm_head)
    name = "GPT2LMHeadModel" if lm_head else "GPT2Model"
    # Warm-up: first torch.export in a process pays one-off import/tracing setup.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        transform(model, args)
        first = time.perf_counter() - t
        print(f"{name}: first transform in the process {first:.2f} s", flush=True)
        totals, cpu, per_phase = [], [], []
        for _ in range(runs):
            t, c = time.perf_counter(), time.process_time()
            sm = transform(model, args)
            totals.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            per_phase.append({**sm.pass_times, "report": report_time(sm)})
            print(f"{name}: transform {totals[-1]:.2f} s (CPU time of the process {cpu[-1]:.2f} s); passes "
                  + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in per_phase[-1].items()), flush=True)
    # Sanity: it runs and is finite.
    with torch.no_grad():
        y = sm(*args)
    y0 = y[0] if isinstance(y, (tuple, list)) else getattr(y, "last_hidden_state", None)
    if y0 is None:
        y0 = y.logits
    med = {k: statistics.median([p[k] for p in per_phase]) for k in per_phase[0]}
    return {
        "name": name,
        "first": first,
        "totals": totals,
        "median": statistics.median(totals),
        "cpu_median": statistics.median(cpu),
        "phases": med,
        "nodes": len(sm.graph.nodes),
        "summary": str(sm.report).strip().splitlines()[-1],
        "finite": bool(torch.isfinite(y0).all()),
    }


def render(results: list[dict], profile: str | None) -> str:
    lines = [
        "# transform time on CPU (12-layer GPT-2-size graph)",
        "",
        f"- date: {DATE}",
        f"- machine: {os.cpu_count()} CPUs (`nproc` {len(os.sched_getaffinity(0))}), {cpu_model()}",
        (f"- load average when the run ended: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(the machine is shared: wall times under load are inflated)"),
        f"- torch {torch.__version__}, python {platform.python_version()}, torch threads {torch.get_num_threads()}",
        ("- model: `GPT2Config(n_layer=12, n_embd=768, n_head=12, use_cache=False)`, random weights, "
        "input ids (1, 32); format float8_e4m3fn, rules rownorm, requantise on"),
        f"- command: `.venv/bin/python benchmarks/bench_transform_time.py {' '.join(sys.argv[1:])}`",
        "- target (DESIGN.md): < 2 s",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['name']} ({r['nodes']} graph nodes)",
            "",
            (f"`transform` median of {len(r['totals'])}: **{r['median']:.2f} s** "
            f"(runs: {', '.join(f'{t:.2f}' for t in r['totals'])} s; first call in the process, "
            f"not counted: {r['first']:.2f} s); process CPU time (both cores) median {r['cpu_median']:.2f} s. Target < 2 s: **{'met' if r['median'] < 2 else 'MISSED'}**. "
            f"Output finite: {r['finite']}."),
            "",
            "| pass (median of the timed runs, from sm.pass_times; report: rendering it) | ms |",
            "|---|---|",
        ]
        for k, v in r["phases"].items():
            lines.append(f"| {k} | {1000 * v:.0f} |")
        top = sum(r["phases"].values())
        lines += [f"| sum of phases | {1000 * top:.0f} |", "", f"Report summary: `{r['summary']}`", ""]
    if profile:
        lines += ["## `analyse` profile (GPT2Model, by own time)", "", "```", profile.strip(), "```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm-head", action="store_true", help="also time GPT2LMHeadModel (tied 50257x768 head)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--write", action="store_true", help="write benchmarks/RESULTS_cpu.md")
    p.add_argument("--profile", action="store_true", help="add a cProfile of analyse")
    a = p.parse_args()
    print(f"fxscale {getattr(fxscale, '__version__', '?')}, torch {torch.__version__}, "
          f"{len(os.sched_getaffinity(0))} CPUs, {cpu_model()}")
    results = [bench(False, a.runs)]
    if a.lm_head:
        results.append(bench(True, a.runs))
    prof = None
    if a.profile:
        m, args = build_model(False)
        prof = profile_analyse(m, args)
    text = render(results, prof)
    print(text)
    if a.write:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_cpu.md")
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

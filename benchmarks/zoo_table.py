"""The external model zoo's results table (tests/test_zoo.py's cases), into benchmarks/RESULTS_cpu.md.

    PYTHONPATH=. .venv/bin/python benchmarks/zoo_table.py [--write] [NAME ...]

For each model and format: SQNR (dB, first output vs float32) of fxscale, linear-only and
per-tensor dynamic scaling, % of weight FLOPs quantised, fallback rows (ops without a rule),
run-time amax reductions, transform wall time, and the test's verdict. The torchvision models
run in the torchvision venv (.venv-tv, ``make zoo-venv``). ``--write`` replaces the zoo section
of RESULTS_cpu.md (between its markers; appended if absent) and leaves the rest of the file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch

from tests import zoo_models as zm
from tests.test_zoo import TV_PYTHON, _xfail

BEGIN, END = "<!-- zoo table: begin (benchmarks/zoo_table.py --write) -->", "<!-- zoo table: end -->"


def verdict(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error'][:80]}"
    bad = []
    if not (r["finite"] and r["shape_ok"]):
        bad.append("non-finite" if not r["finite"] else "shape")
    if r["sqnr"] < r["linear_only"] - 1:
        bad.append("< linear-only - 1")
    if r["sqnr"] < r["dynamic"] - 1:
        bad.append("< dynamic - 1")
    if r["flops_frac"] < 0.8:
        bad.append("< 80% FLOPs")
    return "pass" if not bad else "FAIL: " + ", ".join(bad)


def collect(names: list[str]) -> list[dict]:
    rows = []
    tv = [n for n in names if n in zm.TORCHVISION]
    for name in names:
        if name in tv:
            continue
        if name in zm.REAL and importlib.util.find_spec(zm.REAL[name]) is None:
            rows += [{"model": name, "format": f, "error": f"skipped: {zm.REAL[name]} not installed"} for f in zm.FORMATS]
            continue
        t = time.perf_counter()
        try:
            built = zm.ZOO[name]()
            for fmt in zm.FORMATS:
                rows.append(zm.evaluate(name, fmt, built=built))
        except Exception as e:  # noqa: BLE001  (a row saying so, not a crash of the table)
            rows += [{"model": name, "format": f, "error": f"{type(e).__name__}: {e}"} for f in zm.FORMATS]
        print(f"{name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if tv:
        if TV_PYTHON.exists():
            for r in zm.run_in_venv(str(TV_PYTHON), tv, ROOT):
                rows += [{**r, "format": f} for f in zm.FORMATS] if "error" in r else [r]
        else:
            rows += [{"model": n, "format": f, "error": f"skipped: no torchvision venv at {TV_PYTHON}"}
                     for n in tv for f in zm.FORMATS]
    order = {n: i for i, n in enumerate(names)}
    return sorted(rows, key=lambda r: (order[r["model"]], zm.FORMATS.index(r["format"])))


def _db(v: float) -> str:
    return f"{v:.1f}"


def render(rows: list[dict], wall: float) -> str:
    ok = [r for r in rows if "error" not in r]
    passed = sum(verdict(r) == "pass" for r in ok)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    dev = {r.get("device", "cpu") for r in ok}
    lines = [
        BEGIN,
        "## The external model zoo (issue 14; tests/test_zoo.py, `pytest -m zoo`)",
        "",
        (f"- date: {datetime.date.today()}; machine: {len(os.sched_getaffinity(0))} CPUs ({platform.machine()}), "
        f"device {', '.join(sorted(dev)) or '-'}; load average at the end {load} (shared machine: wall times inflated)"),
        (f"- torch {torch.__version__} (torchvision rows: the torchvision venv's torch 2.14.1 + torchvision 0.29.1); "
        f"command: `PYTHONPATH=. .venv/bin/python benchmarks/zoo_table.py --write` ({wall:.0f} s in all)"),
        ("- SQNR: dB of the first output against the float32 model on the example inputs (token ids with a "
        "right-padded attention mask, pixel values, audio features). linear-only: `fxscale.linear_only_baseline` "
        "(per-tensor dynamic scaling of nn.Linear / nn.Conv operands only, torchao-style); dynamic: "
        "`fxscale.dynamic_baseline` (per-tensor dynamic scaling of every matmul fxscale quantises)."),
        ("- FLOPs q: share of the weight FLOPs (matmuls / convs with a parameter operand: Linear, Conv, "
        "MoE experts; not attention) that run on `fxscale::scaled_*` ops, counted on the transformed graph. "
        "fallbacks: report rows of ops without a rule (count, ops). amax: run-time amax reductions."),
        (f"- **{passed} of {len(ok)} cases pass** the zoo's criteria (finite; SQNR >= linear-only - 1 dB and >= "
        "dynamic - 1 dB; >= 80% of weight FLOPs quantised); xfail: a known failure issue 14's other items fix."),
        "",
        "| model | format | SQNR fxscale | linear-only | dynamic | FLOPs q | fallbacks | amax | transform s | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        x = _xfail(r["model"], r["format"])
        if "error" in r:
            v = r["error"] if r["error"].startswith("skipped") else f"error: {r['error'][:100]}"
            lines.append(f"| {r['model']} | {r['format']} | - | - | - | - | - | - | - | {v}{' (xfail)' if x else ''} |")
            continue
        v = verdict(r)
        if x:
            v += f" (xfail: {x.split(':')[0]})"
        fb = f"{r['n_fallback']} ({', '.join(o.replace('aten.', '') for o in r['fallbacks'])})" if r["n_fallback"] else "0"
        lines.append(
            f"| {r['model']} | {r['format']} | {_db(r['sqnr'])} | {_db(r['linear_only'])} | {_db(r['dynamic'])} | "
            f"{100 * r['flops_frac']:.0f}% | {fb} | {r['runtime_amax']} | {r['transform_s']:.1f} | {v} |"
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def write(section: str) -> str:
    path = os.path.join(ROOT, "benchmarks", "RESULTS_cpu.md")
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help="zoo entries (default: all)")
    p.add_argument("--write", action="store_true", help="replace the zoo section of benchmarks/RESULTS_cpu.md")
    a = p.parse_args()
    names = a.names or list(zm.ZOO)
    warnings.simplefilter("ignore")
    t = time.perf_counter()
    section = render(collect(names), time.perf_counter() - t)
    print(section)
    if a.write:
        print(f"wrote {write(section)}")


if __name__ == "__main__":
    main()

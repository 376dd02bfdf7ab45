"""How many wasted binades e4m3 tolerates: the evidence behind its default requantise threshold.

    PYTHONPATH=. python benchmarks/study_e4m3_threshold.py     (CPU, ~1 min)

1. A ReLU'd activation (Gaussian or Student-t(3) inputs through a random 1024x1024 layer) stored
   in e4m3 with a scale that wastes w binades: SQNR against float64, per w.
2. The test zoo and all-MiniLM-L6-v2 (real weights, if installed) transformed with threshold
   4 / 6 / 8 / 10: SQNR against float32, requantise points and run-time amax reductions.
"""

from __future__ import annotations

import warnings

import torch

import fxscale
from fxscale.formats import get_format
from fxscale.metrics import sqnr_db
from tests import models


def stored_sqnr_rows() -> list[str]:
    f = get_format("e4m3")
    wastes = [0, 4, 6, 8, 10, 12, 14]
    rows = ["| activation | " + " | ".join(f"w={w}" for w in wastes) + " |", "|---|" + "---|" * len(wastes)]
    for dist in ("gaussian", "student-t(3)"):
        h = models.relu_activation(dist)
        amax = float(h.abs().max())
        cells = []
        for w in wastes:
            s = f.scale_for(amax * 2.0**w)
            cells.append(f"{sqnr_db(h, f.cast((h / s).float()).double() * s):.1f}")
        rows.append(f"| relu({dist} @ W) | " + " | ".join(cells) + " |")
    return rows


def model_rows() -> list[str]:
    cases = [(n, *getattr(models, n)()) for n in ("mlp", "encoder_layer", "gpt2", "bert", "llama")]
    try:
        from examples.minilm import load

        m, a, _ = load()
        cases.append(("all-MiniLM-L6-v2 (real weights)", m, a))
    except ImportError:
        pass
    ths = (4.0, 6.0, 8.0, 10.0)
    rows = ["| model | " + " | ".join(f"threshold {t:g}: dB, requantise, run-time amax" for t in ths) + " |",
            "|---|" + "---|" * len(ths)]
    with torch.no_grad():
        for name, m, a in cases:
            ref = models.first_output(m(*a))
            cells = []
            for t in ths:
                sm = fxscale.transform(m, a, threshold=t)
                rq = sum(bool(r["requantise"]) for r in sm.report.rows)
                rt = sum(bool(r.get("runtime_amax")) for r in sm.report.rows)
                cells.append(f"{sqnr_db(ref, models.first_output(sm(*a))):.2f}, {rq}, {rt}")
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    warnings.simplefilter("ignore")
    out = ["e4m3 storage SQNR (dB, vs float64) with w wasted binades:", "", *stored_sqnr_rows(), "",
           "Transformed models (e4m3, SQNR vs float32):", "", *model_rows()]
    print("\n".join(out))


if __name__ == "__main__":
    main()

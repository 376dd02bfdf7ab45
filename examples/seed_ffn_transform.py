"""The seed notebook's FFN, compiled by ``fxscale.transform`` instead of run eagerly.

The seed (``seed/000_f430afa340d192a9.txt``): hidden 1024, 4x, ``randn`` weights, no bias,
``relu(x @ W0) @ W1``, ``x = randn(10, 1024)``, stored in int8. Its matmul rule
``bound_a * bound_b * K`` never overflows but wastes ~7 bits per matmul, and its requantise
came after a cast that had already lost those bits, so int8 collapsed to all zeros.

Here the same FFN goes through ``transform`` in int8 and e4m3, each:
- ``rules="rownorm"`` with requantise points (the default),
- ``rules="rownorm", requantise=False``,
- ``rules="absmax"`` (the seed's rule) with and without requantise points.
SQNR vs float32 on fresh inputs: without requantise points the seed rule collapses in int8.

    .venv/bin/python examples/seed_ffn_transform.py
"""

from __future__ import annotations

import time

import torch
from torch import nn

import fxscale  # noqa: F401  (registers torch.ops.fxscale.*)
from fxscale.api import transform
from fxscale.metrics import sqnr_db

torch.manual_seed(0)
HIDDEN = 1024


class FFN(nn.Module):
    """The seed's FFN in plain float32: ``relu(x @ W0) @ W1``, randn weights, no bias."""

    def __init__(self, hidden_size: int = HIDDEN):
        super().__init__()
        self.W0 = nn.Parameter(torch.randn(hidden_size, 4 * hidden_size))
        self.W1 = nn.Parameter(torch.randn(4 * hidden_size, hidden_size))

    def forward(self, x):  # x: (N, hidden)
        y = nn.functional.relu(x @ self.W0)  # (N, 4 hidden)
        return y @ self.W1  # (N, hidden)


VARIANTS = (
    ("rownorm + requantise (default)", {}),
    ("rownorm, requantise=False", {"requantise": False}),
    ("absmax (seed rule) + requantise", {"rules": "absmax"}),
    ("absmax (seed rule), requantise=False", {"rules": "absmax", "requantise": False}),
)


def main() -> None:
    t_start = time.perf_counter()
    model = FFN().eval()
    x = torch.randn(10, HIDDEN)  # the seed's input (example / calibration)
    x_new = torch.randn(10, HIDDEN)  # fresh inputs of the same distribution
    with torch.no_grad():
        ref = model(x_new)
    print(f"seed FFN {HIDDEN} -> {4 * HIDDEN} -> {HIDDEN}, ReLU, randn weights, no bias; x = randn(10, {HIDDEN})")

    results = []
    for fmt in ("int8", "float8_e4m3fn"):
        for label, kw in VARIANTS:
            sm = transform(model, (x,), format=fmt, **kw)
            rows = sm.report.rows
            req = [r["node"] for r in rows if r.get("requantise")]
            with torch.no_grad():
                y = sm(x_new)
            zeros = float((y == 0).float().mean())
            s = sqnr_db(ref, y)
            results.append((fmt, label, s, req, zeros))
            print(f"\n--- {fmt}, {label}: SQNR {s:.2f} dB, requantise at {req or 'none'}, "
                  f"{100 * zeros:.0f}% of outputs exactly 0")
            if fmt == "int8" and label.startswith(("rownorm + ", "absmax (seed rule), ")):
                print(sm.report)

    print("\nSQNR vs float32 (fresh inputs):")
    print(f"  {'format':<14} {'variant':<40} {'SQNR dB':>8}  {'zeros':>6}  requantise points")
    for fmt, label, s, req, zeros in results:
        print(f"  {fmt:<14} {label:<40} {s:8.2f}  {100 * zeros:5.0f}%  {', '.join(req) or '-'}")
    print(f"\ndone in {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()

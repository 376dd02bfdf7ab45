"""fxscale on a 2-layer ReLU MLP (512 -> 2048 -> 512): what ``make example`` runs.

1. ``fxscale.transform`` in float8 e4m3: print the report (one row per graph node: the
   storage format, the static scale, the proven bound vs what calibration observed).
2. SQNR vs float32 on fresh inputs, next to a per-tensor dynamic-scaling baseline computed
   here (each matmul operand quantised with its own run-time amax, computed in float32).
3. The same in int8, where wasted bits cost resolution: the compiler inserts requantise
   points (a run-time amax fused into the producing matmul), shown in the report.

    .venv/bin/python examples/mlp.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import fxscale  # noqa: F401  (registers torch.ops.fxscale.*)
from fxscale.api import transform
from fxscale.formats import get_format
from fxscale.metrics import sqnr_db

torch.manual_seed(0)
D, H = 512, 2048


class MLP(nn.Module):
    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, x):  # x: (B, D)
        return self.fc2(F.relu(self.fc1(x)))  # (B, H) -> (B, D)


def fake_quant(t: torch.Tensor, dtype: torch.dtype, pow2: bool = False) -> torch.Tensor:
    """Per-tensor dynamic scaling: scale = amax / format max (rounded up to a power of two
    if ``pow2``), round to ``dtype``, back to float32."""
    fmt = get_format(dtype)
    scale = t.abs().amax().clamp_min(1e-30) / fmt.max
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = t / scale
    q = q.round().clamp(-fmt.max, fmt.max).to(dtype) if not dtype.is_floating_point else q.to(dtype)
    return q.to(torch.float32) * scale


def dynamic_baseline(model: MLP, x: torch.Tensor, dtype: torch.dtype, pow2: bool = False) -> torch.Tensor:
    """Each matmul operand (activation and weight) quantised with its own amax; float32 compute."""
    q = lambda t: fake_quant(t, dtype, pow2)
    h = F.relu(F.linear(q(x), q(model.fc1.weight), model.fc1.bias))
    return F.linear(q(h), q(model.fc2.weight), model.fc2.bias)


def run(model: MLP, fmt: str, dtype: torch.dtype, x_cal, x_new) -> None:
    print(f"\n=== fxscale.transform(model, example_inputs, format={fmt!r}) ===")
    t0 = time.perf_counter()
    sm = transform(model, (x_cal,), format=fmt)
    print(f"(transform took {time.perf_counter() - t0:.1f} s)\n")
    print(sm.report)
    requant = [r["node"] for r in sm.report.rows if r.get("requantise")]
    print(f"\nrequantise points the compiler inserted: {requant or 'none'}")
    with torch.no_grad():
        ref = model(x_new)
        y = sm(x_new)
        base = dynamic_baseline(model, x_new, dtype)
        base2 = dynamic_baseline(model, x_new, dtype, pow2=True)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    print(f"SQNR vs float32 on {tuple(x_new.shape)} fresh inputs:")
    print(f"  fxscale {fmt:<14} {sqnr_db(ref, y):6.2f} dB   (static scales; run-time amax only at inputs/requantise points)")
    print(f"  per-tensor dynamic    {sqnr_db(ref, base):6.2f} dB   (amax of every matmul operand at run time)")
    print(f"  ... with pow2 scales  {sqnr_db(ref, base2):6.2f} dB   (same, scale rounded up to a power of two as fxscale does)")


def main() -> None:
    t0 = time.perf_counter()
    model = MLP().eval()
    x_cal = torch.randn(64, D)  # example / calibration inputs
    x_new = torch.randn(256, D)  # fresh inputs, a different batch size
    print(f"MLP {D} -> {H} -> {D} (ReLU), torch {torch.__version__}")
    run(model, "float8_e4m3fn", torch.float8_e4m3fn, x_cal, x_new)
    run(model, "int8", torch.int8, x_cal, x_new)
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()

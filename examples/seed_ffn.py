"""The seed notebook's FFN on eager ScaledTensors, in int8 and float8 e4m3.

relu(x @ W0) -> requantise -> @ W1, hidden 1024 (x: 10 x 1024, W0: 1024 x 4096, randn),
printed next to the float32 result with the SQNR. The seed raised "All-data zero" here: its
worst-case matmul scale (max|a| max|b| K) wasted every int8 bit. fxscale bounds matmuls with
row norms and requantises the float32 accumulator where the bound still wastes more bits
than the format tolerates.

    python examples/seed_ffn.py
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxscale import ScaledTensor, quantise, requantise, wasted_bits
from fxscale.metrics import sqnr_db
from fxscale.scaled import eager_options


class FFN(nn.Module):
    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.W0f = torch.randn(hidden_size, 4 * hidden_size)
        self.W1f = torch.randn(4 * hidden_size, hidden_size)
        self.W0, self.W1 = quantise(self.W0f, dtype), quantise(self.W1f, dtype)

    def forward(self, x: Tensor | ScaledTensor) -> Tensor | ScaledTensor:
        y = F.relu(x @ self.W0)
        if isinstance(y, ScaledTensor):
            print(f"  wasted bits #1: {wasted_bits(y.st.data):.2f}")
            y = requantise(y)
        y = y @ self.W1
        if isinstance(y, ScaledTensor):
            print(f"  wasted bits #2: {wasted_bits(y.st.data):.2f}")
        return y

    def reference(self, x: Tensor) -> Tensor:
        return F.relu(x @ self.W0f) @ self.W1f


def main() -> None:
    torch.manual_seed(0)
    torch.set_printoptions(precision=2, threshold=8, edgeitems=2)
    hidden_size = 1024
    x = torch.randn(10, hidden_size)
    for dtype in (torch.int8, torch.float8_e4m3fn):
        module = FFN(hidden_size, dtype)
        ref = module.reference(x)
        print(f"== {dtype} ==")
        result = module(quantise(x, dtype))
        print("  scaled :", result)
        print("  as f32 :", result.to(torch.float32)[0])
        print("  float32:", ref[0])
        print(f"  SQNR   : {sqnr_db(ref, result.to(torch.float32)):.1f} dB")
        with eager_options(rules="absmax", threshold=math.inf):
            seed = module(quantise(x, dtype))
        print(f"  seed's absmax rule, no requantise: SQNR {sqnr_db(ref, seed.to(torch.float32)):.1f} dB")


if __name__ == "__main__":
    main()

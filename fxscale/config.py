"""The options of :func:`fxscale.transform`, in one frozen dataclass: the one place they are
validated (``transform``, the ``torch.compile`` backend and the eager API all go through it).

>>> TransformConfig(format="int8", input_bounds=3.0).input_bounds
3.0
>>> TransformConfig(format="e4m3", rules="loose")
Traceback (most recent call last):
...
ValueError: rules must be 'rownorm' or 'absmax', got 'loose'
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from .formats import Format, get_format

__all__ = ["RULES", "TransformConfig", "check_rules", "option_names"]

RULES = ("rownorm", "absmax")


def check_rules(rules: str) -> str:
    """``rules`` if it names a rule strength (``"rownorm"`` or ``"absmax"``), else ``ValueError``."""
    if rules not in RULES:
        raise ValueError(f"rules must be 'rownorm' or 'absmax', got {rules!r}")
    return rules


_ON_OVERFLOW = ("raise", "saturate", "requantise", "clamp")
_NONFINITE = ("propagate", "raise")


@dataclass(frozen=True)
class TransformConfig:
    """All options of :func:`transform` (keyword-only there), validated.

    ``format``: storage format of matmul operands (a dtype or name; ``"int8:exact"`` etc. use
    scales of exactly ``amax / max`` instead of powers of two: up to a bit more resolution,
    ~4 dB on an int8 MLP). ``threshold``: projected wasted bits above
    which a requantise goes in (None: the format's default). ``rules``: ``"rownorm"`` (tight,
    default) or ``"absmax"`` (the seed's rule). ``input_bounds``: declared max |x| per
    floating-point input (None: measured at run time), or a pair ``(max |x|, max row norm)``:
    with max |x| alone, row norms can only be bounded by ``sqrt(D) max |x|``, which a matmul's
    Cauchy-Schwarz bound then carries (a 1024->4096 FFN: 5 wasted binades at the hidden layer;
    3.2 with the row norm declared). ``on_overflow``: what an input beyond
    its declared bound does: ``"raise"`` (ValueError), ``"saturate"`` (clamp, warn once) or
    ``"requantise"`` (that call uses run-time input scales) — each a host-side check, one
    reduction and one sync per input per call — or ``"clamp"``: clamp to the bound inside the
    graph, no check, no sync, no warning (for CUDA graphs and decode loops; you opt out of
    hearing about overflows, never into overflowing). ``nonfinite``: NaN/Inf inputs
    ``"propagate"`` to the outputs (default) or ``"raise"``. ``requantise``: False disables
    requantise insertion (for comparison). ``capture``: ``"export"`` or ``"symbolic_trace"``.
    ``fuse_residual``: move residual adds (``x + proj(a)``) into the linear's epilogue
    (``scaled_linear(..., residual=x)``). Off by default: on the H200 GPT-block benchmark it
    ran 1-4% slower and 0.05-0.1 dB less accurate than leaving the add to inductor, which
    fuses it into the following LayerNorm (benchmarks/RESULTS.md).
    ``fuse_siblings``: linears that read the same quantised input (q / k / v, gate / up) run as
    one GEMM over their concatenated weights (passes/sibling_linears.py; weights kept exactly);
    False keeps one GEMM each (for comparison).
    ``dynamic_shapes``: dims besides the batch that may change between calls, each with a declared
    maximum, as torch.export takes them: ``({1: torch.export.Dim("seq", max=2048)},)`` for a
    sequence length. Bounds are proven at the maximum, which holds for every smaller size (a sum
    or a matmul over the sequence grows with it; softmax and attention outputs do not); the
    report says which bounds grow with the maximum; any length up to it runs without a new transform.
    """

    format: Format | str | torch.dtype
    threshold: float | None = None
    rules: str = "rownorm"
    input_bounds: float | tuple[Any, ...] | None = None
    on_overflow: str | None = "raise"
    nonfinite: str = "propagate"
    requantise: bool = True
    capture: str = "export"
    fuse_residual: bool = False
    fuse_siblings: bool = True
    dynamic_shapes: Any = None

    def __post_init__(self):
        object.__setattr__(self, "format", get_format(self.format))  # a dtype or a name: the Format
        if _is_number_tensor(self.input_bounds):  # input_bounds=torch.tensor(2.0): a number
            object.__setattr__(self, "input_bounds", float(self.input_bounds))
        if self.input_bounds is not None and not isinstance(self.input_bounds, (int, float)):
            if isinstance(self.input_bounds, (str, bytes)) or not hasattr(self.input_bounds, "__iter__"):
                raise ValueError(
                    f"input_bounds must be a float, one entry per input, or None, got {self.input_bounds!r}"
                )
            object.__setattr__(self, "input_bounds", tuple(
                tuple(b) if isinstance(b, list) else b for b in self.input_bounds))
        if self.on_overflow is None:
            object.__setattr__(self, "on_overflow", "raise")
        check_rules(self.rules)
        if self.on_overflow not in _ON_OVERFLOW:
            raise ValueError(f"on_overflow must be one of {_ON_OVERFLOW}, got {self.on_overflow!r}")
        if self.nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {self.nonfinite!r}")
        if self.capture not in ("export", "symbolic_trace"):
            raise ValueError(f"capture must be 'export' or 'symbolic_trace', got {self.capture!r}")
        if self.threshold is not None and not (self.threshold >= 0):
            raise ValueError(f"threshold must be >= 0 (bits), got {self.threshold!r}")


def option_names() -> tuple[str, ...]:
    """Every option of :class:`TransformConfig`, by field name (what ``transform`` takes)."""
    return tuple(f.name for f in fields(TransformConfig))


def _is_number_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.numel() == 1 and x.device.type != "meta"

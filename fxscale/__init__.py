"""fxscale: scaled low-precision tensors with compile-time, never-overflow scales.

>>> import torch, fxscale
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
>>> sm = fxscale.transform(model, (torch.randn(8, 64),))
>>> x = torch.randn(4, 64)
>>> fxscale.sqnr_db(model(x), sm(x)) > 20
True
"""

from . import kernels, ops, scaled_ops  # noqa: F401  (registers torch.ops.fxscale.*, device kernels, eager op table)
from .api import TransformConfig, dynamic_baseline, transform
from .audit import audit
from .backend import _register as _register_backend
from .baselines import linear_only_baseline
from .deploy import load, save
from .formats import FORMATS, Format, get_format, wasted_bits
from .metrics import sqnr_db
from .scaled import ScaledTensor, ScaledTensorData, dequantise, quantise, requantise

_register_backend()

__all__ = [
    "FORMATS",
    "Format",
    "ScaledTensor",
    "ScaledTensorData",
    "TransformConfig",
    "audit",
    "dequantise",
    "dynamic_baseline",
    "get_format",
    "linear_only_baseline",
    "load",
    "quantise",
    "requantise",
    "save",
    "sqnr_db",
    "transform",
    "wasted_bits",
]

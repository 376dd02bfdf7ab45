"""fxscale: scaled low-precision tensors with compile-time, never-overflow scales."""

from . import ops  # noqa: F401  (registers torch.ops.fxscale.*)
from .formats import FORMATS, Format, get_format, wasted_bits
from .scaled import ScaledTensor, ScaledTensorData, dequantise, quantise, requantise

__all__ = [
    "transform",
    "TransformConfig",
    "FORMATS", "Format", "get_format", "wasted_bits"]
__all__ += ["ScaledTensor", "ScaledTensorData", "dequantise", "quantise", "requantise"]

from . import kernels  # noqa: E402,F401  (device kernels register themselves where available)
from .api import TransformConfig, transform  # noqa: E402
from .audit import audit  # noqa: E402

"""Device implementations of the ``torch.ops.fxscale.*`` ops.

On a machine with CUDA, :mod:`fxscale.kernels.cuda` registers faster kernels for the CUDA
dispatch key (cuBLAS fp8 through ``torch._scaled_mm``, and Triton kernels where Triton imports),
and :mod:`fxscale.kernels.lowering` how torch.compile lowers them.
Elsewhere nothing is imported and the reference implementations in :mod:`fxscale.ops` serve.
"""

from __future__ import annotations

import torch

CUDA_KERNELS = False

if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines only
    try:
        from . import cuda, lowering  # noqa: F401  (register the kernels and the inductor lowering)
    except Exception as e:  # noqa: BLE001  (never fail import: the references still work)
        import warnings

        warnings.warn(f"fxscale: CUDA kernels not registered ({type(e).__name__}: {e}); "
                      "using the reference implementations", stacklevel=2)
    else:
        CUDA_KERNELS = True

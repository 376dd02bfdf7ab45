"""The GPU-side modules import and register on any machine (their code runs only with CUDA,
so without this a broken import would show first on a GPU)."""

import subprocess
import sys

_SCRIPT = """
import torch, fxscale
from fxscale.kernels import cuda, lowering
assert lowering.lowering_enabled()                 # on by default, hooked into functionalization
assert lowering._relu_cublas_max_m() == 0          # the fused Triton GEMM by default, frozen or not
lowering.set_inductor_lowering(False)
assert not lowering.lowering_enabled()
lowering.set_inductor_lowering(True, relu_cublas_max_m=512, triton_ops=False)
assert lowering._relu_cublas_max_m() == 512 and not lowering._TRITON_OPS
assert callable(cuda.scaled_linear_cuda) and callable(cuda.linear_choice)
assert str(torch.ops.fxscale_kernels.scaled_linear)
try:
    import triton  # noqa: F401
except ImportError:
    pass
else:  # the triton_op registers wherever triton imports
    from fxscale.kernels import triton_ops
    assert str(torch.ops.fxscale_kernels.linear_triton)
print("ok")
"""


def test_cuda_kernel_and_lowering_modules_import_and_switch():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]

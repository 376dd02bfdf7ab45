"""The GPU-side modules import and register on any machine (their code runs only with CUDA,
so without this a broken import would show first on a GPU)."""

import subprocess
import sys

_SCRIPT = """
import torch, fxscale
from torch._inductor import decomposition as dec
from fxscale.kernels import cuda, lowering
op = torch.ops.fxscale.scaled_linear.default
assert dec.decompositions[op] is lowering._scaled_linear_decomposition
assert lowering._relu_cublas_max_m() == 0          # freezing off
with torch._inductor.config.patch(freezing=True):  # what inductor sets while compiling, frozen
    assert lowering._relu_cublas_max_m() == 1024
lowering.set_inductor_lowering(False)
assert op not in dec.decompositions
lowering.set_inductor_lowering(True, relu_cublas_max_m=512)
assert lowering._relu_cublas_max_m() == 512
assert callable(cuda.scaled_linear_cuda) and str(torch.ops.fxscale_kernels.scaled_linear)
print("ok")
"""


def test_cuda_kernel_and_lowering_modules_import_and_switch():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]

"""``fxscale.save`` / ``fxscale.load``: the AOTInductor package of a transformed module (CPU here;
the GPU round trip is in test_triton_ops_gpu.py).

The package must give the transformed module's outputs bit for bit on the CPU (same reference
ops, same order) at batch sizes other than the example's. Compiling the C++ takes ~1-2 minutes
on 2 cores, hence ``slow``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxscale


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()


def test_export_program__batch_is_dynamic_and_ops_stay():
    m, x = _mlp(), torch.randn(8, 64)
    sm = fxscale.transform(m, (x,))
    ep = fxscale.deploy.export_program(sm, (x,))
    assert any(str(n.target).startswith("fxscale.scaled_linear") for n in ep.graph.nodes)
    out = ep.module()(torch.randn(5, 64))
    assert out.shape == (5, 32)


def test_export_program__batch_of_one__says_what_to_do():
    m = _mlp()
    sm = fxscale.transform(m, (torch.randn(1, 64),))
    with pytest.raises(ValueError, match="dynamic_batch"):
        fxscale.deploy.export_program(sm, (torch.randn(1, 64),))


def test_export_program__host_side_bound_check__warns():
    m, x = _mlp(), torch.randn(8, 64)
    sm = fxscale.transform(m, (x,), input_bounds=8.0)  # on_overflow="raise": a host-side check
    with pytest.warns(UserWarning, match="does not check inputs"):
        fxscale.deploy.export_program(sm, (x,))


@pytest.mark.slow
def test_aoti_package__cpu__round_trip_bit_identical(tmp_path):
    m, x = _mlp(), torch.randn(8, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sm = fxscale.transform(m, (x,), input_bounds=8.0, on_overflow="clamp")
    path = fxscale.save(sm, (x,), tmp_path / "mlp.pt2",
                        inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"})
    run = fxscale.load(path)
    # on the CPU the GEMMs are the reference custom op, called from the package
    assert fxscale.deploy.package_custom_ops(path) == ["fxscale::scaled_linear"]
    with torch.no_grad():
        for b in (8, 3, 17):
            xb = torch.randn(b, 64) * 3
            assert torch.equal(run(xb), sm(xb))

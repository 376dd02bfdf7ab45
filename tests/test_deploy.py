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



def test_export_program__keeps_the_dims_declared_to_transform_dynamic():
    """The package took the batch as its only dynamic dim: a model transformed for any sequence
    length up to 32 was packaged at the example's 16, and the package (which checked no input)
    returned 16 rows for 32 or 40 and read past the end of 8 (found by a trial of the README's
    dynamic-length recipe)."""
    from torch.export import Dim

    m, x = _mlp3(), torch.randn(2, 16, 64)
    sm = fxscale.transform(m, (x,), dynamic_shapes=({1: Dim("seq", max=32)},))
    ep = fxscale.deploy.export_program(sm, (x,))
    _b, s = (d.node.expr for d in next(n for n in ep.graph.nodes if n.op == "placeholder" and "val" in n.meta
                                      and n.meta["val"].dim() == 3).meta["val"].shape[:2])
    assert ep.range_constraints[s].upper == 32 and ep.range_constraints[s].lower <= 2
    for shape in ((1, 8, 64), (3, 32, 64)):
        xb = torch.randn(shape)
        assert torch.equal(ep.module()(xb), sm(xb))
    with pytest.raises(ValueError, match="dynamic_batch=False"):  # the batch fixed at 1 cannot be made dynamic
        fxscale.deploy.export_program(fxscale.transform(m, (x[:1],)), (x[:1],))


def test_export_program__a_dict_example_is_put_in_forwards_positions():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)

        def forward(self, x, mask=None, y=None):
            return self.a(x) + self.b(y)

    m, x, y = Two().eval(), torch.randn(4, 64), torch.randn(4, 64)
    sm = fxscale.transform(m, {"x": x, "y": y})
    assert fxscale.deploy.example_args(sm, {"y": y, "x": x})[1] is None
    ep = fxscale.deploy.export_program(sm, {"y": y, "x": x})
    assert torch.equal(ep.module()(x, None, y), sm(x=x, y=y))


@pytest.mark.slow
def test_aoti_package__checks_input_sizes_and_runs_the_declared_range(tmp_path):
    from torch.export import Dim

    m, x = _mlp3(), torch.randn(2, 16, 64)
    sm = fxscale.transform(m, (x,), dynamic_shapes=({1: Dim("seq", max=32)},))
    run = fxscale.load(fxscale.save(sm, (x,), tmp_path / "seq.pt2",
                                   inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"}))
    with torch.no_grad():
        for shape in ((2, 16, 64), (1, 8, 64), (3, 32, 64), (2, 1, 64)):
            xb = torch.randn(shape)
            assert torch.equal(run(xb), sm(xb)), shape
        with pytest.raises(ValueError, match=r"input 0 \(by position\): dim value is too large at 1.*<= 32.*40"):
            run(torch.randn(2, 40, 64))
        with pytest.raises(ValueError, match="x.contiguous()"):
            run(torch.randn(2, 64, 8).transpose(1, 2))
        with pytest.raises(ValueError, match="dtype"):
            run(torch.randn(2, 8, 64, dtype=torch.float64))


def _mlp3():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).eval()

def test_load__imports_the_output_classes_a_package_returns():
    """A package of a transformers model returns its ModelOutput, which torch rebuilds only once
    its module is imported (a fresh process that ran ``fxscale.load`` got ``Deserializing
    transformers.modeling_outputs.ImageClassifierOutput in pytree is not registered`` at the first
    call; found by a new-user trial): the spec a package holds loads in a fresh process."""
    import subprocess
    import sys

    pytest.importorskip("transformers")
    make = ("import torch; from torch.utils import _pytree as p; from transformers.modeling_outputs import "
            "ImageClassifierOutput as O; print(p.treespec_dumps(p.tree_flatten(O(logits=torch.zeros(1)))[1]))")
    spec = subprocess.run([sys.executable, "-c", make], check=True, capture_output=True, text=True).stdout.strip()
    use = ("import sys, fxscale.deploy as d; assert 'transformers' not in sys.modules; "
           f"d._import_pytree_types({spec!r}); print('transformers.modeling_outputs' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", use], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_save__a_wrapped_llm_says_it_is_not_packaged():
    """fxscale.save(flm, ...) failed inside a nested export with 'Constraints violated'."""
    from fxscale.llm import FxscaleCausalLM

    fake = FxscaleCausalLM.__new__(FxscaleCausalLM)
    with pytest.raises(TypeError, match=r"FxscaleCausalLM \(fxscale.llm.wrap\).*Run it in Python"):
        fxscale.deploy.export_program(fake, (torch.zeros(2, 4, dtype=torch.long),))

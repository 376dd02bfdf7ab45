"""passes.capture: the whole zoo captures, runs like the model, at other batch sizes too."""

import warnings

import pytest
import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.utils import _pytree as pytree

from passes.capture import CaptureError, capture
from tests import models


def _assert_same(out, ref):
    assert type(out) is type(ref)
    a, b = pytree.tree_leaves(out), pytree.tree_leaves(ref)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(models.ZOO))
def test__capture__zoo_matches_model_at_example_and_other_batch(name):
    model, args = models.ZOO[name]()
    gm = capture(model, args)
    assert isinstance(gm, torch.fx.GraphModule)
    with torch.no_grad():
        _assert_same(gm(*args), model(*args))
        other = models.with_batch(name, 3)
        _assert_same(gm(*other), model(*other))
    for n in gm.graph.nodes:
        assert "val" in n.meta, n.format_node()
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert not is_concrete_int(phs[0].meta["val"].shape[0])  # dynamic batch
    assert any(n.op == "get_attr" for n in gm.graph.nodes)  # params unlifted
    assert all(isinstance(n.target, torch._ops.OpOverload) or n.target.__module__ in ("_operator", "operator")
               for n in gm.graph.nodes if n.op == "call_function")  # ATen level


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test__capture__symbolic_trace_has_vals_and_matches(name):
    model, args = models.ZOO[name]()
    gm = capture(model, args, method="symbolic_trace")
    with torch.no_grad():
        torch.testing.assert_close(gm(*args), model(*args))
    for n in gm.graph.nodes:
        assert "val" in n.meta, n.format_node()
    assert [n for n in gm.graph.nodes if n.op == "call_module"]


def test__capture__restores_training_mode_and_graph_runs_in_eval():
    model, args = models.encoder_layer()
    model.train()
    gm = capture(model, args)
    assert model.training
    assert all(m.training for m in model.modules())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(*args), model(*args))  # no dropout in the graph


@pytest.mark.parametrize("method", ["export", "symbolic_trace"])
def test__capture__restores_each_submodules_own_mode(method):
    """A training-mode wrapper around a model in eval (how keyword inputs are often passed):
    every submodule keeps its own flag, so the user's float model keeps its dropout off."""
    inner = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    outer = nn.Sequential(inner, nn.ReLU())
    outer.training = True  # the wrapper alone in training mode
    before = {n: m.training for n, m in outer.named_modules()}
    capture(outer, (torch.randn(2, 4),), method=method)
    assert {n: m.training for n, m in outer.named_modules()} == before


def test__capture__symbolic_trace_does_not_leave_user_model_in_eval():
    model, args = models.mlp()
    model.train()
    gm = capture(model, args, method="symbolic_trace")
    assert model.training and not gm.training


def test__capture__gpt2_with_use_cache_is_captured_without_the_cache():
    model, args = models.gpt2(use_cache=True)
    with pytest.warns(UserWarning, match="use_cache=False"):
        gm = capture(model, args)
    assert model.config.use_cache is True
    torch.testing.assert_close(gm(*args).logits, model(*args).logits, rtol=1e-5, atol=1e-5)


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: export cannot capture it
            return x
        return -x


def test__capture__failure_names_the_line_and_what_to_try():
    with pytest.raises(CaptureError) as ei:
        capture(_DataDependent(), (torch.randn(3, 4),))
    msg = str(ei.value)
    assert "_DataDependent" in msg
    assert "if x.sum() > 0" in msg
    assert 'torch.compile(model, backend="fxscale")' in msg
    assert 'capture="symbolic_trace"' in msg


class _FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1) * 2  # hard-codes the batch size


def test__capture__static_batch_warns():
    with pytest.warns(UserWarning, match="other batch sizes will fail"):
        gm = capture(_FixedBatch(), (torch.randn(2, 4),))
    torch.testing.assert_close(gm(torch.ones(2, 4)), torch.full((2, 4), 2.0))


def test__capture__dynamic_batch_false_is_static_without_warning():
    model, args = models.mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = capture(model, args, dynamic_batch=False)
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert ph.meta["val"].shape[0] == 4


def test__capture__bad_arguments():
    model, args = models.mlp()
    with pytest.raises(ValueError, match="unknown capture method"):
        capture(model, args, method="jit")
    with pytest.raises(TypeError, match="nn.Module"):
        capture(lambda x: x, args)
    gm = capture(model, args[0])  # a bare tensor is accepted
    assert gm(*args).shape == (4, 16)


@torch.no_grad()
def test__varargs_forward__gets_a_matching_dynamic_batch():
    """``forward(self, *args)``: export matches dynamic_shapes to the signature (one tuple
    for ``*args``); a spec per argument failed, and capture fell back to a static batch."""
    import fxscale

    class VarArgs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 8)

        def forward(self, *args):
            return self.lin(args[0]) + args[1]

    m = VarArgs().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no static-batch warning blaming the model
        sm = fxscale.transform(m, (torch.randn(4, 16), torch.randn(4, 8)))
    x, b = torch.randn(7, 16), torch.randn(7, 8)
    assert fxscale.sqnr_db(m(x, b), sm(x, b)) > 20.0


def test__static_batch_guard__error_says_the_batch_was_fixed():
    import fxscale

    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 8)

        def forward(self, x):
            return self.lin(x.reshape(4, 16))

    with pytest.warns(UserWarning, match="specialised"):
        sm = fxscale.transform(FixedBatch(), (torch.randn(4, 16),))
    with pytest.raises(ValueError, match="batch dimension .dim 0. of this input was fixed"):
        sm(torch.randn(5, 16))


def test__capture__a_broadcast_argument_of_shape_1_is_not_a_specialised_batch():
    class M(nn.Module):
        def forward(self, x, s):
            return x * s

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = capture(M(), (torch.randn(2, 4), torch.tensor([0.5])))
    torch.testing.assert_close(gm(torch.ones(5, 4), torch.tensor([2.0])), torch.full((5, 4), 2.0))

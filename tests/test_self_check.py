"""The compiler checks itself (DESIGN decision 11, issue 11): at transform time every node with
a proven bound is compared with what calibration observed; a bound below the observation is a
compiler bug and raises, naming the node, the op and the rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxscale.api import transform
from fxscale.bound import Bound
from fxscale.rules.registry import RULES, Rule
from passes.requantise import SelfCheckError

aten = torch.ops.aten


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _too_small(c):
    return Bound(1e-3)


@pytest.mark.parametrize("declared", [None, 10.0])
def test_self_check__an_unsound_rule_raises_naming_node_op_and_rule(monkeypatch, declared):
    monkeypatch.setitem(RULES, aten.relu.default, Rule(_too_small, False))
    with pytest.raises(SelfCheckError) as e:
        transform(_mlp(), (torch.randn(4, 8),), input_bounds=declared)
    msg = str(e.value)
    assert "%relu" in msg and "aten.relu" in msg and "_too_small" in msg and "max |x|" in msg


def test_self_check__sound_rules_pass_on_the_zoo_examples():
    from . import models

    for name in ("mlp", "cnn", "encoder_layer"):
        model, args = models.ZOO[name]()
        transform(model, args, calibration=[models.with_batch(name, 3)])


def test_self_check__skips_what_an_example_beyond_its_declared_bound_reaches(monkeypatch):
    """The proof assumes the declared bound: an example beyond it says nothing about the rules."""
    sm = transform(_mlp(), (torch.full((4, 8), 5.0),), input_bounds=1.0)
    with pytest.raises(ValueError, match="declared bound"):
        sm(torch.full((4, 8), 5.0))

"""Every rule against PyTorch's own kernels (issue 11): each op runs in float32 and bfloat16 as
the kernel computes it (rounding included, not in float64), on inputs of magnitude 2^-30 to
2^30 (random, every element at the bound, spikes, rows a few ulps from a constant), and no
field of the rule's bound may fall below the kernel's output."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_map

from fxscale.bound import Bound
from fxscale.rules import Arg, evaluate

from .test_rules import FIELDS, true_stats

aten = torch.ops.aten
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
KINDS = ("randn", "bound", "spike", "flat")


def _make(shape, kind, g, mag, dtype):
    if kind == "randn":
        t = torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "bound":
        t = torch.randint(0, 2, shape, generator=g).to(torch.float64) * 2 - 1
    elif kind == "spike":
        t = torch.zeros(shape, dtype=torch.float64).flatten()
        t[int(torch.randint(0, t.numel(), (1,), generator=g))] = 1.0
        t = t.reshape(shape)
    else:  # near-constant rows: a constant plus a few ulps of the compute dtype
        t = 1.3 + 2.0**-22 * torch.randint(-3, 4, shape, generator=g).to(torch.float64)
    return (t * mag).to(dtype)


def _op_cases(g, mag, kind, dtype):
    """(aten op, args, kwargs) with tensors in ``dtype``."""
    def m(*shape, k=kind, scale=1.0):
        return _make(shape, k, g, mag * scale, dtype)

    w = _make((6, 5), "randn", g, 1.0, dtype)
    return [
        (aten.mm.default, (m(4, 5), m(5, 3)), {}),
        (aten.bmm.default, (m(2, 4, 5), m(2, 5, 3)), {}),
        (aten.linear.default, (m(4, 5), w, _make((6,), "randn", g, mag, dtype)), {}),
        (aten.addmm.default, (m(3), m(4, 5), m(5, 3)), {}),
        (aten.add.Tensor, (m(4, 5), m(4, 5)), {"alpha": -2}),
        (aten.mul.Tensor, (m(4, 5), m(1, 5)), {}),
        (aten.div.Tensor, (m(4, 5), 3.0), {}),
        (aten.relu.default, (m(4, 5),), {}),
        (aten.gelu.default, (m(4, 5),), {}),
        (aten.silu.default, (m(4, 5),), {}),
        (aten.tanh.default, (m(4, 5),), {}),
        (aten.sigmoid.default, (m(4, 5),), {}),
        (aten.erf.default, (m(4, 5),), {}),
        (aten.elu.default, (m(4, 5), 1.0, 1.0, 1.0), {}),
        (aten.hardtanh.default, (m(4, 5), -1.0, 1.0), {}),
        (aten._softmax.default, (m(4, 5), -1, False), {}),
        (aten.layer_norm.default, (m(4, 16), [16], _make((16,), "randn", g, 1.0, dtype), None, 1e-5), {}),
        (aten.layer_norm.default, (m(4, 64), [64], None, None, 1e-12), {}),
        (aten.rms_norm.default, (m(4, 16), [16], None, 1e-6), {}),
        (aten.scaled_dot_product_attention.default, (m(1, 2, 4, 8), m(1, 2, 6, 8), m(1, 2, 6, 8)), {}),
        (aten.mean.dim, (m(4, 5), [-1]), {}),
        (aten.sum.dim_IntList, (m(4, 5), [-1]), {}),
        (aten.avg_pool2d.default, (m(1, 2, 6, 6), [2, 2], [2, 2], [0, 0], False, True, 1), {}),
        (aten.max_pool2d.default, (m(1, 2, 6, 6), [2, 2]), {}),
        (aten.conv2d.default, (m(1, 3, 6, 6), _make((4, 3, 3, 3), "randn", g, 1.0, dtype), None), {}),
        (aten.cat.default, ([m(4, 5), m(4, 3)], -1), {}),
        (aten.transpose.int, (m(2, 4, 5), -1, -2), {}),
        (aten.view.default, (m(4, 6), [4, 2, 3]), {}),
        (aten.slice_scatter.default, (m(4, 6), m(4, 2, scale=3.0), 1, 0, 2), {}),
        (aten.fill.Scalar, (m(4, 5), 3.0 * mag), {}),
    ]


def _arg(x):
    return Arg(Bound.of_tensor(x), tuple(x.shape)) if isinstance(x, torch.Tensor) else x


@SETTINGS
@given(log2_mag=st.integers(-30, 30), kind=st.sampled_from(KINDS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_rules__bound_the_float32_and_bf16_kernels(log2_mag, kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mag = 2.0**log2_mag
    for op, args, kwargs in _op_cases(g, mag, kind, dtype):
        out = op(*args, **kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        rargs, rkwargs = tree_map(_arg, args), tree_map(_arg, kwargs)
        bounds = evaluate(op, rargs, rkwargs, [tuple(o.shape) for o in outs])
        for o, b in zip(outs, bounds):
            assert b is not None, op
            true = true_stats(o)
            for f in FIELDS:
                got = float(getattr(b, f))
                assert got >= true[f] or (math.isnan(true[f])), (
                    f"{op} {dtype} 2^{log2_mag} {kind}: bound {f}={got:.6g} < kernel's {true[f]:.6g}")

"""``fxscale.transform``: capture, calibrate, prove bounds, place requantises, lower, report.

>>> import torch, fxscale
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
>>> sm = fxscale.transform(model, (torch.randn(8, 64),))
>>> y = sm(torch.randn(3, 64))          # other batch sizes work
>>> y.shape, y.dtype
(torch.Size([3, 64]), torch.float32)
>>> print(sm.report)                     # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from .config import TransformConfig
from .formats import Format, get_format
from .module import ScaledGraphModule
from .nodeinfo import META_KEY

__all__ = ["ScaledGraphModule", "TransformConfig", "transform"]

def _freeze(gm: fx.GraphModule) -> None:
    """Inference only: the parameters left in high precision become buffers (no autograd).

    They are the transformed module's own copies (capture made them), so
    ``torch.compile`` of the result needs no backward formulas for the fxscale ops.
    """
    for name, p in list(gm.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        mod = gm.get_submodule(mod_name) if mod_name else gm
        del mod._parameters[attr]
        mod.register_buffer(attr, p.detach())


#: Fused ops that hide matmuls from fxscale (PyTorch's inference fast paths).
_HIDING = ("_transformer_encoder_layer_fwd", "_native_multi_head_attention")


def _warn_if_nothing_quantised(rows: list, name: str) -> None:
    """Warn, with the reasons, where a graph with matmul-like ops (or fused ops that hide them)
    ends up with nothing quantised: no silent float32."""
    if any(ni.computes is not None for _, ni in rows):  # the lowering wrote what a matmul computes on
        return
    why = [f"{n}: {ni.note or 'high precision'}" for n, ni in rows if ni.precision is not None]
    why += [f"{n}: {ni.note}" for n, ni in rows if ni.kind == "fallback" and any(h in ni.op for h in _HIDING)]
    if why:
        more = f"; and {len(why) - 4} more" if len(why) > 4 else ""
        warnings.warn(f"fxscale quantised nothing in {name} ({len(rows)} nodes), which runs in high precision: "
                      + "; ".join(why[:4]) + more, stacklevel=3)


def transform(
    model: nn.Module,
    example_inputs: Any,
    *,
    format: str | torch.dtype | Format = torch.float8_e4m3fn,
    threshold: float | None = None,
    calibration: Sequence[Any] | None = None,
    input_bounds: float | Sequence[float | None] | None = None,
    on_overflow: str | None = None,
    rules: str = "rownorm",
    capture: str = "export",
    requantise: bool = True,
    nonfinite: str = "propagate",
    fuse_residual: bool = False,
    fuse_siblings: bool = True,
    dynamic_shapes: Any = None,
) -> ScaledGraphModule:
    """Compile ``model`` to scaled low-precision ops with proven, never-overflow scales.

    Returns a :class:`ScaledGraphModule` whose outputs have the structure and dtype of
    ``model(*example_inputs)``; ``sm.report`` is the per-node table. See
    :class:`TransformConfig` for the options. ``calibration`` is a list of further input
    tuples, used (with ``example_inputs``) only to project wasted bits.
    """
    import passes

    if not hasattr(passes, "PIPELINE"):  # another distribution's top-level ``passes`` shadows ours
        raise ImportError(
            f"the 'passes' package imported from {getattr(passes, '__file__', '?')} is not fxscale's compiler; "
            "uninstall the other package named 'passes' or put fxscale's source tree first on sys.path"
        )

    from passes.input_names import forward_signature

    _warn_if_autocast()
    if (isinstance(input_bounds, tuple) and len(input_bounds) == 2 and all(isinstance(v, (int, float)) for v in input_bounds)
            and sum(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(example_inputs)) == 1):
        input_bounds = [input_bounds]  # one input: the tuple is its (max |x|, max row norm); a list is per input
    orig = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(orig, nn.Module):
        model = orig  # torch.compile(m): its forward is (*args, **kwargs); m's is the one to capture
    cfg = TransformConfig(
        format=format,
        threshold=threshold,
        rules=rules,
        input_bounds=input_bounds,
        on_overflow=on_overflow,
        nonfinite=nonfinite,
        requantise=requantise,
        capture=capture,
        fuse_residual=fuse_residual,
        fuse_siblings=fuse_siblings,
        dynamic_shapes=dynamic_shapes,
    )
    c = passes.run(model, example_inputs, cfg, calibration=calibration, until="calibrate")
    # on_overflow="requantise": the same graph, analysed without the declared bounds, runs the
    # calls whose inputs exceed them (captured and calibrated once, for both).
    fork = None
    if cfg.input_bounds is not None and cfg.on_overflow == "requantise":
        fork = passes.fork(c, replace(cfg, input_bounds=None))
    passes.resume(c)
    _freeze(c.gm)
    _warn_if_nothing_quantised([(n.name, n.meta[META_KEY]) for n in c.gm.graph.nodes if META_KEY in n.meta],
                               type(model).__name__)
    dynamic = None
    if c.input_bounds and fork is not None:
        dynamic = passes.resume(fork).gm
    sm = ScaledGraphModule(c.gm, cfg, input_bounds=c.input_bounds, inputs=[p.name for p in c.placeholders],
                           dynamic=dynamic, pass_times=c.times, signature=forward_signature(model), positional=len(c.example_inputs),
                           input_specs=[_input_spec(p) for p in c.placeholders])
    if c.input_bounds and cfg.on_overflow == "raise":
        _check_examples(sm, c.example_inputs)
    return sm


def _warn_if_autocast() -> None:
    """Under torch.autocast the captured graph holds autocast's casts: the transformed module
    computes (and returns) those dtypes at every call, under autocast or not; and autocast at call
    time does not change it (found by a user trial)."""
    on = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    if on:
        warnings.warn(
            f"fxscale.transform under torch.autocast ({', '.join(on)}, {torch.get_autocast_dtype(on[0])}): its casts are "
            "part of the transformed graph, which returns their dtypes at every call, with autocast or without. "
            "Transform outside autocast for the model's own dtypes (autocast at call time does not change a "
            "transformed module either: it runs the precision it was transformed for).",
            stacklevel=3,
        )


def _check_examples(sm, example_inputs: tuple) -> None:
    """A declared bound the example itself breaks: said at transform time (a warning: an example
    may be random data for the shapes), not only at the first call."""
    from .module import _check_inputs

    try:
        _check_inputs(sm, example_inputs, {})
    except ValueError as e:
        warnings.warn(f"the example inputs break their declared bounds: {e}. Calls with such inputs will raise "
                      "(on_overflow='raise'); check input_bounds", stacklevel=3)


def _input_spec(p: fx.Node) -> tuple[str, int | None, tuple | None, torch.dtype | None]:
    """``(name, rank, shape, dtype)`` of a graph input's example (None for a non-tensor input)."""
    v = p.meta.get("val")
    if not isinstance(v, Tensor):
        return (p.name, None, None, None)
    return (p.name, v.dim(), tuple(int(d) if isinstance(d, int) else str(d) for d in v.shape), v.dtype)




def dynamic_baseline(model: nn.Module, example_inputs: Any, *, format: str | torch.dtype | Format = torch.float8_e4m3fn):
    """The comparison point: per-tensor *dynamic* scaling of the matmuls fxscale quantises.

    Returns a function that runs ``model`` with each matmul-like op's operands quantised to
    ``format`` with their own run-time amax (power-of-two scale) and computed in float32:
    what fxscale's static scales are measured against (``torch.compile``-free, CPU-friendly).
    The matmuls the precision pass keeps in high precision (``passes.precision``: a rotary
    embedding's ``inv_freq @ positions``, an outer product) stay in high precision here too,
    decided on ``example_inputs``.

    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> run = dynamic_baseline(model, (torch.randn(2, 16),))
    >>> run(torch.randn(3, 16)).shape
    torch.Size([3, 4])
    """
    from passes.bounds import operand_positions
    from passes.calibrate import calibrate
    from passes.capture import capture as capture_graph
    from passes.fold import fold
    from passes.functionalise import functionalise
    from passes.precision import decide

    fmt = get_format(format)
    from passes.input_names import example_args

    args = example_args(model, example_inputs)
    gm = capture_graph(model, args)
    functionalise(gm)
    fold(gm)
    calibrate(gm, [args])
    decide(gm, fmt)
    quantised = {n.name: operand_positions(n) for n in gm.graph.nodes if n.op == "call_function"}

    def fake_quant(t: Tensor) -> Tensor:
        s = fmt.scale_for(float(t.detach().abs().max()) if t.numel() else 0.0)
        return (fmt.cast(t.float() / s).float() * s).to(t.dtype)

    class _Dynamic(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            positions = quantised.get(n.name)
            if not positions:
                return super().run_node(n)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            args = tuple(fake_quant(a) if i in positions and isinstance(a, Tensor) else a for i, a in enumerate(args))
            return getattr(self, n.op)(n.target, args, kwargs)

    def run(*inputs, **kwargs):
        # The Interpreter flattens inputs and rebuilds the output structure (the graph's codegen).
        return _Dynamic(gm).run(*pytree.tree_leaves((inputs, kwargs)))

    return run

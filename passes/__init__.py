"""The compiler: an ordered list of passes over one captured ATen graph, and :func:`run`.

Each pass is one file with one job; it reads and writes the :class:`Compilation` below (the
graph, and what earlier passes left on it) and nothing else:

============= ==================== ============================================================
pass          file                 job
============= ==================== ============================================================
capture       capture.py           model -> ATen ``GraphModule`` (``torch.export``), shapes in
                                   ``node.meta["val"]``; no-grad / autocast-off regions inlined
                                   (inline_regions.py)
functionalise functionalise.py     in-place ops (``relu_``, ``add_``, ...) -> out-of-place, where safe
fold          fold.py              shape ops on constants (``weight.T``) -> constants
calibrate     calibrate.py         observed ``(max |x|, max row norm)`` of every float node
precision     precision.py         which matmuls may compute on low-precision operands: each
                                   consumer's tolerated error, walked backwards (DESIGN 9)
analyse       requantise.py        proven bounds for every node (the dataflow of bounds.py,
                                   rules from :mod:`fxscale.rules`), weights quantised once,
                                   requantise points placed
lower         lower.py             rewrite into ``torch.ops.fxscale.*`` calls, fuse epilogues
============= ==================== ============================================================

The wall time of each pass is recorded in :attr:`Compilation.times` (seconds, by name).

>>> import torch
>>> from fxscale.config import TransformConfig
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU())
>>> c = run(model, (torch.randn(4, 16),), TransformConfig(format="e4m3"))
>>> list(c.times) == [p.name for p in PIPELINE]
True
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx, nn

from fxscale.config import TransformConfig
from fxscale.nodeinfo import META_KEY
from fxscale.runtime import Analysis

__all__ = ["PIPELINE", "Compilation", "Pass", "fork", "resume", "run"]


@dataclass
class Compilation:
    """What the pipeline works on, filled in pass by pass."""

    model: nn.Module
    example_inputs: tuple
    config: TransformConfig
    batches: list[tuple]                        # example_inputs + calibration batches
    gm: fx.GraphModule | None = None            # capture
    placeholders: list[fx.Node] = field(default_factory=list)      # capture
    input_bounds: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # analyse
    analysis: Analysis | None = None            # analyse
    times: dict[str, float] = field(default_factory=dict)           # pass name -> wall seconds


@dataclass(frozen=True)
class Pass:
    """One step of the pipeline: ``fn(compilation)`` reads and writes what ``doc`` says."""

    name: str
    fn: Callable[[Compilation], None]
    doc: str


def _capture(c: Compilation) -> None:
    from .capture import capture

    c.gm = capture(c.model, c.example_inputs, method=c.config.capture, dynamic_shapes=c.config.dynamic_shapes)
    c.placeholders = [n for n in c.gm.graph.nodes if n.op == "placeholder"]
    if c.config.dynamic_shapes is not None:
        from .bounds import check_maxima

        check_maxima(c.placeholders)


def _functionalise(c: Compilation) -> None:
    from .functionalise import functionalise

    functionalise(c.gm)


def _layer_norm(c: Compilation) -> None:
    from .layer_norm import group_norm_as_layer_norm, two_pass_layer_norm

    group_norm_as_layer_norm(c.gm)
    two_pass_layer_norm(c.gm)


def _fold(c: Compilation) -> None:
    from .fold import fold

    fold(c.gm)


def _calibrate(c: Compilation) -> None:
    from .calibrate import calibrate

    calibrate(c.gm, c.batches)


def _precision(c: Compilation) -> None:
    from .precision import decide

    decide(c.gm, c.config.format)


def _analyse(c: Compilation) -> None:
    from .bounds import input_bounds_by_name, mark_growing
    from .requantise import analyse

    cfg = c.config
    c.input_bounds = input_bounds_by_name(c.placeholders, cfg.input_bounds)
    c.analysis = analyse(c.gm, fmt=cfg.format, mode=cfg.rules, threshold=cfg.threshold,
                         input_bounds=c.input_bounds, requantise=cfg.requantise)
    mark_growing(c.gm, c.analysis)


def _lower(c: Compilation) -> None:
    from .lower import lower

    lower(c.gm, c.analysis, fuse_residual=c.config.fuse_residual, fuse_siblings=c.config.fuse_siblings)


#: The passes, in the order :func:`run` applies them.
PIPELINE: list[Pass] = [
    Pass("capture", _capture, "model -> ATen GraphModule; writes gm, placeholders"),
    Pass("functionalise", _functionalise, "in-place ops -> out-of-place where nothing else sees the storage"),
    Pass("layer_norm", _layer_norm,
         "aten.group_norm -> a LayerNorm per group; aten.layer_norm -> fxscale.layer_norm (two passes: its bound is proven)"),
    Pass("fold", _fold, "shape ops on parameters / buffers -> new constants (weights quantised once)"),
    Pass("calibrate", _calibrate, "runs the batches; writes info(node).observed"),
    Pass("precision", _precision, "tolerated error per value; writes info(node).demand, .precision, .precision_why"),
    Pass("analyse", _analyse, "bounds, weight quantisation, requantise placement; writes input_bounds, analysis"),
    Pass("lower", _lower, "rewrites gm into torch.ops.fxscale.* calls and fuses epilogues"),
]


def run(
    model: nn.Module,
    example_inputs: Any,
    config: TransformConfig,
    *,
    calibration: Sequence[Any] | None = None,
    passes: Sequence[Pass] | None = None,
    until: str | None = None,
) -> Compilation:
    """Apply ``passes`` (default: :data:`PIPELINE`) to ``model``; returns the :class:`Compilation`
    with the lowered graph in ``gm`` and each pass's wall time in ``times``. ``until``: stop
    after the pass of that name (:func:`resume` runs the rest)."""
    from .input_names import example_args

    args = example_args(model, example_inputs)
    batches = [example_args(model, b, "a calibration batch") for b in (calibration or [])]
    c = Compilation(model, args, config, [args, *batches])
    return resume(c, passes, until=until)


def resume(c: Compilation, passes: Sequence[Pass] | None = None, *, until: str | None = None) -> Compilation:
    """Apply the passes of ``passes`` (default: :data:`PIPELINE`) that ``c`` has not run yet."""
    todo = [p for p in (PIPELINE if passes is None else passes) if p.name not in c.times]
    if until is not None and until not in [p.name for p in todo]:
        raise ValueError(f"no pass named {until!r} left to run; passes: {[p.name for p in todo]}")
    for p in todo:
        t0 = time.perf_counter()
        p.fn(c)
        c.times[p.name] = time.perf_counter() - t0
        if p.name == until:
            break
    return c


def fork(c: Compilation, config: TransformConfig) -> Compilation:
    """A copy of ``c`` (captured and calibrated, not analysed) to finish under another
    ``config``: the graph deep-copied with its parameters and buffers shared, each node's
    record copied, so the two compilations go on independently. ``transform`` uses it for
    ``on_overflow="requantise"`` (the same model with run-time input scales) instead of
    capturing and calibrating twice.
    """
    if "analyse" in c.times:
        raise ValueError("fork a compilation before its analyse pass (run(..., until='calibrate'))")
    shared = {id(t): t for t in [*c.gm.parameters(), *c.gm.buffers()]}
    gm = copy.deepcopy(c.gm, memo=shared)
    for n in gm.graph.nodes:  # meta is copied shallowly: give the copy its own records
        rec = n.meta.get(META_KEY)
        if rec is not None:
            n.meta[META_KEY] = replace(rec, reasons=list(rec.reasons))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return Compilation(c.model, c.example_inputs, config, c.batches, gm, placeholders, times=dict(c.times))


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

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from .formats import Format, get_format
from .nodeinfo import info

__all__ = ["ScaledGraphModule", "TransformConfig", "transform"]

_ON_OVERFLOW = ("raise", "saturate", "requantise", "clamp")
_NONFINITE = ("propagate", "raise")


@dataclass(frozen=True)
class TransformConfig:
    """All options of :func:`transform` (keyword-only there), validated.

    ``format``: storage format of matmul operands (a dtype or name; ``"int8:exact"`` etc. use
    scales of exactly ``amax / max`` instead of powers of two: up to a bit more resolution,
    ~4 dB on an int8 MLP). ``threshold``: projected wasted bits above
    which a requantise goes in (None: the format's default). ``rules``: ``"rownorm"`` (tight,
    default) or ``"absmax"`` (the seed's rule). ``input_bounds``: declared max |x| per
    floating-point input (None: measured at run time), or a pair ``(max |x|, max row norm)``:
    with max |x| alone, row norms can only be bounded by ``sqrt(D) max |x|``, which a matmul's
    Cauchy-Schwarz bound then carries (a 1024->4096 FFN: 5 wasted binades at the hidden layer;
    3.2 with the row norm declared). ``on_overflow``: what an input beyond
    its declared bound does: ``"raise"`` (ValueError), ``"saturate"`` (clamp, warn once) or
    ``"requantise"`` (that call uses run-time input scales) — each a host-side check, one
    reduction and one sync per input per call — or ``"clamp"``: clamp to the bound inside the
    graph, no check, no sync, no warning (for CUDA graphs and decode loops; you opt out of
    hearing about overflows, never into overflowing). ``nonfinite``: NaN/Inf inputs
    ``"propagate"`` to the outputs (default) or ``"raise"``. ``requantise``: False disables
    requantise insertion (for comparison). ``capture``: ``"export"`` or ``"symbolic_trace"``.
    ``fuse_residual``: move residual adds (``x + proj(a)``) into the linear's epilogue
    (``scaled_linear(..., residual=x)``). Off by default: on the H200 GPT-block benchmark it
    ran 1-4% slower and 0.05-0.1 dB less accurate than leaving the add to inductor, which
    fuses it into the following LayerNorm (benchmarks/RESULTS.md).
    """

    format: Format
    threshold: float | None = None
    rules: str = "rownorm"
    input_bounds: tuple[float | None, ...] | None = None
    on_overflow: str = "raise"
    nonfinite: str = "propagate"
    requantise: bool = True
    capture: str = "export"
    fuse_residual: bool = False

    def __post_init__(self):
        if self.rules not in ("rownorm", "absmax"):
            raise ValueError(f"rules must be 'rownorm' or 'absmax', got {self.rules!r}")
        if self.on_overflow not in _ON_OVERFLOW:
            raise ValueError(f"on_overflow must be one of {_ON_OVERFLOW}, got {self.on_overflow!r}")
        if self.nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {self.nonfinite!r}")
        if self.capture not in ("export", "symbolic_trace"):
            raise ValueError(f"capture must be 'export' or 'symbolic_trace', got {self.capture!r}")
        if self.threshold is not None and not (self.threshold >= 0):
            raise ValueError(f"threshold must be >= 0 (bits), got {self.threshold!r}")


class ScaledGraphModule(fx.GraphModule):
    """The transformed model: a GraphModule of ``torch.ops.fxscale.*`` calls, plus ``report``.

    Inputs with a declared bound are checked on every call (one reduction each, outside the
    graph): beyond the bound, ``on_overflow`` decides. NaN/Inf inputs propagate or raise.
    """

    report: Any
    config: TransformConfig

    def __call__(self, *args, **kwargs):
        clamps = getattr(self, "_fxscale_clamps", None)
        if clamps is not None:
            args, kwargs = _clamp_inputs(clamps, args, kwargs)
        checked = getattr(self, "_fxscale_checks", None)
        if checked is not None:
            args, kwargs, use_dynamic = _check_inputs(self, args, kwargs)
            if use_dynamic:
                return self._fxscale_dynamic(*args, **kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except AssertionError as e:
            if "Guard failed" not in str(e):
                raise
            raise ValueError(
                f"{e}: fxscale proved its bounds for the example inputs' shapes, with only the batch "
                "dimension (dim 0) left dynamic, since bounds can depend on the other sizes (a longer "
                "sequence sums more terms). Transform again with an example of this shape, or use "
                "torch.compile(model, backend='fxscale'), which transforms once per shape."
            ) from e


    def __reduce__(self):
        raise TypeError(
            "a transformed module cannot be pickled (torch.save(sm)): its graph calls torch.export's "
            "input guard and fxscale's run-time scale functions, which pickle cannot store by name. "
            "Save it as a program: torch.export.save(torch.export.export(sm, example_inputs), path) "
            "(torch.export.load(path).module() runs it, fxscale imported for its ops), or save "
            "sm.state_dict() and load it into fxscale.transform(model, example_inputs) of the same model."
        )


def _into_bound(x: Tensor, bound: tuple[float, float | None]) -> Tensor:
    """``x`` clamped to ``max|x| <= a`` and its rows scaled down to ``||x_i|| <= r`` (no host sync)."""
    a, r = bound
    x = x.clamp(-a, a)
    if r is not None and x.dim() >= 1 and x.numel():
        norms = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
        x = x * (r / norms.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0).to(x.dtype)
    return x


def _clamp_inputs(clamps: list, args, kwargs):
    """``on_overflow="clamp"``: each bounded input brought within its bound, traced into the graph."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    for i, bound in enumerate(clamps):
        x = leaves[i] if i < len(leaves) else None
        if bound is not None and isinstance(x, Tensor) and x.dtype.is_floating_point:
            leaves[i] = _into_bound(x, bound)
    return pytree.tree_unflatten(leaves, spec)


@torch.compiler.disable  # a host-side check by design: it runs before the (compiled) graph
def _check_inputs(sm: ScaledGraphModule, args, kwargs):
    leaves, spec = pytree.tree_flatten((args, kwargs))
    cfg = sm.config
    use_dynamic = False
    changed = False
    for i, (name, bound) in enumerate(sm._fxscale_checks):
        if i >= len(leaves):
            break
        x = leaves[i]
        if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.numel() == 0:
            continue
        # One fused reduction (max |x| and max row norm) per input per call, outside the graph.
        amax_f, rn_f = (float(v) for v in torch.ops.fxscale.stats(x.detach()))
        if not math.isfinite(amax_f):
            if cfg.nonfinite == "raise":
                raise ValueError(f"input {name!r} holds NaN or Inf; pass nonfinite='propagate' to let it flow")
            continue
        if bound is None or cfg.on_overflow == "clamp":
            continue
        a, r = bound
        if amax_f <= a and (r is None or rn_f <= r):
            continue
        what = (
            f"max |x| = {amax_f:.6g} beyond its declared bound {a:.6g}"
            if amax_f > a
            else f"max row norm = {rn_f:.6g} beyond its declared bound {r:.6g}"
        )
        if cfg.on_overflow == "raise":
            raise ValueError(
                f"input {name!r} has {what}; declare a larger input_bounds, "
                "or pass on_overflow='saturate', 'requantise' or 'clamp'"
            )
        if cfg.on_overflow == "saturate":
            if not getattr(sm, "_fxscale_warned", False):
                warnings.warn(
                    f"input {name!r} has {what}: saturating to the bound (on_overflow='saturate'; warned once)",
                    stacklevel=3,
                )
                sm._fxscale_warned = True
            leaves[i] = _into_bound(x, bound)
            changed = True
        else:
            use_dynamic = True
    if changed:
        args, kwargs = pytree.tree_unflatten(leaves, spec)
    return args, kwargs, use_dynamic and sm._fxscale_dynamic is not None


def _freeze(gm: fx.GraphModule) -> None:
    """Inference only: the parameters left in high precision become buffers (no autograd).

    They share storage with the model's parameters (``detach`` copies nothing), so
    ``torch.compile`` of the result needs no backward formulas for the fxscale ops.
    """
    for name, p in list(gm.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        mod = gm.get_submodule(mod_name) if mod_name else gm
        del mod._parameters[attr]
        mod.register_buffer(attr, p.detach())


def _normalise_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _input_bounds(placeholders: list[fx.Node], input_bounds) -> dict[str, tuple[float, float | None]]:
    """Declared bounds by placeholder: ``(max |x|, max row norm or None)``, rounded up to the dtype."""
    floats = [p for p in placeholders if isinstance(p.meta.get("val"), Tensor) and p.meta["val"].dtype.is_floating_point]
    if input_bounds is None:
        return {}
    if isinstance(input_bounds, (int, float)):
        return {p.name: _declared(input_bounds, p) for p in floats}
    seq = list(input_bounds)
    if len(seq) != len(placeholders):
        raise ValueError(
            f"input_bounds has {len(seq)} entries but the model takes {len(placeholders)} tensor inputs "
            f"({', '.join(p.name for p in placeholders)}); give one per input (None for none), "
            "each a max |x| or a pair (max |x|, max row norm), or a single float"
        )
    return {p.name: _declared(b, p) for p, b in zip(placeholders, seq) if b is not None}


def _declared(b, p: fx.Node) -> tuple[float, float | None]:
    a, r = (b if isinstance(b, (tuple, list)) else (b, None))
    for v in (a, r):
        if v is not None and not (isinstance(v, (int, float)) and float(v) >= 0 and math.isfinite(float(v))):
            raise ValueError(
                f"input {p.name!r}: a declared bound must be a finite number >= 0 (or a pair "
                f"(max |x|, max row norm)), got {b!r}"
            )
    return _representable(float(a), p), (None if r is None else _representable(float(r), p))


def _representable(b: float, p: fx.Node) -> float:
    """The smallest value of input ``p``'s dtype >= ``b``: so that an input clamped to its bound in
    its own dtype (float32 rounds 2**1.75 up) passes the run-time check; proofs use this bound."""
    v = p.meta.get("val")
    if not (isinstance(v, Tensor) and v.dtype.is_floating_point) or not math.isfinite(b):
        return b
    r = float(torch.tensor(b, dtype=torch.float64).to(v.dtype))
    if r < b:
        _, e = math.frexp(r)  # r = m * 2**e, 0.5 <= m < 1: one ulp of r is eps * 2**(e - 1)
        r = float(torch.tensor(r + math.ldexp(torch.finfo(v.dtype).eps, e - 1), dtype=torch.float64).to(v.dtype))
    return r


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
) -> ScaledGraphModule:
    """Compile ``model`` to scaled low-precision ops with proven, never-overflow scales.

    Returns a :class:`ScaledGraphModule` whose outputs have the structure and dtype of
    ``model(*example_inputs)``; ``sm.report`` is the per-node table. See
    :class:`TransformConfig` for the options. ``calibration`` is a list of further input
    tuples, used (with ``example_inputs``) only to project wasted bits.
    """
    from passes.calibrate import calibrate
    from passes.capture import capture as capture_graph
    from passes.lower import ScaleFn, lower
    from passes.requantise import analyse

    from .report import Report

    fmt = get_format(format)
    cfg = TransformConfig(
        format=fmt,
        threshold=threshold,
        rules=rules,
        input_bounds=None if input_bounds is None or isinstance(input_bounds, (int, float)) else tuple(input_bounds),
        on_overflow=on_overflow or "raise",
        nonfinite=nonfinite,
        requantise=requantise,
        capture=capture,
        fuse_residual=fuse_residual,
    )
    args = _normalise_inputs(example_inputs)
    batches = [args] + [_normalise_inputs(b) for b in (calibration or [])]

    def build(bounds_override):
        gm = capture_graph(model, args, method=cfg.capture)
        calibrate(gm, batches)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ib = _input_bounds(placeholders, bounds_override)
        an = analyse(gm, fmt=fmt, mode=cfg.rules, threshold=cfg.threshold, input_bounds=ib, requantise=cfg.requantise)
        rows = [(n.name, info(n)) for n in gm.graph.nodes if not (n.op == "call_module" and "guards" in str(n.target))]
        lower(gm, an, fuse_residual=cfg.fuse_residual)
        return gm, rows, placeholders, ib

    gm, rows, placeholders, ib = build(input_bounds)
    _freeze(gm)
    sm = ScaledGraphModule(gm, gm.graph, class_name="ScaledGraphModule")
    for k in ("_in_spec", "_out_spec"):
        if hasattr(gm, k):
            setattr(sm, k, getattr(gm, k))
    for name, mod in gm.named_children():  # run-time scale functions: called opaquely, kept for inspection
        if isinstance(mod, ScaleFn):
            sm.add_submodule(name, mod)
    sm.config = cfg
    sm.report = Report.from_rows(rows, fmt)
    host_check = (ib and cfg.on_overflow != "clamp") or cfg.nonfinite == "raise"
    sm._fxscale_checks = [(p.name, ib.get(p.name)) for p in placeholders] if host_check else None
    sm._fxscale_clamps = [ib.get(p.name) for p in placeholders] if (ib and cfg.on_overflow == "clamp") else None
    sm._fxscale_dynamic = None
    if ib and cfg.on_overflow == "requantise":
        dyn, _, _, _ = build(None)
        sm._fxscale_dynamic = dyn
    return sm


def dynamic_baseline(model: nn.Module, example_inputs: Any, *, format: str | torch.dtype | Format = torch.float8_e4m3fn):
    """The comparison point: per-tensor *dynamic* scaling of every matmul operand.

    Returns a function that runs ``model`` with each matmul-like op's operands quantised to
    ``format`` with their own run-time amax (power-of-two scale) and computed in float32:
    what fxscale's static scales are measured against (``torch.compile``-free, CPU-friendly).

    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> run = dynamic_baseline(model, (torch.randn(2, 16),))
    >>> run(torch.randn(3, 16)).shape
    torch.Size([3, 4])
    """
    from passes.bounds import QUANTISED_OPERANDS
    from passes.capture import capture as capture_graph

    fmt = get_format(format)
    gm = capture_graph(model, _normalise_inputs(example_inputs))

    def fake_quant(t: Tensor) -> Tensor:
        s = fmt.scale_for(float(t.detach().abs().max()) if t.numel() else 0.0)
        return (fmt.cast(t.float() / s).float() * s).to(t.dtype)

    class _Dynamic(fx.Interpreter):
        def call_function(self, target, args, kwargs):
            names = QUANTISED_OPERANDS.get(target)
            if names is not None:
                schema = [a.name for a in target._schema.arguments]
                args = tuple(
                    fake_quant(a) if i < len(schema) and schema[i] in names and isinstance(a, Tensor) else a
                    for i, a in enumerate(args)
                )
            return super().call_function(target, args, kwargs)

    def run(*inputs, **kwargs):
        # The Interpreter flattens inputs and rebuilds the output structure (the graph's codegen).
        return _Dynamic(gm).run(*pytree.tree_leaves((inputs, kwargs)))

    return run

"""The ``torch.compile`` backend: ``torch.compile(model, backend="fxscale")``.

Registered through the ``torch_dynamo_backends`` entry point (``pyproject.toml``), so it is
available after ``pip install``. Dynamo hands over a torch-level FX graph per captured
region (graph breaks are fine: each region is compiled on its own) whose placeholders
include the module's parameters. The backend lifts it (:mod:`fxscale.lifting`: parameters and
buffers back into constants, so weight scales are static; example inputs materialised) and runs
:func:`fxscale.transform` on the region.

Each transformed region is then compiled by inductor (``torch.compile`` with
``options={"freezing": True}``: fused elementwise kernels around the fp8 GEMMs, static scale
arithmetic folded into constants under ``torch.no_grad()``), as ``torch.compile`` of the
result of ``fxscale.transform`` would be; ``torch.compile(..., mode=...)`` carries over (e.g.
``mode="reduce-overhead"``: CUDA graphs; torch.compile takes either ``mode`` or ``options``,
so a mode runs with fxscale's default options). ``inductor=False`` runs the transformed graph
as it is (the fxscale ops' kernels one by one: for debugging and study).

Options go through ``torch.compile(..., options={...})``: any option of ``fxscale.transform``
(the fields of :class:`fxscale.config.TransformConfig`: ``format``, ``threshold``,
``input_bounds``, ``on_overflow``, ``rules``, ...; and ``calibration``) plus ``strict``,
``inductor`` and ``max_size``.
``max_size``: the declared maximum of every dim besides the batch that Dynamo makes dynamic
(a sequence length, after the second length seen or with ``dynamic=True``): the region is
transformed once, bounds proven at that maximum, and runs at every size up to it (beyond it:
``ValueError``). Without it, such a dim is proven for the power of two at or above its size (at
least 64) and transformed again only when a call passes that: once per doubling of a growing
length (``generate()``), not once per size. ``calibration`` and
``input_bounds`` are in terms of the region's tensor inputs in order (for a model called
as ``model(x)`` with no graph break, the model's inputs; a region resuming after a graph break
takes intermediate values, where they are not applied, with a warning). On an internal failure the backend
warns and runs the original graph (or, where only inductor failed, the transformed graph
without inductor), unless ``strict=True``, which raises.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU()).eval()
>>> fast = torch.compile(model, backend="fxscale", options={"format": "e4m3"})
>>> fast(torch.randn(4, 16)).shape
torch.Size([4, 32])
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from .config import option_names
from .lifting import Lifted, hint, scalar_value

__all__ = ["BACKEND_OPTIONS", "TRANSFORM_OPTIONS", "fxscale_backend", "reports"]

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

#: Options of fxscale.transform the backend passes through: the fields of the one validated
#: config (fxscale.config.TransformConfig), plus the calibration batches.
TRANSFORM_OPTIONS = (*option_names(), "calibration")
#: Options of the backend itself.
BACKEND_OPTIONS = ("strict", "inductor", "max_size")
#: The smallest maximum the backend proves a dynamic length for when ``max_size`` is not given.
MIN_BUCKET = 64


def _valid_options() -> tuple[str, ...]:
    return TRANSFORM_OPTIONS + BACKEND_OPTIONS


def _check_options(options: dict[str, Any]) -> None:
    valid = _valid_options()
    for k in options:
        if k not in valid:
            raise ValueError(
                f"unknown fxscale backend option {k!r}; valid options are {sorted(valid)}, e.g. "
                'torch.compile(model, backend="fxscale", options={"format": "e4m3"})'
            )


def fxscale_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    **kwargs: Any,
) -> Callable[..., Any]:
    """Dynamo backend entry point (see the module docstring).

    ``options`` (from ``torch.compile(options=...)``) and direct keyword arguments are merged;
    unknown keys raise ``ValueError`` (listing the valid ones) even without ``strict``.
    """
    opts = dict(options or {})
    opts.update(kwargs)
    _check_options(opts)
    strict = bool(opts.pop("strict", False))
    inductor = bool(opts.pop("inductor", True))
    max_size = opts.pop("max_size", None)
    if max_size is not None and not (isinstance(max_size, int) and max_size >= 1):
        raise ValueError(f"fxscale backend option max_size must be a positive int, got {max_size!r}")
    inductor_options = _inductor_options(mode, inductor)
    _per_input_options_only_for_the_first_region(opts)
    from .fastpath import decompose_fast_paths

    decompose_fast_paths(gm)  # nn.TransformerEncoderLayer's fused op, op by op: its matmuls get quantised
    _warn_fused_fast_paths(gm)
    try:
        return _Compiled(gm, example_inputs, opts, strict=strict, inductor_options=inductor_options,
                         max_size=max_size)
    except Exception as e:
        if strict:
            raise
        warnings.warn(
            f"fxscale backend failed on a graph of {sum(1 for _ in gm.graph.nodes)} nodes and runs it "
            f"unchanged in high precision: {type(e).__name__}: {_short(e)}. "
            'Pass options={"strict": True} to raise instead.',
            stacklevel=2,
        )
        log.debug("fxscale backend failure", exc_info=True)
        return gm.forward


def _resumed_region() -> str | None:
    """The function name where Dynamo is compiling a region that resumes after a graph break
    (``torch_dynamo_resume_in_forward_at_12``): its inputs are the model's intermediate values."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        name = tx.f_code.co_name if tx is not None else ""
    except Exception:  # noqa: BLE001  (a private API: without it, every region counts as a first one)
        return None
    return name if name.startswith("torch_dynamo_resume_in_") else None


def _per_input_options_only_for_the_first_region(opts: dict[str, Any]) -> None:
    """``input_bounds`` and ``calibration`` describe the model's inputs; a region after a graph
    break takes intermediate values instead (a scalar bound of 1 applied to ``10 * fc1(x)`` made
    valid calls raise, or with on_overflow='clamp' run at 1.3 dB; found by an adversarial trial):
    there they are dropped (the inputs measured at run time, the bits projected from the region's
    own inputs), saying so."""
    resumed = _resumed_region()
    dropped = [k for k in ("input_bounds", "calibration") if opts.get(k) is not None] if resumed else []
    if dropped:
        for k in dropped:
            opts.pop(k)
        warnings.warn(
            f"fxscale backend: {' and '.join(dropped)} describe the model's inputs, but a graph break made a region "
            f"({resumed}) whose inputs are intermediate values: not applied there (its inputs are measured at "
            "run time). Remove the graph break (torch._dynamo.explain(model)(x) lists them) to keep them static.",
            stacklevel=3,
        )


def _inductor_options(mode: str | None, inductor: bool) -> dict[str, Any] | None:
    """Inductor's options for the transformed regions (None: no inductor): freezing, plus what
    torch.compile's ``mode`` means for inductor (``"reduce-overhead"``: CUDA graphs)."""
    if not inductor:
        if mode not in (None, "default"):
            warnings.warn(f"fxscale backend with inductor=False ignores torch.compile mode={mode!r}", stacklevel=3)
        return None
    from torch._inductor import list_mode_options

    # always_keep_tensor_constants: frozen 0-d scales stay tensors, which fxscale's Triton GEMMs
    # (triton_ops, launched by inductor) need on torch 2.11 (fxscale.kernels.lowering).
    return {**(list_mode_options(mode) if mode else {}), "freezing": True, "always_keep_tensor_constants": True}


#: Fused inference fast paths that hide their matmuls from fxscale (they run in high precision).
_FAST_PATHS = ("_transformer_encoder_layer_fwd", "_native_multi_head_attention")


def _warn_fused_fast_paths(gm: fx.GraphModule) -> None:
    found = sorted({
        getattr(n.target, "__name__", str(n.target))
        for n in gm.graph.nodes
        if n.op == "call_function" and any(f in str(getattr(n.target, "__name__", n.target)) for f in _FAST_PATHS)
    })
    if found:
        warnings.warn(
            f"the compiled graph calls {', '.join(found)} (PyTorch's fused inference fast path for "
            "nn.TransformerEncoderLayer / nn.MultiheadAttention under no_grad, here with a mask or in "
            "nn.MultiheadAttention, which fxscale does not write out), which fxscale runs in "
            "high precision as one op. Call torch.backends.mha.set_fastpath_enabled(False) before "
            "running the compiled model so that fxscale sees its matmuls.",
            stacklevel=3,
        )


def _short(e: BaseException, limit: int = 500) -> str:
    s = str(e).strip()
    return s if len(s) <= limit else s[:limit] + " ..."


class _Compiled:
    """The callable handed back to Dynamo: selects the tensor inputs and runs the transformed
    region. The transform runs on the first call (on its real inputs, outside Dynamo's
    tracing, where torch.export can run) and again when a specialised scalar input or a
    non-batch dim changes. Lifting the graph happens at once, so structural failures show
    at compile time."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], opts: dict[str, Any], *, strict: bool,
                 inductor_options: dict[str, Any] | None = None, max_size: int | None = None):
        self.gm = gm
        self.strict = strict
        self.inductor_options = inductor_options  # None: run the transformed graph without inductor
        self.example_inputs = list(example_inputs)
        self.opts = opts
        self.cache: dict[Any, Any] = {}
        self.lifted = Lifted(gm, self.example_inputs, {})
        # Dynamo drops its placeholders' GraphArgs after compiling; lifting again (another value of
        # a baked-in scalar) reads them: which input is a wrapped float, which size measures what.
        self._graphargs = {n: n.meta["grapharg"] for n in gm.graph.nodes if "grapharg" in n.meta}
        self.max_size = max_size
        # Per tensor input: the dims besides the batch that Dynamo made symbolic, by symbol.
        # (Dynamo's fake example values hold the symbols; the example inputs may be real.)
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        vals = [phs[i].meta.get("example_value", self.example_inputs[i]) for i in self.lifted.input_positions]
        self.dynamic_dims = [
            {d: str(s.node.expr) for d, s in enumerate(v.shape) if d > 0 and isinstance(s, torch.SymInt)}
            if isinstance(v, torch.Tensor) else {}
            for v in vals
        ]

    def _maximum(self, ts) -> int | None:
        """The maximum the dims Dynamo made dynamic are proven for: ``max_size`` where declared,
        else the power of two (at least :data:`MIN_BUCKET`) at or above their largest size now,
        so that a growing length (``generate()``) is transformed once per doubling rather than
        once per size; None where no dim but the batch is dynamic. A size beyond ``max_size``
        raises ``ValueError``."""
        sizes = [(i, d, hint(t.shape[d])) for i, (t, dd) in enumerate(zip(ts, self.dynamic_dims)) for d in dd]
        if not sizes:
            return None
        i, d, n = max(sizes, key=lambda s: s[2])
        if self.max_size is None:
            return max(MIN_BUCKET, 1 << (n - 1).bit_length())
        if n > self.max_size:
            raise ValueError(f"fxscale backend: dim {d} of the region's input {i} is {n}, beyond the declared "
                             f'max_size={self.max_size}; compile with a larger options={{"max_size": N}}')
        return self.max_size

    def _shape_key(self, ts) -> tuple:
        """Sizes that need a transform of their own: all but the batch and the dynamic dims,
        and the maximum those are proven for."""
        return (tuple(
            tuple(None if d in dd else hint(s) for d, s in enumerate(t.shape) if d > 0)
            for t, dd in zip(ts, self.dynamic_dims)
        ), self._maximum(ts))

    def _dynamic_shapes(self, maximum: int | None) -> tuple | None:
        """torch.export's ``dynamic_shapes`` for the region's inputs: one Dim per Dynamo symbol."""
        if maximum is None:
            return None
        dims: dict[str, Any] = {}
        spec = []
        for dd in self.dynamic_dims:
            entry = {}
            for d, sym in dd.items():
                if sym not in dims:
                    dims[sym] = torch.export.Dim(f"fxscale_d{len(dims)}", max=maximum)
                entry[d] = dims[sym]
            spec.append(entry or None)
        return tuple(spec)

    def _transform(self, lifted: Lifted, examples: list[Any]):
        from .api import transform

        ds = self._dynamic_shapes(self._maximum(examples))
        options = self.opts if ds is None else {**self.opts, "dynamic_shapes": ds}
        with warnings.catch_warnings():
            # Dynamo's first graph has static shapes and it recompiles for another batch: the
            # capture's "batch specialised, other batch sizes will fail" does not apply here.
            warnings.filterwarnings("ignore", message=r".*batch dimension of input\(s\)")
            # Nor does "dynamic_shapes declares dim d ... dynamic, but the model's code fixed it": here
            # Dynamo made the dim symbolic (dynamic=True marks every dim), not the user (a Linear's
            # feature size, say); a call of another size of it fails in the model itself.
            warnings.filterwarnings("ignore", message=r".*dynamic_shapes declares dim")
            return transform(lifted.module, tuple(examples), **options)

    def __call__(self, *args: Any) -> Any:
        lf = self.lifted
        inputs = [args[i] for i in lf.input_positions]
        spec = {i: scalar_value(args[i]) for i in lf.specialised}
        key = (self._shape_key(inputs), tuple(sorted(spec.items())))  # (raises beyond max_size)
        fn = self.cache.get(key)
        if fn is None:
            log.debug("fxscale backend: transforming for %s", key)
            try:
                for n, ga in self._graphargs.items():
                    n.meta.setdefault("grapharg", ga)
                lifted = lf if spec == lf.specialised else Lifted(self.gm, self.example_inputs, spec)
                # Copies: export marks its example tensors, and Dynamo's guards check the originals.
                fn = self._transform(lifted, [t.detach().clone() for t in inputs])
                if hasattr(fn, "report"):
                    _REPORTS.append(fn.report)
                if self.inductor_options is not None:
                    fn = _InductorRegion(fn, self.inductor_options, strict=self.strict)
            except Exception as e:
                if self.strict:
                    raise
                warnings.warn(
                    f"fxscale backend could not transform a graph of {len(self.gm.graph.nodes)} nodes "
                    f"(input shapes {[tuple(t.shape) for t in inputs]}) and runs it unchanged in high "
                    f"precision: {type(e).__name__}: {_short(e)}. "
                    'Pass options={"strict": True} to raise instead.',
                    stacklevel=2,
                )
                log.debug("fxscale backend failure", exc_info=True)
                fn = _Passthrough()
            self.cache[key] = fn
        if isinstance(fn, _Passthrough):
            return self.gm(*args)
        return fn(*inputs)


class _Passthrough:
    """Cache entry: this key runs the original graph."""


def _skip_inner_guards():
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None:
        import contextlib

        return contextlib.nullcontext()
    return stance(skip_guard_eval_unsafe=True)


class _InductorRegion:
    """A transformed region compiled by inductor with freezing (parameters and buffers as
    constants). If inductor fails, warns once and runs the transformed module as it is
    (``strict``: raises)."""

    def __init__(self, module: Callable[..., Any], options: dict[str, Any], *, strict: bool):
        self.module = module
        self.compiled = torch.compile(module, options=options)
        self.strict = strict
        self.failed = False
        self.warm = False  # compiled once: later calls skip the inner guards

    def __call__(self, *inputs: Any) -> Any:
        if self.failed:
            return self.module(*inputs)
        try:
            # The enclosing _Compiled already keys this region on its shapes and specialised
            # inputs: skipping the inner Dynamo's guard evaluation saves its host time per call
            # (it still tells apart the region's own recompiles, e.g. grad mode).
            if self.warm:
                try:
                    with _skip_inner_guards():
                        return self.compiled(*inputs)
                except RuntimeError as e:  # a recompile is due (a new grad mode, say): guarded call
                    if "skip_guard_eval_unsafe" not in str(e):
                        raise
            out = self.compiled(*inputs)
            self.warm = True
            return out
        except Exception as e:
            if self.strict:
                raise
            warnings.warn(
                f"fxscale backend: inductor could not compile a transformed region "
                f"({type(e).__name__}: {_short(e)}); it runs without inductor (the fxscale ops one by "
                'one, slower on the GPU). Pass options={"inductor": False} to choose this, or '
                '{"strict": True} to raise.',
                stacklevel=2,
            )
            log.debug("fxscale backend: inductor failure", exc_info=True)
            self.failed = True
            return self.module(*inputs)


#: Report of every region the backend transformed in this process, oldest first.
_REPORTS: list[Any] = []


def reports() -> list[Any]:
    """The :class:`~fxscale.report.Report` of each region ``torch.compile(backend="fxscale")``
    transformed so far (one per graph and input shape), oldest first.

    >>> import torch, fxscale.backend
    >>> m = torch.compile(torch.nn.Linear(16, 4), backend="fxscale")
    >>> _ = m(torch.randn(8, 16))
    >>> print(fxscale.backend.reports()[-1].summary_line())  # doctest: +ELLIPSIS
    float8_e4m3fn: 1 of ... nodes quantised ...
    """
    return list(_REPORTS)



def _register() -> None:
    """Make ``backend="fxscale"`` known to Dynamo on import, also where fxscale runs from a source
    tree without the ``torch_dynamo_backends`` entry point. Where the entry point exists it
    names this same function, so registering directly changes nothing there (and saves the
    scan of installed packages' metadata at import).

    Not while Dynamo itself is loading that entry point (``torch.compile(model,
    backend="fxscale")`` without importing fxscale first): Dynamo registers the function it
    loaded right after the import, and a name registered already fails that with
    ``AssertionError: duplicate name: fxscale``. Dynamo has found the entry point by then.
    """
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if isinstance(registry._BACKENDS.get("fxscale"), EntryPoint) and "fxscale" not in registry._COMPILER_FNS:
        return  # Dynamo is loading (or will load) the entry point and registers it itself
    try:
        registry.register_backend(fxscale_backend, name="fxscale")
    except AssertionError:  # registered already (the entry point was loaded, or a re-import)
        pass

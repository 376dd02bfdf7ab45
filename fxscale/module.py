"""The transformed model at run time: :class:`ScaledGraphModule` and its input guard.

What a deployed model runs besides its graph: the host-side check of declared input bounds
(``on_overflow``, ``nonfinite``) and the in-graph clamp (``on_overflow="clamp"``). Imports no
compiler (``passes``).
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx
from torch.utils import _pytree as pytree

if TYPE_CHECKING:
    from .api import TransformConfig

__all__ = ["ScaledGraphModule"]


class ScaledGraphModule(fx.GraphModule):
    """The transformed model: a GraphModule of ``torch.ops.fxscale.*`` calls, plus ``report``
    (read from this graph), ``config`` (the options as passed) and ``pass_times``.

    Inputs with a declared bound are checked on every call (one reduction each, outside the
    graph): beyond the bound, ``on_overflow`` decides. NaN/Inf inputs propagate or raise.
    """

    # Class-level defaults (``__deepcopy__`` copies the instance's own values over them).
    _fxscale_checks: list | None = None   # [(input name, declared bound or None)]: host-side check
    _fxscale_clamps: list | None = None   # [declared bound or None] per input: clamp in the graph
    _fxscale_warned: bool = False
    _fxscale_signature: inspect.Signature | None = None  # the model's forward: binds keyword inputs
    _fxscale_positional: int | None = None  # how many positional arguments the example gave
    _fxscale_inputs: list | None = None   # [(name, rank, shape, dtype)] of each input's example

    def __init__(
        self,
        gm: fx.GraphModule,
        config: TransformConfig,
        *,
        input_bounds: dict[str, tuple[float, float | None]],
        inputs: list[str],
        dynamic: Any = None,
        pass_times: dict[str, float] | None = None,
        signature: inspect.Signature | None = None,
        input_specs: list | None = None,
        positional: int | None = None,
    ) -> None:
        """``gm``: the lowered graph; ``config``: the options as the user passed them;
        ``input_bounds``: the declared bound of each input by name, as enforced (rounded up to
        the input's dtype); ``inputs``: the graph's input names in order; ``dynamic``: the
        module to run where ``on_overflow="requantise"`` applies; ``pass_times``: wall seconds
        of each compiler pass; ``signature``: the model's ``forward`` signature, to bind keyword
        inputs to their positions; ``input_specs``: ``(name, rank, shape, dtype)`` of each input's
        example, checked on every call (another rank or dtype raises); ``positional``: how many
        of forward's positional arguments the example gave (a keyword call fills the ones it
        skips with their defaults, as the example did)."""
        from .report import Report
        from .runtime import ScaleFn

        super().__init__(gm, gm.graph, class_name="ScaledGraphModule")
        for k in ("_in_spec", "_out_spec"):
            if hasattr(gm, k):
                setattr(self, k, getattr(gm, k))
        for name, mod in gm.named_children():  # run-time scale functions: called opaquely, kept for inspection
            if isinstance(mod, ScaleFn):
                self.add_submodule(name, mod)
        self.config = config
        self.input_bounds = dict(input_bounds)
        ib = self.input_bounds
        from passes.input_names import shown_names

        shown = shown_names(inputs, signature)
        if (ib and config.on_overflow != "clamp") or config.nonfinite == "raise":
            self._fxscale_checks = [(shown[p], ib.get(p)) for p in inputs]
        if ib and config.on_overflow == "clamp":
            self._fxscale_clamps = [ib.get(p) for p in inputs]
        # The same model with run-time input scales (on_overflow="requantise"), or None; a
        # submodule (its buffers in the state_dict), so never a class attribute.
        self._fxscale_dynamic = dynamic
        self.pass_times = dict(pass_times or {})
        self._fxscale_signature = signature
        self._fxscale_positional = positional
        self._fxscale_inputs = ([(shown.get(n, n), *rest) for n, *rest in input_specs]
                                if input_specs is not None else None)
        self.report = Report.from_graph(self, config.format)

    def __getattr__(self, name: str):
        if name != "generate":
            return super().__getattr__(name)
        try:
            return super().__getattr__(name)
        except AttributeError as e:  # a transformers model's generate() is not the graph's
            raise AttributeError(
                "a ScaledGraphModule runs the model's forward only, not generate(): for a decoder-only LM "
                "use fxscale.llm.wrap(lm, max_len=...).generate(...) (a float8 KV cache); otherwise "
                "model.forward = torch.compile(model.forward, backend='fxscale'), then model.generate(...)"
            ) from e

    def __call__(self, *args, **kwargs):
        sig = self._fxscale_signature
        if kwargs and sig is not None:
            # Keyword arguments in any order: bound to the model's parameters, so that each
            # input meets its own declared bound (the checks go by position: issue 11 case 7).
            from passes.input_names import positional_inputs

            ba = sig.bind(*args, **kwargs)
            args, kwargs = positional_inputs(sig, ba.args, ba.kwargs, upto=self._fxscale_positional)
        if self._fxscale_inputs is not None:
            _check_input_specs(self._fxscale_inputs, args, kwargs)
        if self._fxscale_clamps is not None:
            args, kwargs = _clamp_inputs(self._fxscale_clamps, args, kwargs)
        if self._fxscale_checks is not None:
            args, kwargs, use_dynamic = _check_inputs(self, args, kwargs)
            if use_dynamic:
                return self._fxscale_dynamic(*args, **kwargs)
        try:
            return super().__call__(*args, **kwargs)
        except AssertionError as e:
            if "Guard failed" not in str(e):
                raise
            if "size()" not in str(e) and "stride()" not in str(e) and "shape" not in str(e):
                raise ValueError(
                    f"{e}: a non-tensor input (a Python number or flag) differs from its value at transform "
                    "time; torch.export bakes such values into the graph. Transform again with this value, "
                    "or pass it as a tensor."
                ) from e
            fixed = re.search(r"(\w+)\.size\(\)\[(\d+)\] (==|>=|<=|<|>) (\d+)", str(e))
            if fixed and fixed.group(3) != "==":
                raise ValueError(
                    f"{e}: dim {fixed.group(2)} of input {fixed.group(1)!r} is outside the range declared for it "
                    f"in dynamic_shapes (it must be {fixed.group(3)} {fixed.group(4)}); widen the Dim's min/max "
                    "and transform again."
                ) from e
            if fixed and fixed.group(2) == "0":
                raise ValueError(
                    f"{e}: the batch dimension (dim 0) of this input was fixed to the example's size when "
                    "the model was captured (a warning at transform time said why). Transform again with an "
                    "example of this batch size, or use torch.compile(model, backend='fxscale')."
                ) from e
            head = (f"dim {fixed.group(2)} of input {fixed.group(1)!r} is fixed at {fixed.group(4)}, the example's "
                    "size. If it is a feature size of the model, pass inputs of that size. If it varies between "
                    "calls: " if fixed else "")
            raise ValueError(
                f"{e}: {head}fxscale proved its bounds for the example inputs' shapes, with only the batch "
                "dimension (dim 0) and the dims declared in dynamic_shapes (up to their maximum) left "
                "dynamic, since bounds can depend on the other sizes (a longer sequence sums more terms): "
                "declare the dim with its maximum, e.g. dynamic_shapes=({1: torch.export.Dim('seq', "
                "max=2048)},), or transform again with an example of this shape. (Declared it already? "
                "Then the model's code fixed it to the example's size: a warning at transform time said so.)"
            ) from e

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a state dict of *this* transformed model (``sm.state_dict()`` saved earlier).

        The scales and run-time scale functions were proven from the weights at transform time,
        so a state dict holding other values raises: load the new weights into the original
        model and transform it again (issue 11 case 11).
        """
        own = self.state_dict()
        changed = [k for k, v in state_dict.items()
                   if k in own and isinstance(v, Tensor) and not _same_tensor(own[k], v)]
        changed += [k for k, v in state_dict.items() if k not in own and isinstance(v, Tensor)
                    and not self._same_as_quantised(k, v)]
        if changed:
            raise ValueError(
                f"load_state_dict: {len(changed)} tensor(s) differ from those the scales were proven "
                f"from ({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}); a transformed "
                "model cannot take other weights. Load them into the original model and transform it "
                "again: model.load_state_dict(sd); sm = fxscale.transform(model, example_inputs)."
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _same_as_quantised(self, key: str, value: Tensor) -> bool:
        """True unless ``key`` is a weight this module holds quantised (``<key>_<format>`` with
        ``<key>_scale``) and ``value`` quantises to other data (the original model's own state dict
        passes; another model's weights do not)."""
        from .formats import get_format

        fmt = get_format(self.config.format)
        data = scale = None
        for base in (key.replace(".", "_"), "_" + key.replace(".", "_")):  # (a name may not start with a digit)
            data, scale = getattr(self, f"{base}_{fmt.name}", None), getattr(self, f"{base}_scale", None)
            if isinstance(data, Tensor):
                break
        if not isinstance(data, Tensor) or not isinstance(scale, Tensor) or value.shape != data.shape:
            return not isinstance(data, Tensor)
        w = value.detach().to(torch.float32)
        again = fmt.store(w, float(scale), in_range=bool(torch.isfinite(w).all()))  # as quantise_const does
        return torch.equal(again.view(torch.uint8) if again.element_size() == 1 else again,
                           data.view(torch.uint8) if data.element_size() == 1 else data)

    def share_state_with(self, other: torch.nn.Module) -> int:
        """Point each tensor of this module at ``other``'s of the same name where the two hold the
        same values (two graphs transformed from one model, as fxscale.llm's step graphs are), so
        the weights are stored once. Returns the bytes freed.

        >>> import fxscale
        >>> m, x = torch.nn.Linear(16, 16), torch.randn(2, 16)
        >>> a, b = fxscale.transform(m, (x,)), fxscale.transform(m, (x,))
        >>> b.share_state_with(a) >= 16 * 16  # the float8 weight, at least
        True
        >>> torch.equal(a(x), b(x))
        True
        """
        theirs = {**dict(other.named_buffers()), **dict(other.named_parameters())}
        freed = 0
        for name, t in [*self.named_buffers(), *self.named_parameters()]:
            o = theirs.get(name)
            if o is None or o is t or o.device != t.device or not _same_tensor(o, t, on_device=True):
                continue
            mod_name, _, attr = name.rpartition(".")
            mod = self.get_submodule(mod_name) if mod_name else self
            (mod._parameters if attr in mod._parameters else mod._buffers)[attr] = o
            freed += t.numel() * t.element_size()
        return freed

    def __deepcopy__(self, memo):
        """``copy.deepcopy(sm)``: a ScaledGraphModule with the same guards, report and config
        (GraphModule's own copy keeps only the graph and the tensors it names)."""
        res = super().__deepcopy__(memo)
        state = copy.deepcopy(self.__dict__, memo)  # the memo hands back the copies taken above
        for k, v in state.items():
            res.__dict__.setdefault(k, v)
        for k, v in state["_modules"].items():  # the run-time-scale twin, ScaleFns: not in the graph
            res._modules.setdefault(k, v)
        return res

    def _apply(self, fn, recurse: bool = True):
        """Moves between devices pass; a dtype conversion (``sm.half()``, ``sm.to(torch.bfloat16)``,
        ``sm.float()``) raises: it would turn the float8 / int8 data and the float32 scales into
        another dtype (small scales underflow to 0 in float16) while the graph still runs the
        bounds proven for the old ones."""
        seen = set()
        for name, t in [*self.named_buffers(), *self.named_parameters()]:
            if (t.dtype, t.device) in seen or t.device.type == "meta":
                continue
            seen.add((t.dtype, t.device))
            probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            if isinstance(probe, Tensor) and probe.dtype != t.dtype:
                raise TypeError(
                    f"a transformed module cannot change its dtype ({name} is {t.dtype}, the conversion would "
                    f"make it {probe.dtype}): its quantised weights and scales were proven for their formats. "
                    "To run in another dtype, convert the original model and its example inputs and transform "
                    "again, e.g. fxscale.transform(model.bfloat16(), (x.bfloat16(),)); .to(device) works."
                )
        return super()._apply(fn, recurse)

    def __reduce__(self):
        raise TypeError(
            "a transformed module cannot be pickled (torch.save(sm)): its graph calls torch.export's "
            "input guard and fxscale's run-time scale functions, which pickle cannot store by name. "
            "Save it as a program with a dynamic batch: torch.export.save(fxscale.deploy.export_program(sm, "
            "example_inputs), path) (torch.export.load(path).module() runs it, fxscale imported for its ops), "
            "or as an AOTInductor package: fxscale.save(sm, example_inputs, path); or save sm.state_dict() "
            "and load it into fxscale.transform(model, example_inputs) of the same model."
        )


def _check_input_specs(specs: list, args, kwargs) -> None:
    """A tensor input of another rank or floating-point dtype than its example: a clear error
    (export's guard raises an IndexError for another rank, and lets another dtype through, where
    the bounds were proven for the example's dtype: its rounding, its representable bounds)."""
    leaves = pytree.tree_leaves((args, kwargs))
    if len(leaves) != len(specs):
        raise TypeError(
            f"the inputs hold {len(leaves)} values where the example held {len(specs)} "
            f"({', '.join(name for name, *_ in specs)}): pass the inputs in the example's structure "
            "(tensors where it had tensors, not lists; the same optional arguments)"
        )
    for (name, dim, shape, dtype), x in zip(specs, leaves):
        if dim is not None and not isinstance(x, Tensor):
            raise TypeError(f"input {name!r} must be a Tensor like its example (shape {shape}), got {type(x).__name__}")
        if dim is None or not isinstance(x, Tensor):
            continue
        if x.dim() != dim:
            raise ValueError(
                f"input {name!r} has {x.dim()} dimension(s) (shape {tuple(x.shape)}), but the model was "
                f"transformed for {dim} (example shape {shape}, dim 0 free); reshape it (e.g. x.unsqueeze(0) "
                "for a single sample) or transform again with an example of this rank."
            )
        if x.dtype != dtype and (x.dtype.is_floating_point or dtype.is_floating_point or x.dtype == torch.bool):
            raise TypeError(
                f"input {name!r} has dtype {x.dtype}, but the model was transformed for {dtype} (its bounds "
                f"and scales were proven for that dtype); pass {name}.to({dtype}) or transform again with "
                f"an example of dtype {x.dtype}."
            )


def _host_stats(x: Tensor) -> tuple[float, float]:
    """``(max |x|, max row norm)`` over the finite elements, in float64 for float64 inputs (a
    float64 value beyond float32's range must still fail its bound: issue 11 case 19)."""
    if x.dtype != torch.float64:
        amax, rn = (float(v) for v in torch.ops.fxscale.stats(x))
        return amax, rn
    a = torch.where(torch.isfinite(x), x, 0.0)
    if a.dim() == 0:
        a = a.reshape(1)
    return float(a.abs().max()), float(torch.linalg.vector_norm(a, dim=-1).max())


def _same_tensor(a: Tensor, b: Tensor, on_device: bool = False) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point and a.element_size() == 1:  # float8: compare the bits
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return bool(torch.equal(a, b) if on_device else torch.equal(a.cpu(), b.cpu()))


def _into_bound(x: Tensor, bound: tuple[float, float | None]) -> Tensor:
    """``x`` clamped to ``max|x| <= a`` and its rows scaled down to ``||x_i|| <= r`` (no host sync).

    NaN and ±Inf stay non-finite (a clamp would make Inf the bound: issue 11 case 15)."""
    a, r = bound
    if not x.dtype.is_floating_point:
        lim = math.floor(a)
        return x.clamp(-lim, lim)
    x = torch.where(torch.isinf(x), x, x.clamp(-a, a))
    if r is not None and x.dim() >= 1 and x.numel():
        norms = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
        x = x * (r / norms.clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0).to(x.dtype)
    return x


def _clamp_inputs(clamps: list, args, kwargs):
    """``on_overflow="clamp"``: each bounded input brought within its bound, traced into the graph."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    for i, bound in enumerate(clamps):
        x = leaves[i] if i < len(leaves) else None
        if bound is not None and isinstance(x, Tensor) and x.dtype != torch.bool:
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
        if not isinstance(x, Tensor) or x.numel() == 0:
            continue
        if not x.dtype.is_floating_point:
            if bound is None:
                continue
            x = x.detach().double()  # an integer / bool input with a declared bound: checked too
        if cfg.nonfinite == "raise" and not bool(torch.isfinite(x).all()):
            raise ValueError(f"input {name!r} holds NaN or Inf; pass nonfinite='propagate' to let it flow")
        if x.device.type == "meta":
            continue  # no data to check (tracing with meta tensors)
        # One fused reduction (max |x| and max row norm, finite elements) per input per call.
        amax_f, rn_f = _host_stats(x.detach())
        if not math.isfinite(amax_f):
            continue
        if bound is None or cfg.on_overflow == "clamp":
            continue
        a, r = bound
        if amax_f <= a and (r is None or rn_f <= r):
            continue
        what = (
            f"max |x| = {amax_f:.9g} beyond its declared bound {a:.9g}"
            if amax_f > a
            else f"max row norm = {rn_f:.9g} beyond its declared bound {r:.9g}"
        )
        if cfg.on_overflow == "raise":
            raise ValueError(
                f"input {name!r} has {what}; declare a larger input_bounds, "
                "or pass on_overflow='saturate', 'requantise' or 'clamp'"
            )
        if cfg.on_overflow == "saturate":
            if not sm._fxscale_warned:
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

"""Deploy a transformed module as an AOTInductor package: compiled once, loaded without recompiling.

:func:`save` exports the transformed module (``torch.export``, the batch dimension dynamic) and
compiles it with ``torch._inductor.aoti_compile_and_package``; :func:`load` is
``torch._inductor.aoti_load_package``. The package holds inductor's C++ wrapper and its kernels;
on CUDA fxscale's fused GEMMs are in it as cubins (``fxscale_kernels::linear_triton`` is a
triton_op) and the cuBLAS GEMMs as ``torch._scaled_mm`` calls, so no Python runs per call.

Ops that stay Python custom ops inside the package (called through the dispatcher, so the
loading process must ``import fxscale``): on CUDA, ``scaled_linear`` calls that the lowering
hands to the custom op's kernels (int8 through ``torch._int_mm``, unaligned K/N, layouts the
Triton kernels do not take), ``scaled_linear_requantise`` (run-time output scale), and the
activation-by-activation ``scaled_matmul``, ``scaled_conv2d`` and ``scaled_conv_transpose2d``; on the CPU, every fxscale
GEMM (the reference implementations). :func:`package_custom_ops` lists them for a package.

What the package does not carry: the host-side input check of ``input_bounds`` with
``on_overflow="raise"`` / ``"saturate"`` / ``"requantise"`` (it reads ``max |x|`` on the host
each call). ``on_overflow="clamp"`` is in the package (the clamp is traced); for the others
:func:`save` warns.

Example (CPU; compiling C++ takes a minute)::

    sm = fxscale.transform(model, (x,))
    path = fxscale.save(sm, (x,), "/tmp/ffn.pt2")
    run = fxscale.load(path)
    y = run(torch.randn(5, x.shape[1]))   # any batch size

The package takes the inputs by position in ``forward``'s order or by name as ``forward``'s
parameters (a dict example, e.g. a tokenizer's output: ``run(**batch)``); the names, and each
input's rank, dtype, device and contiguity, are recorded in the package's metadata
(:mod:`fxscale.deploy_checks`) and checked on the host before each call. Sizes other than the
dynamic ones (the batch, the dims declared to :func:`fxscale.transform`) are the example's, and
the package checks every input's sizes and strides against them (:func:`load`). A wrong input
raises a ValueError naming it and saying what the package takes.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from . import deploy_checks

__all__ = ["example_args", "export_program", "load", "package_custom_ops", "save"]


class _Deployable(nn.Module):
    """The transformed module as export sees it: the traced clamp (``on_overflow="clamp"``),
    then the graph; the host-side input check stays behind (see the module docstring)."""

    def __init__(self, sm: nn.Module):
        super().__init__()
        self.sm = sm

    def forward(self, *args):
        from .module import _clamp_inputs

        clamps = getattr(self.sm, "_fxscale_clamps", None)
        if clamps is not None:
            args, _ = _clamp_inputs(clamps, args, {})
        return torch.fx.GraphModule.__call__(self.sm, *args)


def _dynamic_shapes(sm: nn.Module, args: tuple, dynamic_batch: bool, max_batch: int | None):
    """The dynamic dims of the transformed module's inputs, as ``torch.export`` dynamic shapes for
    ``forward(*args)``: every input dim that is symbolic in ``sm``'s graph (the batch, and the dims
    declared to :func:`fxscale.transform`), with the range its bounds were proven for; one
    ``Dim`` per symbol, so inputs sharing a size share it in the package too. Every other dim is
    the example's: the package runs only those sizes (and :func:`load` makes it check them)."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(args)
    vals = [n.meta.get("val") for n in sm.graph.nodes if n.op == "placeholder"]
    if len(vals) != len(leaves):
        raise ValueError(f"fxscale.save: the example has {len(leaves)} input values where the transformed module "
                         f"has {len(vals)}: pass the example_inputs given to fxscale.transform")
    batch_dims = [v.shape[0] for v, a in zip(vals, leaves) if isinstance(a, Tensor) and a.dim() >= 1
                  and isinstance(v, Tensor) and v.dim() >= 1]
    if dynamic_batch and not any(isinstance(d, torch.SymInt) for d in batch_dims):
        b0 = next((a.shape[0] for a in leaves if isinstance(a, Tensor) and a.dim() >= 1), None)
        if b0 is None:
            return None
        why = (f"the example batch is {b0}: export specialises sizes 0 and 1; transform and save with a larger "
               "example" if b0 < 2 else "the transformed module's batch is fixed (a warning at transform time said why)")
        raise ValueError(f"fxscale.save: dynamic_batch needs a dynamic batch dimension, but {why}; or pass "
                         "dynamic_batch=False")
    dims: dict = {}

    def dim(size, axis: int):
        if not isinstance(size, torch.SymInt):
            return None
        expr = size.node.expr
        if axis == 0 and not dynamic_batch:
            return None
        if not expr.is_Symbol:
            return torch.export.Dim.AUTO  # a size derived from another (export relates them itself)
        if expr not in dims:
            vr = size.node.shape_env.var_to_range.get(expr)
            lo, hi = _int_or_none(vr.lower if vr is not None else None), _int_or_none(vr.upper if vr is not None else None)
            lo = 1 if lo is None else lo
            if axis == 0 and max_batch is not None:
                hi = max_batch if hi is None else min(hi, max_batch)
            # (export reports a lower bound of 2 for a dim it kept symbolic; 1 runs too)
            dims[expr] = torch.export.Dim(f"fxscale_{expr}", min=1 if lo <= 2 else lo, max=hi if hi is not None else 1 << 20)
        return dims[expr]

    shapes = [({i: dim(d, i) for i, d in enumerate(v.shape) if dim(d, i) is not None} or None)
              if isinstance(a, Tensor) and isinstance(v, Tensor) else None for v, a in zip(vals, leaves)]
    # forward(*args): one entry, the tuple of the arguments' specs
    return (pytree.tree_unflatten(shapes, spec),)


def example_args(sm: nn.Module, example_inputs: Any) -> tuple:
    """The example as the tuple of positional inputs the package takes (a mapping by name, a
    tokenizer's output say, is put in forward's positions as :func:`fxscale.transform` did)."""
    from collections.abc import Mapping

    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, Mapping):
        return tuple(example_inputs)
    from passes.input_names import positional_inputs

    sig = getattr(sm, "_fxscale_signature", None)
    args, rest = positional_inputs(sig, (), dict(example_inputs), upto=getattr(sm, "_fxscale_positional", None))
    if sig is None or rest:
        raise ValueError(f"fxscale.save: cannot put the example's {sorted(rest or example_inputs)} in positions of the "
                         "transformed module's inputs: pass example_inputs as the tuple of its positional inputs")
    return args


def _int_or_none(x) -> int | None:
    """A range end as an int; None for an infinite (sympy) or missing one."""
    try:
        return int(x)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def export_program(sm: nn.Module, example_inputs: Any, *, dynamic_batch: bool = True,
                   max_batch: int | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of the transformed module, the batch dimension (dim 0) dynamic.

    fxscale's ops stay ops in the program (device-independent); compile it with
    ``torch._inductor.aoti_compile_and_package`` (what :func:`save` does).
    """
    if type(sm).__name__ == "FxscaleCausalLM":
        raise TypeError(
            "fxscale.save / export_program package a module from fxscale.transform; an FxscaleCausalLM "
            "(fxscale.llm.wrap) keeps its float8 cache and generate()'s bookkeeping in Python, which a package "
            "does not carry. Run it in Python (torch.compile(flm.step, mode='reduce-overhead') for decode), or "
            "save fxscale.transform(lm, (ids,), dynamic_shapes=...) of the model without a cache")
    if not isinstance(sm, torch.fx.GraphModule):
        wrapped = " (a torch.compile'd module: pass the module it wraps, m._orig_mod)" if hasattr(sm, "_orig_mod") else ""
        raise TypeError(f"fxscale.save / export_program take the module fxscale.transform returned, got a "
                        f"{type(sm).__name__}{wrapped}: sm = fxscale.transform(model, example_inputs), then "
                        "fxscale.save(sm, example_inputs, path)")
    args = example_args(sm, example_inputs)
    cfg = getattr(sm, "config", None)
    if getattr(sm, "_fxscale_checks", None) is not None and cfg is not None and cfg.on_overflow != "clamp":
        warnings.warn(f"fxscale.save: the package does not check inputs against input_bounds "
                      f"(on_overflow={cfg.on_overflow!r} is a host-side check); transform with "
                      "on_overflow='clamp' to keep the bound inside the package", stacklevel=3)
    shapes = _dynamic_shapes(sm, args, dynamic_batch, max_batch)
    try:
        with torch.no_grad():
            return torch.export.export(_Deployable(sm), args, dynamic_shapes=shapes, strict=False)
    except Exception:
        _raise_if_refused(sm, args)
        raise


def _raise_if_refused(sm: nn.Module, args: tuple) -> None:
    """After export failed on the example: the error calling ``sm`` on it gives, if it refuses it
    (export runs the graph's guards without ``sm``'s input check and its messages: another size
    failed with a bare ``AssertionError: Guard failed``). Runs on this failure path only."""
    try:
        with torch.no_grad():
            sm(*args)
    except (ValueError, TypeError) as err:
        if type(err) not in (ValueError, TypeError):
            raise
        raise type(err)(f"fxscale.save: the example is not an input the transformed module runs: {err}") from None
    except Exception:  # noqa: BLE001 -- not refused by the module's checks: export's own error stands
        return


def save(sm: nn.Module, example_inputs: Any, path: str, *, dynamic_batch: bool = True, max_batch: int | None = None,
         inductor_configs: dict | None = None) -> str:
    """Compile ``sm`` (from :func:`fxscale.transform`) into an AOTInductor package at ``path``
    (a ``.pt2`` file) for the device of ``example_inputs``; returns the path.

    ``dynamic_batch``: dim 0 of the inputs (``max_batch`` at most) may change at run time, as may
    the dims declared in ``fxscale.transform(..., dynamic_shapes=...)`` (within their range); the
    other sizes are the example's (bounds were proven for them). The GEMM tilings are tuned now,
    on this machine, at the example's batch.
    """
    ep = export_program(sm, example_inputs, dynamic_batch=dynamic_batch, max_batch=max_batch)
    # The module's buffers are constants to AOTInductor, and inductor inlines 0-d constants (the
    # static scales) as scalars, which torch 2.11's inductor cannot pass to a user Triton kernel
    # ("'<=' not supported between 'Constant' and 'int'", seen on the H200): keep them tensors.
    # Constant folding is off so that the package computes what torch.compile (no freezing) does.
    configs = {"always_keep_tensor_constants": True, "joint_graph_constant_folding": False}
    if hasattr(torch._inductor.config.aot_inductor, "check_lowerbound"):
        # export reports a lower bound of 2 for a dynamic dim, and sizes of 1 run too (an older
        # torch without this flag refuses them with load's ValueError)
        configs["aot_inductor.check_lowerbound"] = False
    configs.update(inductor_configs or {})
    # forward's names and each input's rank / dtype / device, read back by load (_Package)
    args = example_args(sm, example_inputs)
    specs = deploy_checks.input_specs(deploy_checks.input_names(getattr(sm, "_fxscale_signature", None), len(args)),
                                      args, ep)
    metadata = dict(configs.get("aot_inductor.metadata") or {})
    metadata[deploy_checks.METADATA_KEY] = deploy_checks.dumps(specs)
    configs["aot_inductor.metadata"] = metadata
    with torch.no_grad():
        return torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)


def load(path: str):
    """The callable of a package written by :func:`save` (``torch._inductor.aoti_load_package``).

    A package of a transformers model returns its ``ModelOutput`` class, which torch rebuilds only
    once the class's module is imported: it is imported here (otherwise the first call raises
    ``Deserializing transformers.modeling_outputs.X in pytree is not registered``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"fxscale.load: no package at {path!r} (fxscale.save(sm, example_inputs, path) "
                                "writes one)")
    # AOTInductor checks a call's input sizes, dtypes and strides against the package only when
    # this is set (read once per package, at its first call); unchecked, a longer sequence than the
    # example's ran on the example's size and returned a wrong shape, a shorter one read past its
    # end (found by trying a saved dynamic-length model). The check costs < 1 us a call.
    os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
    model = torch._inductor.aoti_load_package(path)
    call_spec = getattr(getattr(model, "loader", None), "get_call_spec", None)
    for spec in (call_spec() if callable(call_spec) else ()):
        _import_pytree_types(spec)
    get_metadata = getattr(model, "get_metadata", None)
    specs = deploy_checks.loads(get_metadata()) if callable(get_metadata) else None
    return _Package(model, path, specs)


class _Package:
    """A loaded package: the inputs, by position or by forward's names, are bound and checked
    against the ones recorded at save time (``specs``; None for a package without them: inputs by
    position, unchecked here), then go to AOTInductor's model; its input check's error
    (``input_handles[0]: dim value is too large at 1, ...``) becomes a ValueError that says what
    the sizes are."""

    def __init__(self, model, path: str, specs: list[dict] | None = None):
        self.model, self.path, self.specs = model, path, specs

    def __call__(self, *args, **kwargs):
        if self.specs is not None:
            args, kwargs = deploy_checks.bind_inputs(self.specs, args, kwargs, f"fxscale package {self.path}"), {}
        elif kwargs:
            raise ValueError(f"fxscale package {self.path}: this package records no input names (saved by an "
                             "older fxscale): pass its inputs by position, in forward's order, or save it again")
        try:
            return self.model(*args, **kwargs)
        except RuntimeError as e:
            m = re.match(r"input_handles\[(\d+)\]: (.*)", str(e).strip())
            if m is None:
                raise
            what = m.group(2)
            if "stride" in what:
                fix = "the package takes each input with the example's strides: pass x.contiguous()"
            elif "dtype" in what:
                fix = "pass the example's dtype"
            else:
                fix = ("the package runs the sizes fxscale.transform proved its bounds for: the example's, except the "
                       "batch and the dims declared in dynamic_shapes (within their range)")
            name = deploy_checks.handle_name(self.specs, int(m.group(1)))
            raise ValueError(f"fxscale package {self.path}: {name}input {m.group(1)} (by position): {what}; "
                             f"{fix}") from None

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def _import_pytree_types(spec: str) -> None:
    """Import the modules of the classes a serialised pytree spec names, until it loads."""
    import importlib

    from torch.utils import _pytree as pytree

    tried: set[str] = set()
    while True:
        try:
            pytree.treespec_loads(spec)
            return
        except NotImplementedError as e:
            m = re.search(r"Deserializing ([\w.]+)\.(\w+) in pytree is not registered", str(e))
            if m is None or m.group(1) in tried:
                raise
            tried.add(m.group(1))
            try:
                importlib.import_module(m.group(1))
            except ImportError as e2:
                raise ImportError(f"fxscale.load: the package returns {m.group(1)}.{m.group(2)}; install what "
                                  f"defines it ({e2})") from e


def package_custom_ops(path: str) -> list[str]:
    """The custom ops a package written by :func:`save` still calls through the dispatcher (Python
    kernels: the loading process must import fxscale), read from its generated C++ wrapper."""
    import zipfile

    found: list[str] = []
    with zipfile.ZipFile(str(path)) as z:
        for name in z.namelist():
            if name.endswith((".cpp", ".json")):
                text = z.read(name).decode("utf-8", "replace")
                for op in re.findall(r"fxscale(?:_kernels)?::[A-Za-z_0-9]+", text):
                    if op not in found:
                        found.append(op)
    return found

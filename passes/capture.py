"""Capture: a model and example inputs -> an ATen-level ``torch.fx.GraphModule``.

The default, ``method="export"``, runs ``torch.export.export(model.eval(), args, strict=False)``
with a dynamic batch (dim 0 of every tensor input) and unlifts the result with ``.module()``:
parameters and buffers become ``get_attr`` nodes, and the module keeps export's pytree
handling, so it takes the model's inputs and returns outputs of the model's structure
(a ``ModelOutput``, a tuple, ...). ``method="symbolic_trace"`` runs ``torch.fx.symbolic_trace``
on a copy of the model (a torch-level graph of ``call_module`` / ``call_function`` nodes,
static shapes) for models that export rejects but FX can trace.

Every node carries ``meta["val"]``: a FakeTensor (or a tuple of them), a SymInt, or ``None``
for nodes that return nothing (export's input guard ``_guards_fn``); the output node's
``meta["val"]`` holds the values of the graph outputs.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
>>> gm = capture(model, (torch.randn(2, 4),))
>>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
['aten.linear.default', 'aten.relu.default']
>>> gm(torch.randn(5, 4)).shape     # dynamic batch
torch.Size([5, 8])
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import traceback
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .causal_mask import sdpa_is_causal_when_plain
from .distributed import capture_local, has_dtensor
from .dynamic_dims import (
    as_auto,
    batch_dims,
    has_batched_tensor,
    merge_dims,
    warn_if_declared_dims_specialised,
    warn_if_static_batch,
)
from .inline_regions import inline_regions
from .input_names import example_args, name_inputs

__all__ = ["METHODS", "CaptureError", "capture"]

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

METHODS = ("export", "symbolic_trace")

_TRY_COMPILE = 'torch.compile(model, backend="fxscale") (it tolerates graph breaks)'
_TRY_FX = 'capture="symbolic_trace"'


class CaptureError(RuntimeError):
    """The model could not be captured as a graph; the message says where and what to try."""


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    method: str = "export",
    dynamic_batch: bool = True,
    dynamic_shapes: Any = None,
) -> torch.fx.GraphModule:
    """Capture ``model`` called on ``example_inputs`` as an fx graph (see the module docstring).

    ``example_inputs``: a tuple of positional arguments (a single tensor is accepted).
    ``dynamic_batch``: export with dim 0 of each tensor input symbolic, so the result runs
    on other batch sizes; where the model fixes its batch size, a warning says so.
    ``dynamic_shapes``: further dynamic dims, as torch.export takes them (one entry per
    positional input: a dict ``{dim: torch.export.Dim(name, max=...)}`` or None), merged with
    the dynamic batch; e.g. ``({1: Dim("seq", max=2048)},)`` for a sequence length.
    The model is run in eval mode; its training flag is restored afterwards.
    Raises :class:`CaptureError` saying why and what to try instead.
    """
    if method not in METHODS:
        raise ValueError(f"unknown capture method {method!r}; choose one of {list(METHODS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"capture needs an nn.Module, got {type(model).__name__}; wrap a function in an nn.Module "
            f"or use {_TRY_COMPILE}"
        )
    args = example_args(model, example_inputs)
    modes = {m: m.training for m in model.modules()}  # each module's own flag: train() would recurse
    _warn_if_training(model)
    try:
        model.eval()
        if method == "export" and has_dtensor(model):
            gm = _export_tensor_parallel(model, args, dynamic_batch)
            name_inputs(gm, model)
        elif method == "export":
            gm = _export(model, args, dynamic_batch, dynamic_shapes)  # names its inputs (its warnings show them)
        else:
            if dynamic_shapes is not None:
                raise ValueError(
                    f"dynamic_shapes needs capture='export'; {method!r} captures static shapes"
                )
            gm = _symbolic_trace(model, args)
            name_inputs(gm, model)
    finally:
        for m, training in modes.items():
            m.training = training
    _fill_output_val(gm)
    own_state(gm)
    return gm


def own_state(gm: torch.fx.GraphModule) -> None:
    """Give ``gm`` its own copy of every tensor it reads (export's module shares the model's):
    the proofs are made from these values, so an in-place edit of the original model must not
    reach the transformed one (issue 11 case 10), nor calibration the model's buffers (case 18)."""
    seen: dict[int, torch.Tensor] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        mod_name, _, attr = name.rpartition(".")
        mod = gm.get_submodule(mod_name) if mod_name else gm
        c = seen.setdefault(id(t), t.detach().clone())
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(c, requires_grad=t.requires_grad)
        else:
            mod._buffers[attr] = c
    for n in gm.graph.nodes:  # plain tensor attributes (lifted constants)
        if n.op == "get_attr":
            mod_name, _, attr = n.target.rpartition(".")
            mod = gm.get_submodule(mod_name) if mod_name else gm
            v = getattr(mod, attr, None)
            if isinstance(v, torch.Tensor) and attr not in mod._parameters and attr not in mod._buffers:
                setattr(mod, attr, seen.setdefault(id(v), v.detach().clone()))


# ---------------------------------------------------------------------------- export


def _export(model: nn.Module, args: tuple, dynamic_batch: bool, dynamic_shapes: Any = None) -> torch.fx.GraphModule:
    with _without_returned_cache(model, args), sdpa_is_causal_when_plain(model, args):
        ep = _exported_program(model, args, dynamic_batch, dynamic_shapes)
    ep = _functionalise_if_mutating(ep)
    gm = ep.module()
    inline_regions(gm)
    name_inputs(gm, model)
    if dynamic_batch:
        warn_if_static_batch(model, gm)
    if dynamic_shapes is not None:
        warn_if_declared_dims_specialised(model, gm, args, dynamic_shapes)
    return gm


def _exported_program(model: nn.Module, args: tuple, dynamic_batch: bool, dynamic_shapes: Any):
    ep = None
    if dynamic_shapes is not None:
        spec = merge_dims(model, args, dynamic_batch, dynamic_shapes)
        try:
            ep = torch.export.export(model, args, strict=False, dynamic_shapes=spec)
        except Exception as e:
            # Named Dims need every guard the model adds to hold over the whole range, which
            # older solvers cannot always show (torch 2.11 + transformers 5.17's Llama:
            # "min(128*s, 512*s) == 128*s" for s <= 2048). Dim.AUTO with the same range lets
            # export keep such guards; the maximum stays declared (checked after capture).
            if "Constraints violated" not in str(e):
                raise _capture_error(model, e, "torch.export") from e
            log.debug("export with named dims failed, retrying with Dim.AUTO ranges: %s", e)
            try:
                ep = torch.export.export(model, args, strict=False, dynamic_shapes=as_auto(spec))
            except Exception as e2:
                raise _capture_error(model, e2, "torch.export") from e2
    elif dynamic_batch and has_batched_tensor(args):
        try:
            ep = torch.export.export(model, args, strict=False, dynamic_shapes=batch_dims(model, args))
        except Exception as e:  # noqa: BLE001  (any failure: retry with static shapes below)
            log.debug("export with a dynamic batch failed, retrying static: %s", e)
            dyn_err = e
            try:
                ep = torch.export.export(model, args, strict=False)
            except Exception as e2:
                raise _capture_error(model, e2, "torch.export") from e2
            warnings.warn(
                f"{type(model).__name__}: torch.export failed with a dynamic batch dimension "
                f"({_first_line(dyn_err)}); captured with the example's static shapes, so other batch "
                "sizes will fail. Pass example inputs of the batch size you will run.",
                stacklevel=3,
            )
    else:
        try:
            ep = torch.export.export(model, args, strict=False)
        except Exception as e:
            raise _capture_error(model, e, "torch.export") from e
    return ep


def _export_tensor_parallel(model: nn.Module, args: tuple, dynamic_batch: bool) -> torch.fx.GraphModule:
    """A DTensor-parallel model: this rank's local graph, collectives included (passes.distributed)."""
    try:
        gm = capture_local(model, args, dynamic_batch)
        inline_regions(gm)
        return gm
    except Exception as e:
        raise _capture_error(model, e, "tracing the tensor-parallel model (make_fx through DTensor, then torch.export)") from e


def _mutates(n: torch.fx.Node) -> bool:
    schema = getattr(n.target, "_schema", None)
    return n.op == "call_function" and schema is not None and schema.is_mutable


def _functionalise_if_mutating(ep):
    """An in-place op (``h.mul_(k)`` seen through a view, ``h[:, :4] = 5``) changes values the
    bounds and the quantise placement have already read (issue 11 cases 5, 6): such graphs are
    rewritten into functional ops (``mul``, ``slice_scatter``), which keep ``linear`` and the
    other high-level ops (no decompositions). Graphs without mutation are left as they are."""
    if not any(_mutates(n) for n in ep.graph.nodes):
        return ep
    return ep.run_decompositions({})


# ---------------------------------------------------------------------------- symbolic_trace


def _symbolic_trace(model: nn.Module, args: tuple) -> torch.fx.GraphModule:
    # A copy: the GraphModule shares submodules with what it traced, and those must stay in
    # eval mode after the user's model gets its training flag back.
    traced = copy.deepcopy(model).eval()
    try:
        gm = torch.fx.symbolic_trace(traced)
    except Exception as e:
        raise _capture_error(model, e, "torch.fx.symbolic_trace") from e
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    try:
        with torch.no_grad():
            FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*args)
    except Exception as e:
        raise _capture_error(model, e, "shape propagation of the symbolic_trace graph") from e
    for n in gm.graph.nodes:
        n.meta.setdefault("val", None)
    return gm


# ---------------------------------------------------------------------------- helpers


def _fill_output_val(gm: torch.fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if n.op == "output":
            n.meta["val"] = pytree.tree_map(
                lambda a: a.meta.get("val") if isinstance(a, torch.fx.Node) else a, n.args[0]
            )
        elif "val" not in n.meta:
            n.meta["val"] = None  # e.g. export's _guards_fn: returns nothing


def _first_line(e: BaseException, limit: int = 300) -> str:
    s = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return s if len(s) <= limit else s[:limit] + "..."


_TORCH_DIR = os.path.dirname(torch.__file__)
_TORCH_MODULES = os.path.join(_TORCH_DIR, "nn", "modules")
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


def _is_model_code(filename: str) -> bool:
    f = os.path.abspath(filename)
    if "<" in filename or f.startswith(_OWN_DIR):
        return False
    return not f.startswith(_TORCH_DIR) or f.startswith(_TORCH_MODULES)


def _user_frame(e: BaseException) -> str | None:
    """The innermost traceback frame in model code (outside torch's machinery and fxscale)."""
    best = None
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for fr in traceback.extract_tb(e.__traceback__):
            if not _is_model_code(fr.filename):
                continue
            best = f"{fr.filename}:{fr.lineno} in {fr.name}" + (f": {fr.line.strip()}" if fr.line else "")
        e = e.__cause__ or e.__context__
    return best


@contextlib.contextmanager


def _without_returned_cache(model: nn.Module, args: tuple):
    """A transformers model whose config says ``use_cache=True`` (every ``...ForCausalLM``'s
    default) returns a ``DynamicCache``, which export cannot return and a transformed graph does
    not hold: captured with ``use_cache=False``, saying so, unless a cache is passed in."""
    configs = [m.config for m in model.modules() if getattr(getattr(m, "config", None), "use_cache", False) is True]
    passes_cache = any("Cache" in type(a).__name__ for a in args)
    if not configs or passes_cache:
        yield
        return
    cfg = getattr(model, "config", None)
    if getattr(cfg, "use_cache", False) is True and _returns_cache(model):  # (a wrapper: its own outputs)
        how = ("To decode with a (float8) cache use fxscale.llm.wrap(model, max_len=...)"
               if not getattr(cfg, "is_encoder_decoder", False) else "Each call recomputes the decoder's keys")
        warnings.warn(
            f"{type(model).__name__}: config.use_cache is True; captured with use_cache=False (torch.export "
            "cannot return transformers' key/value cache, and the transformed graph holds none), so its "
            f"outputs carry no past_key_values. {how}; set model.config.use_cache = False to silence this.",
            stacklevel=4,
        )
    for c in configs:
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs:
            c.use_cache = True


def _warn_if_training(model: nn.Module) -> None:
    """The graph is captured in eval mode (inference): said where that changes what the model
    computes, i.e. where it holds BatchNorm or dropout in training mode (a model left in train
    mode computed BatchNorm from running statistics, silently: 5.5 dB against its train-mode
    output; found by an adversarial trial)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd

    differ = sorted({type(m).__name__ for m in model.modules() if m.training and (
        isinstance(m, _BatchNorm) or (isinstance(m, _DropoutNd) and m.p > 0))})
    if differ:
        warnings.warn(
            f"{type(model).__name__} is in training mode; fxscale captures it in eval mode, for inference "
            f"({', '.join(differ)}: BatchNorm uses its running statistics, dropout is off). Call model.eval() "
            "first to silence this.",
            stacklevel=4,
        )


def _returns_cache(model: nn.Module) -> bool:
    """Would the model return a key/value cache (a decoder; BERT's config has use_cache too)?"""
    cfg = getattr(model, "config", None)
    gen = getattr(model, "can_generate", None)
    try:
        generates = bool(gen()) if callable(gen) else False
    except Exception:  # noqa: BLE001  (a model whose can_generate needs more than itself)
        generates = False
    return generates or bool(getattr(cfg, "is_decoder", False) or getattr(cfg, "is_encoder_decoder", False))


def _uses_cache(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "use_cache", False))


def _capture_error(model: nn.Module, e: BaseException, what: str) -> CaptureError:
    name = type(model).__name__
    msg = str(e).strip()
    if len(msg) > 2000:
        msg = msg[:2000] + " ..."
    lines = [f"{what} could not capture {name}: {type(e).__name__}: {msg}"]
    where = _user_frame(e)
    if where:
        lines.append(f"It failed at {where}")
    if _uses_cache(model) and "cache" in msg.lower():
        lines.append(
            "The model returns a key/value cache (e.g. transformers' DynamicCache), which export "
            "cannot return: set model.config.use_cache = False before transforming it."
        )
    if re.search(r"ConstraintViolation|not in range", f"{type(e).__name__}: {msg}") and "range" in msg:
        lines.append(
            "An example input's size lies outside the range its Dim declares in dynamic_shapes: pass an "
            "example within every Dim's [min, max], or widen the Dim."
        )
        return CaptureError("\n".join(lines))
    tries = [_TRY_COMPILE]
    if what == "torch.export":
        tries.append(_TRY_FX)
    elif what.startswith("torch.fx"):
        tries.append('capture="export" (the default)')
    lines.append("Try instead: " + "; or ".join(tries) + ".")
    return CaptureError("\n".join(lines))

"""The inputs of an AOTInductor package written by :func:`fxscale.save`: recorded at save time
(names as ``forward``'s parameters; per tensor: rank, dtype, sizes, device, contiguity) in the
package's metadata (inductor's ``aot_inductor.metadata``, read back by ``get_metadata()``), and
checked on the host before each call of the loaded package (no device sync).

AOTInductor's own input check reports an index into its flat tensor inputs, and does not catch
an expanded (stride-0) input, an input of another rank, or two same-shaped inputs swapped; these
checks do, and let the package take its inputs by name (``run(**tokenizer_output)``).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import torch
from torch import Tensor

#: the package metadata key holding the recorded inputs (a JSON string)
METADATA_KEY = "fxscale.inputs"
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def input_specs(names: list[str], args: tuple, ep: torch.export.ExportedProgram | None = None) -> list[dict]:
    """One dict per positional input of the package: ``name`` and ``kind`` (``tensor``: with
    ``rank``, ``dtype``, ``shape`` (None for a dynamic dim), ``device``, ``contiguous``;
    ``none``: the example passed None; ``const``: a Python number, baked in, with its ``value``;
    ``other``: a nested input, left to AOTInductor's check).

    >>> input_specs(["x", "mask", "n"], (torch.zeros(2, 3), None, 4))[0]["shape"]
    [2, 3]
    >>> [s["kind"] for s in input_specs(["x", "mask", "n"], (torch.zeros(2, 3), None, 4))]
    ['tensor', 'none', 'const']
    """
    sym: dict[int, list] = {}
    if ep is not None:  # the exported sizes: a symbolic (dynamic) dim is None
        from torch.utils import _pytree as pytree

        user = set(ep.graph_signature.user_inputs)
        vals = [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]
        leaves = pytree.tree_leaves(args)
        if len(vals) == len(leaves):
            sym = {id(a): [d if isinstance(d, int) else None for d in v.shape]
                   for a, v in zip(leaves, vals) if isinstance(a, Tensor) and isinstance(v, Tensor)}
    specs = []
    for name, a in zip(names, args):
        if isinstance(a, Tensor):
            specs.append({"name": name, "kind": "tensor", "rank": a.dim(), "dtype": str(a.dtype).removeprefix("torch."),
                          "shape": sym.get(id(a), list(a.shape)), "device": a.device.type,
                          "contiguous": a.is_contiguous()})
        elif a is None:
            specs.append({"name": name, "kind": "none"})
        elif isinstance(a, (bool, int, float, str)):
            specs.append({"name": name, "kind": "const", "value": a})
        else:
            specs.append({"name": name, "kind": "other"})
    return specs


def input_names(signature: inspect.Signature | None, n: int) -> list[str]:
    """The names of the package's ``n`` positional inputs: ``forward``'s positional parameters
    (``arg{i}`` past them, e.g. for ``forward(*args)``)."""
    params: list[str] = []
    for p in (signature.parameters.values() if signature is not None else ()):
        if p.kind not in _POSITIONAL:
            break
        params.append(p.name)
    return [params[i] if i < len(params) else f"arg{i}" for i in range(n)]


def dumps(specs: list[dict]) -> str:
    return json.dumps({"version": 1, "inputs": specs})


def loads(metadata: dict[str, str]) -> list[dict] | None:
    """The recorded inputs, or None for a package without them (written by an older fxscale)."""
    text = metadata.get(METADATA_KEY)
    if text is None:
        return None
    return json.loads(text).get("inputs")


def _shape(spec: dict) -> str:
    dims = ", ".join("*" if d is None else str(d) for d in spec["shape"])
    return f"({dims}{',' if len(spec['shape']) == 1 else ''})"


def bind_inputs(specs: list[dict], args: tuple, kwargs: dict[str, Any], where: str) -> tuple:
    """The package's positional inputs from ``args`` and keyword arguments named as forward's
    parameters, each checked against its recorded spec (rank, dtype, device, contiguity: host
    checks, no sync); a ValueError names what is off and says what to do.

    >>> specs = input_specs(["ids", "mask"], (torch.zeros(2, 3), torch.ones(2, 3)))
    >>> ids, mask = torch.zeros(2, 3), torch.ones(2, 3)
    >>> bind_inputs(specs, (), {"mask": mask, "ids": ids}, "pkg") == (ids, mask)
    True
    >>> bind_inputs(specs, (ids,), {"maks": mask}, "pkg")
    Traceback (most recent call last):
    ...
    ValueError: pkg: unknown input 'maks'; the package takes (ids, mask), in this order by position or by name
    """
    names = [s["name"] for s in specs]
    takes = f"the package takes ({', '.join(names)}), in this order by position or by name"
    if len(args) > len(specs):
        raise ValueError(f"{where}: {len(args)} inputs given by position, {len(specs)} expected; {takes}")
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise ValueError(f"{where}: unknown input{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; {takes}")
    twice = [k for k in kwargs if names.index(k) < len(args)]
    if twice:
        raise ValueError(f"{where}: input {', '.join(map(repr, twice))} given both by position and by name; {takes}")
    out, missing = list(args), []
    for spec in specs[len(args):]:
        if spec["name"] in kwargs:
            out.append(kwargs[spec["name"]])
        elif spec["kind"] in ("none", "const"):
            out.append(spec.get("value"))  # as the example had it (None, or the baked-in value)
        else:
            missing.append(spec["name"])
            out.append(None)
    for spec, x in zip(specs, out):
        if spec["name"] not in missing:
            _check(spec, x, where)
    if missing:
        raise ValueError(f"{where}: missing input{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(map(repr, missing))}; {takes}")
    return tuple(out)


def _check(spec: dict, x: Any, where: str) -> None:
    name, kind = spec["name"], spec["kind"]
    if kind == "none":
        if x is not None:
            raise ValueError(f"{where}: input {name!r} was None in the example, so the package was compiled "
                             "without it: pass None (or leave it out), or save again with an example that has it")
        return
    if kind == "const":
        if isinstance(x, Tensor) or x != spec["value"]:
            raise ValueError(f"{where}: input {name!r} is {x!r}, but the package has the example's "
                             f"{spec['value']!r} compiled in (torch.export bakes Python values into the graph): "
                             "pass that value, or save again with an example of this one")
        return
    if kind != "tensor":
        return
    dtype = spec["dtype"]
    if not isinstance(x, Tensor):
        hint = "; a dict of inputs: call run(**inputs)" if isinstance(x, dict) or hasattr(x, "keys") else ""
        raise TypeError(f"{where}: input {name!r} must be a tensor (rank {spec['rank']}, {dtype}, shape "
                        f"{_shape(spec)}), got {type(x).__name__}{hint}")
    if x.dim() != spec["rank"]:
        raise ValueError(f"{where}: input {name!r} has {x.dim()} dimension(s) (shape {tuple(x.shape)}), but the "
                         f"package takes rank {spec['rank']}, shape {_shape(spec)} (* a dynamic dim): reshape it "
                         "(e.g. x.unsqueeze(0) for a single sample)")
    if str(x.dtype).removeprefix("torch.") != dtype:
        raise ValueError(f"{where}: input {name!r} has dtype {x.dtype}, but the package takes torch.{dtype} "
                         f"(the example's): pass {name}.to(torch.{dtype})")
    if x.device.type != spec["device"]:
        raise ValueError(f"{where}: input {name!r} is on {x.device}, but the package was compiled for "
                         f"{spec['device']}: pass {name}.to({spec['device']!r})")
    if spec["contiguous"] and not x.is_contiguous():
        raise ValueError(f"{where}: input {name!r} is not contiguous (shape {tuple(x.shape)}, strides {x.stride()}: "
                         "an expanded or transposed view); the package takes each input with the example's "
                         "(contiguous) strides: pass x.contiguous() for it")


def handle_name(specs: list[dict] | None, index: int) -> str:
    """AOTInductor's ``input_handles[index]`` (its flat tensor inputs) as ``'name', `` for messages."""
    if not specs or any(s["kind"] == "other" for s in specs):
        return ""
    tensors = [s for s in specs if s["kind"] == "tensor"]
    return f"{tensors[index]['name']!r}, " if index < len(tensors) else ""

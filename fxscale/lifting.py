"""Lifting a Dynamo region into a graph :func:`fxscale.transform` takes (the backend's first step).

Dynamo hands the backend an FX graph whose placeholders include the module's parameters and
buffers, SymInt sizes and, under ``torch.compile``, fake tensors. :class:`Lifted` turns
parameters and buffers back into constants (so weight scales are static), recomputes SymInt
inputs from the shapes of the tensors they measure (or specialises them to their value), and
materialises example inputs: real ones where Dynamo passes them, else ``randn`` / zeros of the
same shape and dtype with SymInts at their size hints.

>>> import torch
>>> from fxscale.lifting import hint, materialise
>>> hint(7), materialise(torch.empty(2, 3, dtype=torch.int64)).sum().item()
(7, 0)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

__all__ = ["Lifted", "hint", "materialise"]


def _is_fake(x: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)


def _real_value(node: fx.Node, example: Any) -> Any:
    """The real value behind a placeholder: the example if real, else Dynamo's GraphArg's."""
    if isinstance(example, torch.Tensor) and not _is_fake(example):
        return example
    ga = node.meta.get("grapharg")
    if ga is not None:
        try:
            ex = ga.example
        except Exception:  # noqa: BLE001  (weakref gone / not recorded)
            ex = None
        if isinstance(ex, torch.Tensor) and not _is_fake(ex):
            return ex
    return None


def _is_constant(node: fx.Node, example: Any, real: Any) -> bool:
    """Parameters and buffers of the compiled module: quantised once, not per call."""
    if isinstance(example, nn.Parameter) or isinstance(real, nn.Parameter):
        return True
    ga = node.meta.get("grapharg")
    src = str(getattr(ga, "source", "")) if ga is not None else ""
    return "ParamBufferSource" in src or "_parameters" in src or "_buffers" in src


def _wrapped_scalar(node: fx.Node) -> bool:
    """A Python scalar Dynamo passes as a 0-d tensor (unspecialised float)."""
    return bool(getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False))


def scalar_value(x: Any) -> Any:
    """The call's value of a specialised input: a wrapped scalar's Python number (a host tensor)."""
    return x.item() if isinstance(x, torch.Tensor) and x.dim() == 0 else x


def hint(s: Any) -> int:
    if isinstance(s, int):
        return s
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(s, fallback=2))
    except Exception:  # noqa: BLE001
        hint = getattr(getattr(s, "node", None), "hint", None)
        return int(hint) if hint is not None else 2


def _size_source(node: fx.Node):
    """``(base source, dim)`` where a SymInt placeholder is ``tensor.size(dim)``, else None."""
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    if src is None or type(src).__name__ != "TensorPropertySource":
        return None
    if "SIZE" not in str(getattr(src, "prop", "")):
        return None
    return getattr(src, "base", None), getattr(src, "idx", None)


def materialise(t: torch.Tensor) -> torch.Tensor:
    shape = [hint(s) for s in t.shape]
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return torch.randn(shape, dtype=t.dtype, device=t.device)
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


class Lifted:
    """Dynamo's graph with parameters/buffers as ``get_attr`` constants and SymInt inputs
    recomputed from tensor shapes (or specialised to their value, where Dynamo does not
    say which tensor they measure). ``module`` takes only the tensor inputs."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], int_values: dict[int, Any]):
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(phs) != len(example_inputs):
            raise ValueError(f"graph has {len(phs)} inputs but Dynamo passed {len(example_inputs)}")
        root = nn.Module()
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        self.input_positions: list[int] = []     # positions of the call's args the module takes
        self.specialised: dict[int, Any] = {}    # position -> value baked into the graph
        self.examples: list[Any] = []            # example values for the module's inputs
        tensor_by_source: dict[str, fx.Node] = {}
        pending_sizes = []
        for i, (n, ex) in enumerate(zip(phs, example_inputs)):
            real = _real_value(n, ex)
            if isinstance(ex, torch.Tensor) and _is_constant(n, ex, real):
                if real is None:
                    raise ValueError(
                        f"no real value for parameter {n.format_node()}: the fxscale backend needs the "
                        "module's real weights"
                    )
                name = f"_const_{len(root._buffers) + len(root._parameters)}"
                root.register_buffer(name, real.detach(), persistent=False)
                env[n] = graph.get_attr(name)
                env[n].meta.update(n.meta)
            elif isinstance(ex, torch.Tensor) and _wrapped_scalar(n) and (i in int_values or real is not None):
                # A Python float Dynamo passes as a 0-d tensor (dynamic=True: LayerNorm's eps, a
                # ``* self.alpha``): baked in as a constant, another value transforms again (its
                # ``.item()`` was data-dependent to export: the region ran unquantised).
                v = int_values[i] if i in int_values else real.item()
                self.specialised[i] = v
                env[n] = ("const", v)
            elif isinstance(ex, torch.Tensor):
                p = graph.placeholder(n.name)
                p.meta.update(n.meta)
                env[n] = p
                self.input_positions.append(i)
                self.examples.append(real if real is not None else materialise(ex))
                ga = n.meta.get("grapharg")
                if ga is not None and getattr(ga, "source", None) is not None:
                    tensor_by_source[str(ga.source)] = p
            else:
                pending_sizes.append((i, n, ex))
        # SymInt / scalar inputs: a size of a tensor input where Dynamo says so, else a constant.
        for i, n, ex in pending_sizes:
            ss = _size_source(n)
            t = tensor_by_source.get(str(ss[0])) if ss is not None else None
            if t is not None and isinstance(ss[1], int):
                env[n] = ("size", t, ss[1])
            else:
                v = int_values.get(i, ex)
                v = hint(v) if isinstance(v, torch.SymInt) else v
                if isinstance(v, (torch.SymFloat, torch.SymBool)):
                    raise ValueError(f"unsupported symbolic input {n.format_node()}")
                self.specialised[i] = v
                env[n] = ("const", v)
        sizes: dict[fx.Node, fx.Node] = {}

        def arg(a):
            if not isinstance(a, fx.Node):
                return a
            v = env[a]
            if isinstance(v, tuple):
                if v[0] == "const":
                    return v[1]
                if a not in sizes:
                    sizes[a] = graph.call_function(torch.ops.aten.sym_size.int, (v[1], v[2]))
                return sizes[a]
            return v

        for n in gm.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "call_method" and n.target == "item" and isinstance(env.get(n.args[0]), tuple):
                env[n] = env[n.args[0]]  # the baked-in scalar itself
                continue
            if n.op == "output":
                graph.output(fx.node.map_arg(n.args[0], arg))
                continue
            if n.op in ("get_attr", "call_module"):
                obj = gm
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                name = str(n.target).replace(".", "_")
                setattr(root, name, obj)
                new = graph.create_node(n.op, name, fx.node.map_arg(n.args, arg), fx.node.map_arg(n.kwargs, arg))
            else:
                new = graph.create_node(
                    n.op, n.target, fx.node.map_arg(n.args, arg), fx.node.map_arg(n.kwargs, arg), n.name
                )
            new.meta.update(n.meta)
            env[n] = new
        graph.lint()
        self.module = fx.GraphModule(root, graph, class_name="FxscaleRegion").eval()

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
activation-by-activation ``scaled_matmul`` and ``scaled_conv2d``; on the CPU, every fxscale
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
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["export_program", "load", "package_custom_ops", "save"]


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


def _batch_shapes(args: tuple, dynamic_batch: bool, max_batch: int | None):
    """One dynamic ``batch`` Dim for dim 0 of every tensor input whose dim 0 is the first input's."""
    if not dynamic_batch:
        return None
    tensors = [a for a in args if isinstance(a, Tensor) and a.dim() >= 1]
    if not tensors:
        return None
    b0 = tensors[0].shape[0]
    if b0 < 2:
        raise ValueError(f"dynamic_batch needs an example batch of at least 2 (got {b0}): export "
                         "specialises sizes 0 and 1; pass a larger example or dynamic_batch=False")
    batch = torch.export.Dim("batch", min=1, max=max_batch or (1 << 20))
    # forward(*args): one entry, the tuple of the arguments' specs
    return (tuple({0: batch} if isinstance(a, Tensor) and a.dim() >= 1 and a.shape[0] == b0 else None for a in args),)


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
    args = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    cfg = getattr(sm, "config", None)
    if getattr(sm, "_fxscale_checks", None) is not None and cfg is not None and cfg.on_overflow != "clamp":
        warnings.warn(f"fxscale.save: the package does not check inputs against input_bounds "
                      f"(on_overflow={cfg.on_overflow!r} is a host-side check); transform with "
                      "on_overflow='clamp' to keep the bound inside the package", stacklevel=3)
    with torch.no_grad():
        return torch.export.export(_Deployable(sm), args, dynamic_shapes=_batch_shapes(args, dynamic_batch, max_batch),
                                   strict=False)


def save(sm: nn.Module, example_inputs: Any, path: str, *, dynamic_batch: bool = True, max_batch: int | None = None,
         inductor_configs: dict | None = None) -> str:
    """Compile ``sm`` (from :func:`fxscale.transform`) into an AOTInductor package at ``path``
    (a ``.pt2`` file) for the device of ``example_inputs``; returns the path.

    ``dynamic_batch``: dim 0 of the inputs (``max_batch`` at most) may change at run time; the
    other sizes are the example's (bounds were proven for them). The GEMM tilings are tuned now,
    on this machine, at the example's batch.
    """
    ep = export_program(sm, example_inputs, dynamic_batch=dynamic_batch, max_batch=max_batch)
    # The module's buffers are constants to AOTInductor, and inductor inlines 0-d constants (the
    # static scales) as scalars, which torch 2.11's inductor cannot pass to a user Triton kernel
    # ("'<=' not supported between 'Constant' and 'int'", seen on the H200): keep them tensors.
    # Constant folding is off so that the package computes what torch.compile (no freezing) does.
    configs = {"always_keep_tensor_constants": True, "joint_graph_constant_folding": False,
               **(inductor_configs or {})}
    with torch.no_grad():
        return torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)


def load(path: str):
    """The callable of a package written by :func:`save` (``torch._inductor.aoti_load_package``).

    A package of a transformers model returns its ``ModelOutput`` class, which torch rebuilds only
    once the class's module is imported: it is imported here (otherwise the first call raises
    ``Deserializing transformers.modeling_outputs.X in pytree is not registered``).
    """
    model = torch._inductor.aoti_load_package(str(path))
    call_spec = getattr(getattr(model, "loader", None), "get_call_spec", None)
    for spec in (call_spec() if callable(call_spec) else ()):
        _import_pytree_types(spec)
    return model


def _import_pytree_types(spec: str) -> None:
    """Import the modules of the classes a serialised pytree spec names, until it loads."""
    import importlib
    import re

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
    import re
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

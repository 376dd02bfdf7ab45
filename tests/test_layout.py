"""The package's shape: the runtime (``fxscale``) never imports the compiler (``passes``) at
import time, no module imports itself in a circle, and a saved transformed model loads and
runs where ``passes`` cannot be imported at all.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fxscale", "passes")

#: A meta-path finder that refuses ``passes`` and its submodules (source for a subprocess).
BLOCK_PASSES = textwrap.dedent(
    """
    import sys

    class _BlockPasses:
        def find_spec(self, name, path=None, target=None):
            if name == "passes" or name.startswith("passes."):
                raise ImportError(f"importing {name} is blocked: the runtime must not need the compiler")
            return None

    sys.meta_path.insert(0, _BlockPasses())
    """
)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _import_time_nodes(tree: ast.Module):
    """Import statements that run when the module is imported: not inside a function body and
    not under ``if TYPE_CHECKING:``."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def module_graph() -> nx.DiGraph:
    """Edges ``a -> b``: module ``a`` of fxscale / passes imports module ``b`` of either at import time."""
    g = nx.DiGraph()
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = _module_name(path)
            g.add_node(name)
            is_pkg = path.name == "__init__.py"
            for node in _import_time_nodes(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                else:
                    base = name if is_pkg else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    mod = node.module or ""
                    src = (f"{base}.{mod}" if mod else base) if node.level else mod
                    subs = [f"{src}.{a.name}" for a in node.names if _is_module(f"{src}.{a.name}")]
                    targets = subs or [src]
                for t in targets:
                    if t.split(".")[0] in PACKAGES and t != name:
                        g.add_edge(name, t)
    return g


def test_module_graph_sees_the_known_edges():
    """The walk itself works: edges that certainly exist are found."""
    g = module_graph()
    assert g.has_edge("fxscale.rules.numeric", "fxscale.rules.registry")
    assert g.has_edge("fxscale.rules", "fxscale.rules.numeric")
    assert g.has_edge("passes.lower", "fxscale.runtime")
    assert g.has_edge("fxscale.scaled_ops", "fxscale.scaled")


def test_no_fxscale_module_imports_passes_at_import_time():
    g = module_graph()
    bad = sorted((a, b) for a, b in g.edges if a.split(".")[0] == "fxscale" and b.split(".")[0] == "passes")
    assert not bad, f"runtime modules import the compiler at import time: {bad}"


def test_no_import_cycles():
    g = module_graph()
    cycles = sorted(sorted(c) for c in nx.simple_cycles(g))
    assert not cycles, f"import cycles: {cycles}"


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_importing_every_fxscale_module_leaves_passes_unimported():
    code = BLOCK_PASSES + textwrap.dedent(
        """
        import importlib, pkgutil, fxscale
        for m in pkgutil.walk_packages(fxscale.__path__, "fxscale."):
            try:
                importlib.import_module(m.name)
            except ImportError as e:
                if "triton" not in str(e):  # the Triton kernels need triton (absent on CPU machines)
                    raise
        assert not [k for k in sys.modules if k == "passes" or k.startswith("passes.")]
        print("ok")
        """
    )
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.slow
def test_saved_transformed_model_loads_and_runs_without_passes(tmp_path):
    """A model with run-time scales (ScaleFn) and static weight buffers, exported and saved,
    then loaded in a fresh process where ``import passes`` raises: same outputs, bit for bit."""
    from fxscale.api import transform

    from . import models

    model, args = models.ZOO["cnn"]()
    sm = transform(model, args, format="e4m3")
    assert any(type(m).__name__ == "ScaleFn" for m in sm.modules())
    ep = torch.export.export(sm, args)
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    with torch.no_grad():
        torch.save({"args": args, "out": sm(*args)}, tmp_path / "io.pt")
    code = BLOCK_PASSES + textwrap.dedent(
        f"""
        import torch
        import fxscale  # the runtime: its ops
        io = torch.load({str(tmp_path / "io.pt")!r})
        ep = torch.export.load({str(path)!r})
        with torch.no_grad():
            out = ep.module()(*io["args"])
        assert torch.equal(out, io["out"]), (out - io["out"]).abs().max()
        assert "passes" not in sys.modules
        print("ok")
        """
    )
    r = _run(code)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]

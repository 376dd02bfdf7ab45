"""``torch.compile(model, backend="fxscale")`` from the installed package, fxscale never
imported first (issue 14, item 3: Dynamo's entry-point load imported fxscale, whose import
registered the name, and Dynamo's own registration then failed: ``duplicate name: fxscale``).

Runs in a subprocess against a wheel built from this tree and installed into a directory
of its own, from a working directory outside the tree, so nothing here is imported first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    import torch
    assert "fxscale" not in sys.modules
    warnings.simplefilter("error")                # the backend must not fall back with a warning
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x = torch.randn(4, 16)
    fast = torch.compile(model, backend="fxscale", options={"inductor": False, "strict": True})
    with torch.no_grad():
        y, ref = fast(x), model(x)
    import fxscale
    assert fxscale.__file__.startswith(sys.argv[1]), fxscale.__file__
    assert fxscale.sqnr_db(ref, y) > 20.0
    line = fxscale.backend.reports()[-1].summary_line()
    assert line.split(": ")[1].startswith("2 of"), line
    print("OK", line)
    """
)


@pytest.mark.slow
def test__backend_by_name__after_install__without_importing_fxscale_first(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("fxscale", "passes"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fxscale-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(site)], cwd=tmp_path, env=env, check=False,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OK" in run.stdout

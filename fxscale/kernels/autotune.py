"""The autotuner behind the CUDA kernels: per key (op, shapes, dtypes, epilogue), every candidate
implementation is timed once -- replays of a CUDA graph, operands out of the L2 cache -- and the
fastest is cached (:func:`choices`); :func:`force` pins a family for tests and benchmarks.

>>> from fxscale.kernels import autotune
>>> autotune.bucket(1), autotune.bucket(17), autotune.bucket(2048)
(1, 32, 2048)
"""

from __future__ import annotations

import math
import os
import statistics
import warnings
from dataclasses import dataclass

import torch

__all__ = ["Choice", "bucket", "choices", "clear_cache", "dispatch", "failures", "force", "forced", "warn_once"]


@dataclass(frozen=True)
class Choice:
    """The candidate chosen for one key, and what each candidate measured (ms; None: failed)."""

    name: str
    cfg: object
    ms: float | None
    timings: tuple = ()

    @property
    def label(self) -> str:
        return self.name if self.cfg is None else f"{self.name}:{self.cfg!r}"


_CHOICES: dict[tuple, Choice] = {}
_FAILURES: dict[str, str] = {}
_WARNED: set = set()
_FORCED: str | None = None


def choices() -> dict[tuple, Choice]:
    """The autotuner's cache: key -> :class:`Choice` (what ran, and every candidate's time)."""
    return dict(_CHOICES)


def failures() -> dict[str, str]:
    """Candidates that failed to compile or run during autotuning, with the error."""
    return dict(_FAILURES)


def clear_cache() -> None:
    _CHOICES.clear()


def forced() -> str | None:
    """The family pinned by :func:`force` (None: automatic)."""
    return _FORCED


def force(name: str | None) -> None:
    """Pin a candidate family (``"cublas"``, ``"triton"``, ``"intmm"``, ``"reference"``) or
    ``None`` for automatic choice. Where the pinned family does not apply, the choice is automatic."""
    global _FORCED
    _FORCED = name
    _CHOICES.clear()


def warn_once(key, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, stacklevel=3)


def _enabled() -> bool:
    return os.environ.get("FXSCALE_AUTOTUNE", "1") != "0"


def cold_copies(args) -> list[tuple]:
    """``args``, and copies of its tensors, enough that one pass over them all does not fit in
    the L2 cache (twice its size, at most 32 sets and 512 MiB). A model step reads each weight
    once from HBM; the same 16 MB weight timed over and over is served from the 50 MB L2 of a
    Hopper, which made decode-sized (M <= 64) GEMMs look faster on cuBLAS than they run."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    size = sum(t.numel() * t.element_size() for t in tensors)
    if not tensors or size == 0:
        return [args]
    l2 = getattr(torch.cuda.get_device_properties(tensors[0].device), "L2_cache_size", 0) or 0
    n = min(32, max(1, math.ceil(2 * l2 / size)), max(1, (512 << 20) // size))
    sets = [args]
    for _ in range(n - 1):
        sets.append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
    return sets


def time_ms(fn, args) -> float:
    """Device time of one call, with the operands out of the L2 cache (:func:`cold_copies`):
    replays of a CUDA graph of several calls (so that launch overhead, which graphs remove, does
    not decide); plain event timing where capture fails."""
    sets = cold_copies(args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(*args)
    end.record()
    end.synchronize()
    first = max(start.elapsed_time(end), 1e-3)
    n = int(max(len(sets), min(20, 2.0 / first)))
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(n):
                fn(*sets[i % len(sets)])
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            ts.append(start.elapsed_time(end) / n)
        del g
        return statistics.median(ts)
    except Exception:  # noqa: BLE001  (capture refused: fall back to batched events)
        torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        start.record()
        for i in range(n):
            fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / n)
    return statistics.median(ts)


def label(name, cfg) -> str:
    return name if cfg is None else f"{name}:{cfg!r}"


def dispatch(key, make_cands, args, resolve):
    """Run the cached choice for ``key``; on a miss, measure the candidates (or, where that is
    not possible, take the first that runs) and cache the winner."""
    c = _CHOICES.get(key)
    if c is not None:
        return resolve(c.name, c.cfg)(*args)
    cands = make_cands()
    capturing = torch.cuda.is_current_stream_capturing()
    if capturing or not _enabled() or len(cands) == 1:
        err = None
        for name, cfg in cands:
            try:
                out = resolve(name, cfg)(*args)
            except Exception as e:  # this candidate cannot run here: try the next
                if capturing:
                    raise
                _FAILURES[label(name, cfg)] = f"{type(e).__name__}: {str(e)[:300]}"
                err = e
                continue
            if not capturing:
                _CHOICES[key] = Choice(name, cfg, None)
            return out
        raise err
    best = None
    timings = []
    for name, cfg in cands:
        if name in ("reference", "unfused") and best is not None:
            continue  # the slow always-correct path only where nothing faster ran
        fn = resolve(name, cfg)
        try:
            fn(*args)
            torch.cuda.synchronize()
            ms = time_ms(fn, args)
        except Exception as e:  # noqa: BLE001  (compile failure, out of shared memory, unsupported layout)
            torch.cuda.synchronize()
            _FAILURES[label(name, cfg)] = f"{type(e).__name__}: {str(e)[:300]}"
            timings.append((label(name, cfg), None))
            continue
        timings.append((label(name, cfg), ms))
        if best is None or ms < best[2]:
            best = (name, cfg, ms)
    if best is None:
        raise RuntimeError(f"fxscale: no implementation ran for {key}; see fxscale.kernels.cuda.failures()")
    if best[0] == "reference":
        warn_once(("ref", key), f"fxscale: only the reference implementation runs for {key} (slow); "
                   "see fxscale.kernels.cuda.failures()")
    c = Choice(best[0], best[1], best[2], tuple(timings))
    _CHOICES[key] = c
    return resolve(c.name, c.cfg)(*args)


def bucket(m: int) -> int:
    """The rows part of the autotune key: M = 1 (a batch-1 decode step) on its own, then powers
    of two from 16. On the H200 the best kernel at M = 1 differs from M = 16's (k / v projection,
    cold L2: cuBLAS fp8 12.5 us at M = 1, 6.2 at M = 16; the split-K Triton tiling 7.2 at M = 1)."""
    if m == 1:
        return 1
    return max(16, 1 << max(0, (m - 1).bit_length()))

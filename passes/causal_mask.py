"""Capture transformers' causal attention as SDPA's ``is_causal``, not a materialised mask.

Run eagerly with no padding mask and no cache offset, transformers' ``sdpa`` mask function
returns no mask at all and its attention calls ``scaled_dot_product_attention(...,
is_causal=True)``, which dispatches to the flash / cuDNN kernels. Under ``torch.export`` it
refuses that shortcut (``_ignore_causal_mask_sdpa``: an exported ``is_causal`` would be wrong
when the graph is later called with a cache, pytorch#108108) and builds a ``(B, 1, S, S)``
boolean mask from ``arange`` comparisons, which the GPU then expands per head into an
additive bias (about 1 GB per layer at 4x2048 tokens with 32 heads) and feeds to the slower
masked attention kernel.

The graph ``fxscale.transform`` captures holds no cache: its keys are this call's keys, so
``q_length == kv_length`` is the same symbolic size for every input shape and the causal
mask is exactly ``is_causal``'s (upper-left aligned) triangle. :func:`sdpa_is_causal_when_plain`
makes the mask function return ``None`` under exactly that condition, checked on the symbolic
sizes without adding guards: the mask function is transformers' plain ``causal_mask_function``
(no sliding window, chunking or extra and/or masks), no padding ``attention_mask`` was given,
both offsets are 0 and the two lengths are statically equal. Anything else goes to
transformers' own function unchanged.

Packed sequences: without a mask or cache, transformers reads ``position_ids`` for several
sequences packed in one row (a restart of the positions), which under tracing it cannot
decide, so it always adds a mask of them. When a transformers model is called with its token
ids (or embeddings) and nothing else, it computes the positions itself as ``arange(S)`` (no
cache: offset 0), one sequence per row, and transformers' own eager answer (no packing) is
given. Any other call (``position_ids``, a padding mask, images, a module wrapping the model,
which may pass positions inside) keeps the mask.

>>> import torch
>>> model, args = torch.nn.Linear(2, 2), (torch.ones(1, 2),)
>>> with sdpa_is_causal_when_plain(model, args):
...     ep = torch.export.export(model, args)
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator

from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["sdpa_is_causal_when_plain"]


def _known(cond) -> bool:
    return cond is True or (not isinstance(cond, bool) and statically_known_true(cond))


def _plain_causal(mu, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                  local_size=None, allow_is_causal_skip=True, **_) -> bool:
    """Whether transformers' mask for these arguments is ``is_causal``'s triangle for every size."""
    if not allow_is_causal_skip or attention_mask is not None or local_size is not None:
        return False
    if mask_function is not getattr(mu, "causal_mask_function", None):
        return False
    if not all(isinstance(v, int) or hasattr(v, "node") for v in (q_length, kv_length, q_offset, kv_offset)):
        return False  # a tensor offset (a static cache's position): not known at capture
    return _known(q_offset == 0) and _known(kv_offset == 0) and _known(q_length == kv_length)


def _own_positions(model, args: tuple, kwargs: dict) -> bool:
    """Whether ``model`` is a transformers model called with token ids (or embeddings) alone, so
    that it computes its positions itself as ``arange(S)``. Anything else (a wrapper that may
    pass positions inside, ``position_ids``, images, a cache) keeps the packed-sequence mask."""
    if not any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__):
        return False
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    given = {k for k, v in bound.arguments.items() if v is not None and k not in ("args", "kwargs")}
    return bool(given) and given <= {"input_ids", "inputs_embeds"}


@contextlib.contextmanager
def sdpa_is_causal_when_plain(model, args: tuple = (), kwargs: dict | None = None) -> Iterator[None]:
    """While capturing ``model(*args, **kwargs)``: transformers' ``sdpa`` mask function returns
    ``None`` (attention then runs ``is_causal=True``) where its mask is the plain causal
    triangle (module docstring). Does nothing if transformers was not imported."""
    mu = sys.modules.get("transformers.masking_utils")
    interface = getattr(mu, "ALL_MASK_ATTENTION_FUNCTIONS", None)
    mapping = getattr(type(interface), "_global_mapping", None)
    original = mapping.get("sdpa") if isinstance(mapping, dict) else None
    packed = getattr(mu, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return

    def sdpa_mask(*a, **kw):
        if not a and _plain_causal(mu, **kw):
            return None
        return original(*a, **kw)

    mapping["sdpa"] = sdpa_mask
    own_positions = packed is not None and _own_positions(model, args, kwargs or {})
    if own_positions:
        mu.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        mapping["sdpa"] = original
        if own_positions:
            mu.find_packed_sequence_indices = packed

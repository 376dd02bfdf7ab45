"""Language models: a transformers ``...ForCausalLM`` with a float8 KV cache, and ``generate()``.

:func:`wrap` transforms the model once, with the sequence length dynamic up to ``max_len``,
into one *step* graph: ``step(input_ids (B, S), positions (S,), *caches) -> (logits, new K/V)``.
It serves prefill (any ``S <= max_len``) and decode (``S = 1``) alike. K and V live in a static
cache in float8 (e4m3) with **static scales proven from the K/V projections' bounds** (no
calibration, no per-step amax): K of layer ``i`` is ``rope(norm(h) @ W_k)``, bounded by the
rules whatever the input, so ``K / scale`` is within the format's range by construction.
On CUDA, attention is ``fxscale_kernels::kv_decode_attention`` (a Triton split-KV kernel
reading the float8 cache, :mod:`fxscale.kernels.decode_attention`); elsewhere it reads the cache
through ``fxscale::kv_read`` (dequantise into SDPA). Both rules hold whatever the cache holds
(``|value| <= 448 * scale``). Writing the new K/V into the cache
(``index_copy_`` at the positions) happens outside the transformed graph, in the step
function, so no graph pass can drop it; the step has no host syncs (CUDA-graph capturable).

>>> import torch, fxscale.llm
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
...                   num_key_value_heads=2, vocab_size=100)
>>> lm = LlamaForCausalLM(cfg).eval()
>>> flm = fxscale.llm.wrap(lm, max_len=64)
>>> out = flm.generate(torch.randint(0, 100, (1, 5)), max_new_tokens=4, do_sample=False)
>>> out.shape
torch.Size([1, 9])
>>> print(flm.report_kv())  # doctest: +ELLIPSIS
KV cache: float8_e4m3fn, ... bytes for batch 1 x 64 positions (bfloat16: ...; 0.50x)...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .kv_attention import KV_FORMAT, _dims, _example, _register_attention, _Step, kv_bounds

__all__ = ["KV_FORMAT", "FxscaleCausalLM", "wrap"]


# ---------------------------------------------------------------------------- wrap
def wrap(lm: nn.Module, *, max_len: int, batch: int = 2, **transform_options: Any) -> FxscaleCausalLM:
    """Transform a transformers ``...ForCausalLM`` for inference with a float8 KV cache.

    ``max_len``: the most positions (prompt + generated tokens) a sequence may have; every
    bound that depends on the length is proven at it. ``batch``: the example batch (any batch
    runs; an example of 1 would fix it, so at least 2 are traced). Other keyword arguments go to :func:`fxscale.transform`. Returns a
    :class:`FxscaleCausalLM`, whose ``generate()`` is transformers' (greedy and sampling).
    """
    from passes.capture import CaptureError

    from .api import transform

    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        what = "an encoder-decoder model" if cfg is not None else "not a transformers model (no config)"
        raise ValueError(
            f"fxscale.llm.wrap takes a decoder-only transformers ...ForCausalLM; {type(lm).__name__} is {what}. "
            "Transform it without a cache: fxscale.transform(model, {'input_ids': ids, 'attention_mask': mask, "
            "'decoder_input_ids': dec}) for its forward, or torch.compile(model, backend='fxscale') under generate()")
    table = next((getattr(lm.config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                  if isinstance(getattr(lm.config, k, None), int)), None)
    if table is not None and max_len > table:
        raise ValueError(f"max_len={max_len} is beyond the model's {table} positions "
                         "(config.max_position_embeddings / n_positions): declare max_len <= that")
    _register_attention()
    lm = lm.eval()
    layers = _dims(lm.config)[0]
    dtype = next(lm.parameters()).dtype
    batch = max(int(batch), 2)  # torch.export specialises a dimension of size 1
    args, shapes = _example(lm, batch, max_len)
    # The K/V bounds are proven without requantise points (all static: they follow from the
    # token embedding and the weights, not from run-time measurements, which would make them
    # depend on each call; a LayerNorm's bound depends on its input's max |x| through the
    # kernel's rounding). They hold in the deployed graph too: a requantise only gives an
    # operand a finer scale (its measured amax is within its static bound), so less rounding.
    # Each pass reads the cache with the scales the previous one proved, until they settle.
    bound_options = {**transform_options, "requantise": False}
    scales = [(1.0, 1.0)] * layers
    unsupported = (f"fxscale.llm.wrap: {type(lm).__name__}'s attention does not run through transformers' attention "
                   "interface (config._attn_implementation) in every layer, which the float8 cache needs (models with "
                   "their own attention code, e.g. Bloom's ALiBi, or Falcon's before transformers 5.25, are not supported). Transform it without "
                   "a cache instead: fxscale.transform(lm, (ids,), dynamic_shapes=...), or torch.compile(lm, "
                   "backend='fxscale')")
    for _ in range(3):
        try:
            sm = transform(_Step(lm, scales), args, dynamic_shapes=shapes, **bound_options)
        except CaptureError as e:
            raise ValueError(f"{unsupported}. Capture failed: {str(e).splitlines()[0]}") from e
        bounds = kv_bounds(sm)
        if len(bounds) != 2 * layers:
            raise ValueError(f"{unsupported}: {len(bounds) // 2} of {layers} layers did")
        new = [(KV_FORMAT.scale_for(bounds[2 * i]), KV_FORMAT.scale_for(bounds[2 * i + 1])) for i in range(layers)]
        if new == scales:
            break
        scales = new
    else:
        raise RuntimeError("fxscale.llm: the K/V scales did not settle in 3 transforms")
    if transform_options.get("requantise", True):  # the deployed graph, with its requantise points
        sm = transform(_Step(lm, scales), args, dynamic_shapes=shapes, **transform_options)

    def build(kind: str) -> nn.Module:
        """The step graph of left-padded prompts ("padded") or of a new unpadded sequence
        ("fresh", no cache read; "fresh_last": its last logits only), on the first such prompt;
        its K/V must fit the proven scales."""
        args, shapes = _example(lm, batch, max_len, kind)
        step = _Step(lm, scales, fresh=kind.startswith("fresh"), last=kind == "fresh_last")
        proof = transform(step, args, dynamic_shapes=shapes, **bound_options)
        for j, bound in enumerate(kv_bounds(proof)):
            if bound > KV_FORMAT.max * scales[j // 2][j % 2]:
                raise RuntimeError(f"fxscale.llm: the {kind} step's K/V bound {bound:g} (output {j}) exceeds the "
                                   "cache scale proven by the step graph")
        if not transform_options.get("requantise", True):
            return proof
        return transform(step, args, dynamic_shapes=shapes, **transform_options)

    return FxscaleCausalLM(lm, sm, scales, bounds, max_len=max_len, dtype=dtype, build=build)


def _base_classes() -> tuple[type, ...]:
    """transformers' PreTrainedModel and GenerationMixin: what ``generate()`` expects of a model."""
    from transformers import GenerationMixin, PreTrainedModel

    return (PreTrainedModel, GenerationMixin)


class FxscaleCausalLM(*_base_classes()):
    """A transformed causal LM with its own float8 KV cache; transformers' ``generate()`` works.

    ``flm(input_ids)`` prefills a fresh sequence (any length up to ``max_len``) and returns
    ``logits``; inside ``generate()`` each call feeds only the tokens the cache has not seen.
    A new unpadded prompt runs ``step_fresh(input_ids, positions)``, a graph transformed on the
    first one, which attends with causal SDPA over its own keys and reads no cache (the step
    graph would read all ``max_len`` cached positions through a mask).
    ``step(input_ids, positions)`` is one step (writes the cache); replace it with
    ``torch.compile(flm.step, mode="reduce-overhead")`` for CUDA-graph decode. Prompts of
    different lengths: left-padded, with their ``attention_mask`` (``tokenizer.padding_side =
    "left"``); the first padded prompt transforms a second step graph, ``step_padded(input_ids,
    positions)`` (its pad counts are the buffer ``pad``), compiled the same way if wanted.
    """

    main_input_name = "input_ids"
    _supports_cache_class = False
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, lm: nn.Module, sm: nn.Module, scales, bounds, *, max_len: int, dtype: torch.dtype,
                 build: Callable[[str], nn.Module] | None = None):
        import copy

        super().__init__(copy.deepcopy(lm.config))  # a copy: PreTrainedModel adjusts it
        self.generation_config = copy.deepcopy(lm.generation_config)
        self.sm = sm
        self.scales, self.kv_bounds, self.max_len, self.model_dtype = scales, bounds, max_len, dtype
        self.layers, self.kv_heads, self.head_dim = _dims(lm.config)
        self._device = next(lm.parameters()).device
        self.cache_len = 0
        for j in range(2 * self.layers):  # buffers: static addresses, so CUDA graphs may write them
            self.register_buffer(f"cache_{j}", None, persistent=False)
        self.register_buffer("positions", torch.arange(max_len, device=self._device), persistent=False)
        self.register_buffer("pad", None, persistent=False)
        self._len = 0
        self._in_generate = False
        self._need = 0  # the positions the running generate() may reach (a shorter cache is reallocated)
        self._padded = False  # is the sequence in the cache left-padded?
        self._build, self.sm_padded, self.sm_fresh, self.sm_fresh_last = build, None, None, None
        self.step = self._step
        self.step_padded = self._step_padded
        self.step_fresh = self._step_fresh

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.model_dtype

    @property
    def report(self):
        """The step graph's per-node :class:`~fxscale.report.Report`."""
        return self.sm.report

    def can_generate(self) -> bool:
        return True

    @property
    def caches(self) -> list[Tensor]:
        """The float8 K and V caches (as uint8 bytes), ``[K_0, V_0, K_1, ...]``, each (B, Hkv, L, D)."""
        return [getattr(self, f"cache_{j}") for j in range(2 * self.layers)] if self.cache_len else []

    def allocate(self, batch: int, length: int | None = None) -> None:
        """(Re)allocate the float8 caches for ``batch`` sequences of up to ``length`` positions
        (default ``max_len``; attention reads all of them, so a shorter cache decodes faster)."""
        length = self.max_len if length is None else int(length)
        if not 1 <= length <= self.max_len:
            raise ValueError(f"cache length must be in [1, max_len={self.max_len}], got {length}")
        shape = (batch, self.kv_heads, length, self.head_dim)
        if self.cache_len and tuple(self.cache_0.shape) == shape:
            return
        for j in range(2 * self.layers):
            setattr(self, f"cache_{j}", torch.zeros(shape, dtype=torch.uint8, device=self._device))
        self.pad = torch.zeros(batch, dtype=torch.long, device=self._device)
        self._tokens = torch.zeros(batch, length, dtype=torch.long, device=self._device)  # what the cache holds
        self.cache_len = length

    def _step(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """Run ``input_ids`` (B, S) at ``positions`` (S,) and write their K/V into the cache."""
        self._check_step(input_ids, positions)
        return self._write(positions, *self.sm(input_ids, positions, tuple(self.caches)))

    def _check_step(self, input_ids: Tensor, positions: Tensor) -> None:
        """Shapes only (a check of the positions' values would sync the host and stop CUDA graphs:
        they must be below the cache's length, ``cache_len``)."""
        if not self.cache_len:
            raise RuntimeError("fxscale.llm: no K/V cache yet: call flm.allocate(batch) before flm.step "
                               "(flm(...) and generate() allocate it themselves)")
        if input_ids.dim() != 2 or positions.dim() != 1 or positions.shape[0] != input_ids.shape[1]:
            raise ValueError(f"fxscale.llm: step takes input_ids (B, S) and positions (S,), got {tuple(input_ids.shape)} "
                             f"and {tuple(positions.shape)}")
        if input_ids.shape[0] != self.cache_0.shape[0]:
            raise ValueError(f"fxscale.llm: a batch of {input_ids.shape[0]} rows, but the cache holds "
                             f"{self.cache_0.shape[0]}: call flm.allocate({input_ids.shape[0]}) first")
        if input_ids.shape[1] > self.cache_len:
            raise ValueError(f"fxscale.llm: {input_ids.shape[1]} positions, beyond the cache's {self.cache_len} "
                             f"(max_len={self.max_len} declared to fxscale.llm.wrap)")

    def _step_padded(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """:meth:`_step` for left-padded rows (``pad``: each row's count of pad slots)."""
        if self.sm_padded is None:
            raise RuntimeError("fxscale.llm: the padded step graph is built on the first padded prompt "
                               "(call flm(input_ids, attention_mask=...) or generate() with its attention_mask)")
        self._check_step(input_ids, positions)
        return self._write(positions, *self.sm_padded(input_ids, positions, tuple(self.caches), self.pad))

    def _step_fresh(self, input_ids: Tensor, positions: Tensor, last: bool = False) -> Tensor:
        """:meth:`_step` for a new unpadded sequence at ``positions`` ``0..S-1``: attends to its
        own keys (causal SDPA) without reading the cache, and writes them into it. ``last``: the
        logits of the last position only (``(B, 1, vocab)``; a graph of its own, ``sm_fresh_last``)."""
        self._check_step(input_ids, positions)
        name = "sm_fresh_last" if last else "sm_fresh"
        if getattr(self, name) is None:
            setattr(self, name, self._graph("fresh_last" if last else "fresh"))
        return self._write(positions, *getattr(self, name)(input_ids, positions))

    def prepare(self, padded: bool = True) -> FxscaleCausalLM:
        """Build now the graphs built otherwise on first use (``step_fresh``'s two, and the
        padded step's unless ``padded=False``), then let go of the source model: until this,
        the model keeps the ``lm`` given to :func:`wrap` alive to build them, so ``del lm``
        alone frees nothing. Afterwards a graph not built raises ``ValueError``. Returns self.

        >>> # flm = fxscale.llm.wrap(lm, max_len=4096).prepare(); del lm   # lm's memory is freed
        """
        graphs = [("sm_fresh", "fresh"), ("sm_fresh_last", "fresh_last")] + ([("sm_padded", "padded")] if padded else [])
        for name, kind in graphs:
            if getattr(self, name) is None:
                setattr(self, name, self._graph(kind))
        self._build = None
        return self

    def _graph(self, kind: str) -> nn.Module:
        """The ``kind`` step graph, holding the step graph's tensors where they are equal (the
        weights are stored once however many graphs run them)."""
        if self._build is None:
            raise ValueError(f"fxscale.llm: no {kind} step graph: prepare(padded=False) let the source model go "
                             "before it was built; wrap the model again and call prepare() (or skip prepare())")
        graph = self._build(kind)
        graph.share_state_with(self.sm)
        return graph

    def _write(self, positions: Tensor, logits: Tensor, *kv: Tensor) -> Tensor:
        for j, (t, cache) in enumerate(zip(kv, self.caches)):
            scale = self.scales[j // 2][j % 2]
            # |t| <= bound <= max * scale (proven): the cast cannot overflow.
            cache.index_copy_(2, positions, (t.float() * (1.0 / scale)).to(KV_FORMAT.dtype).view(torch.uint8))
        return logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, logits_to_keep: int = 0,
                **kwargs: Any):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        b, t = input_ids.shape
        if t > self.max_len:
            raise ValueError(f"input of {t} positions is beyond max_len={self.max_len} declared to fxscale.llm.wrap")
        fresh = not self._in_generate or t <= self._len or not self.cache_len or self.cache_0.shape[0] != b
        if not fresh and not self._follow_rows(input_ids):
            fresh = True  # a row whose history the cache does not hold: prefill again
        if fresh:
            self._len = 0
        if self._len == 0:  # a new sequence: the cache fits its batch and every position generate() may reach
            keep = self.cache_len and self.cache_0.shape[0] == b and self.cache_len >= max(t, self._need)
            self.allocate(b, self.cache_len if keep else None)
        if t > self.cache_len:
            raise ValueError(f"input of {t} positions is beyond the cache's {self.cache_len}: allocate(batch, length)")
        if self._len == 0:  # a new sequence: one check per prompt
            self._padded = attention_mask is not None and not bool(attention_mask[:, :t].all())
            if self._padded:
                self._set_padding(attention_mask[:, :t])
        ids, pos = input_ids[:, self._len:], self.positions[self._len:t]
        if self._padded:
            logits = self.step_padded(ids, pos)
        elif self._len == 0:  # generate()'s prefill asks for the last logits only (logits_to_keep=1)
            logits = self.step_fresh(ids, pos, last=logits_to_keep == 1 and ids.shape[1] > 1)
        else:
            logits = self.step(ids, pos)
        if logits_to_keep and logits.shape[1] > logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        self._tokens[:, self._len:t] = input_ids[:, self._len:t]
        self._len = t
        return CausalLMOutputWithPast(logits=logits)

    def _follow_rows(self, input_ids: Tensor) -> bool:
        """Between generate() steps, rows may be reordered (beam search keeps the best beams):
        the cache rows are permuted to follow their histories. False if a row's history is in
        no cache row."""
        n = self._len
        held, now = self._tokens[:, :n], input_ids[:, :n]
        if torch.equal(held, now):
            return True
        same = (now[:, None, :] == held[None, :, :]).all(-1)  # (new row, cache row)
        if not bool(same.any(1).all()):
            return False
        perm = same.to(torch.int8).argmax(1)
        for c in (*self.caches, self.pad, self._tokens):
            c.copy_(c.index_select(0, perm))
        return True

    def _set_padding(self, mask: Tensor) -> None:
        pad = (mask == 0).sum(1)
        if not torch.equal(mask.bool(), self.positions[None, :mask.shape[1]] >= pad[:, None]):
            raise ValueError("fxscale.llm: the attention_mask pads on the right or inside a prompt; pad prompts on "
                             "the left (tokenizer.padding_side = 'left'), as generate() needs for decoder-only models")
        if self.sm_padded is None:
            self.sm_padded = self._graph("padded")
        self.pad.copy_(pad)

    def generate(self, *args: Any, **kwargs: Any):
        """transformers' ``generate()`` (greedy, sampling, ...), on the float8 cache."""
        kwargs.setdefault("use_cache", False)  # the cache is ours; transformers passes all tokens
        ids = args[0] if args else kwargs.get("input_ids")
        other = [k for k in ("inputs_embeds", "token_type_ids", "position_ids", "past_key_values") if k in kwargs]
        if other:
            raise ValueError(f"fxscale.llm generates from token ids (input_ids, attention_mask) only, not {other}: "
                             "its step graphs take ids and compute positions from the left padding")
        need = self._check_length(ids.shape[1], kwargs) if isinstance(ids, Tensor) and ids.dim() == 2 else 0
        self._in_generate, self._len, self._need = True, 0, need
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._in_generate, self._need = False, 0

    def _check_length(self, prompt: int, kwargs: dict) -> int:
        """Before generating: the most positions generate() may reach (``max_new_tokens``, else
        ``max_length``, from the call or the generation config, as transformers resolves them)
        must be within ``max_len`` (else it would stop with an error midway, its tokens lost).
        Returns it (a cache allocated shorter is reallocated for it)."""
        gc = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None))
        length = kwargs.get("max_length", getattr(gc, "max_length", None))
        if new is None and length is None:  # transformers >= 5.2x: 20 new tokens, within the position table
            table = getattr(self.config, "max_position_embeddings", None)
            total = prompt + 20 if table is None else min(prompt + 20, table)
            how = f"a prompt of {prompt} tokens + transformers' default of 20 new tokens"
        elif new is not None:
            total, how = prompt + int(new), f"a prompt of {prompt} tokens + max_new_tokens={new}"
        else:
            total = int(length)
            how = f"max_length={total}" + ("" if "max_length" in kwargs else " (the generation config's)")
        if total > self.max_len:
            raise ValueError(f"{how} is beyond max_len={self.max_len} declared to fxscale.llm.wrap: generate fewer "
                             "tokens (max_new_tokens=...) or wrap with a larger max_len")
        return total

    def prepare_inputs_for_generation(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                                      logits_to_keep: int = 0, **kwargs: Any):
        return {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": logits_to_keep}

    def report_kv(self, batch: int = 1) -> str:
        """What the float8 cache stores and saves (bytes against the model's dtype)."""
        per = 2 * self.layers * self.kv_heads * self.max_len * self.head_dim * batch
        hi = per * torch.finfo(self.model_dtype).bits // 8
        ref = "bfloat16" if self.model_dtype == torch.float32 else str(self.model_dtype).replace("torch.", "")
        hi = per * 2 if self.model_dtype == torch.float32 else hi
        scales = ", ".join(f"{i}: K 2^{int(math.log2(k))} V 2^{int(math.log2(v))}" for i, (k, v) in enumerate(self.scales))
        return (
            f"KV cache: {KV_FORMAT.name}, {per} bytes for batch {batch} x {self.max_len} positions "
            f"({ref}: {hi}; {per / hi:.2f}x); static scales proven from the K/V bounds (layer: scale) {scales}"
        )

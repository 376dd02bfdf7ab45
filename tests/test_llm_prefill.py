"""fxscale.llm's graph of a new prompt (``step_fresh``): causal SDPA over the prompt's own keys,
no cache read; it computes what the cache-reading step graph computes from a fresh cache."""

from __future__ import annotations

import pytest
import torch

import fxscale
import fxscale.llm
from tests.test_llm import _gpt2, _llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama():
    lm = _llama()
    return lm, fxscale.llm.wrap(lm, max_len=64)


def _targets(gm, name):
    return [n for n in gm.graph.nodes if name in str(n.target)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_prefill__a_new_prompt_attends_causally_to_its_own_keys_and_reads_no_cache(family, request):
    if family == "llama":
        lm, flm = request.getfixturevalue("llama")
    else:
        lm = _gpt2()
        flm = fxscale.llm.wrap(lm, max_len=64)
    ids = torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    ref = lm(ids).logits
    fresh = flm(ids).logits
    assert flm.sm_fresh is not None
    sdpa = _targets(flm.sm_fresh, "scaled_dot_product_attention")
    assert len(sdpa) == 2 and all(n.kwargs.get("is_causal", n.args[5] if len(n.args) > 5 else False) for n in sdpa)
    assert not _targets(flm.sm_fresh, "kv_read") and not _targets(flm.sm_fresh, "index_copy")
    written = [c.clone() for c in flm.caches]
    # The step graph on the same positions (its mask hides every slot after them).
    step = flm.step(ids, flm.positions[:16])
    want = fxscale.sqnr_db(ref, step)
    assert fxscale.sqnr_db(ref, fresh) > want - 0.5, (fxscale.sqnr_db(ref, fresh), want)
    for j, (a, b) in enumerate(zip(written, flm.caches)):  # the same K/V in the cache, as float8
        scale = flm.scales[j // 2][j % 2]
        fa = a.view(fxscale.llm.KV_FORMAT.dtype).float()[:, :, :16] * scale
        fb = b.view(fxscale.llm.KV_FORMAT.dtype).float()[:, :, :16] * scale
        assert fxscale.sqnr_db(fb, fa) > 25, j


@torch.no_grad()
def test_prefill__greedy_decode_after_a_fresh_prompt_matches_the_step_graph_prefill(llama):
    """Decode steps (the cache-reading graph) after the fresh prompt's prefill follow the same
    tokens as after a prefill through the step graph."""
    _, flm = llama
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    out = flm.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert flm.sm_fresh_last is not None  # generate()'s prefill: the last logits only
    flm.allocate(2)
    tok, logits = ids, flm.step(ids, flm.positions[:9])
    for t in range(9, 17):
        nxt = logits[:, -1:].argmax(-1)
        tok = torch.cat([tok, nxt], 1)
        if t < 16:
            logits = flm.step(nxt, flm.positions[t:t + 1])
    agree = float((tok == out).float().mean())
    assert agree >= 0.9, (tok, out)


@torch.no_grad()
def test_step_graphs__store_the_weights_once(llama):
    """The fresh and padded graphs hold the step graph's float8 weights (and every other equal
    tensor), not copies: an 8B model's fp8 weights are 8 GB per copy."""
    _, flm = llama
    ids = torch.randint(1, 100, (2, 8))
    before = flm(ids).logits
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    flm(ids, attention_mask=mask)
    main = {n: t.data_ptr() for n, t in flm.sm.named_buffers()}
    for graph in (flm.sm_fresh, flm.sm_padded):
        fp8 = {n: t for n, t in graph.named_buffers() if t.dtype == torch.float8_e4m3fn and t.dim() == 2}
        assert len(fp8) >= 8
        assert all(main.get(n) == t.data_ptr() for n, t in fp8.items()), [n for n, t in fp8.items()
                                                                         if main.get(n) != t.data_ptr()]
    torch.testing.assert_close(flm(ids).logits, before, rtol=0, atol=0)


@torch.no_grad()
def test_generate__prefill_computes_the_last_positions_logits_only(llama):
    """generate() asks for logits_to_keep=1: the prefill graph runs the LM head on one row (its
    output is (B, 1, vocab)), and the tokens are those of the full-logits graph."""
    _, flm = llama
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(6))
    out = flm.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert flm.sm_fresh_last is not None
    node = next(n for n in flm.sm_fresh_last.graph.nodes if n.op == "output")
    assert tuple(node.args[0][0].meta["val"].shape[1:]) == (1, 100)
    full = flm(ids).logits  # outside generate(): every position's logits
    assert full.shape == (2, 9, 100)
    last = flm(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, 100)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, 9], full[:, -1].argmax(-1))


@torch.no_grad()
def test_prepare__builds_every_graph_then_the_source_model_is_freed():
    """``wrap`` keeps the source model alive to build the fresh / padded graphs on first use;
    ``prepare()`` builds them and lets it go: after ``del lm`` nothing holds it, and generate()
    gives the same tokens as before, unpadded and left-padded."""
    import gc
    import weakref

    lm = _llama()
    flm = fxscale.llm.wrap(lm, max_len=64)
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    plain, padded = flm.generate(ids, **kw), flm.generate(ids, attention_mask=mask, **kw)
    fresh = flm(ids).logits
    assert flm.prepare() is flm
    alive = weakref.ref(lm)
    del lm
    gc.collect()
    assert alive() is None, [type(r).__name__ for r in gc.get_referrers(alive())]
    assert torch.equal(flm.generate(ids, **kw), plain)
    assert torch.equal(flm.generate(ids, attention_mask=mask, **kw), padded)
    assert torch.equal(flm(ids).logits, fresh)
    flm.sm_padded = None  # a graph prepare() did not build: a clear error, not a crash
    with pytest.raises(ValueError, match=r"no padded step graph.*prepare\(\)"):
        flm.generate(ids, attention_mask=mask, **kw)

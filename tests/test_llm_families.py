"""fxscale.llm.wrap on families a new-user trial found refused (2026-12-03): Cohere (its LayerNorm
written out, ``x - mean`` computed twice) and GPT-J (rotary sin / cos through
``repeat_interleave``, ``rotate_every_two`` through ``stack``); and the refusal's message, which
names the op that has no rule."""

from __future__ import annotations

import pytest
import torch

import fxscale
import fxscale.llm

pytestmark = pytest.mark.slow


def _family(name):
    import transformers as T

    torch.manual_seed(0)
    if name == "cohere":
        cfg = T.CohereConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
        return T.CohereForCausalLM(cfg).eval()
    cfg = T.GPTJConfig(vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    return T.GPTJForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", ["cohere", "gptj"])
@torch.no_grad()
def test_wrap__cohere_and_gptj_prefill_and_decode_follow_float32_as_a_plain_transform_does(name):
    lm = _family(name)
    flm = fxscale.llm.wrap(lm, max_len=32)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    ref = lm(ids).logits
    want = fxscale.sqnr_db(ref, fxscale.transform(lm, (ids,))(ids).logits)
    assert want > 15, (name, want)
    assert fxscale.sqnr_db(ref, flm(ids).logits) > want - 1.0, name
    flm.allocate(2)
    flm.step(ids[:, :12], flm.positions[:12])
    steps = torch.cat([flm.step(ids[:, t:t + 1], flm.positions[t:t + 1]) for t in range(12, 16)], 1)
    assert fxscale.sqnr_db(ref[:, 12:], steps) > want - 2.0, name


def test_wrap__a_kv_value_without_a_static_bound_is_refused_naming_the_op_without_a_rule(monkeypatch):
    from fxscale.rules.registry import RULES

    for op in [k for k in RULES if "repeat_interleave" in str(k)]:
        monkeypatch.delitem(RULES, op)
    with pytest.raises(ValueError, match=r"repeat_interleave.*has no rule.*fxscale\.transform"):
        fxscale.llm.wrap(_family("gptj"), max_len=32)


def test_wrap__an_encoder_decoder_model_is_refused_saying_what_to_use():
    """T5 got 'its attention does not run through the attention interface', and advice that fails
    for T5 (a transform without decoder_input_ids); found by a new-user trial."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    t5 = transformers.T5ForConditionalGeneration(cfg).eval()
    with pytest.raises(ValueError, match=r"decoder-only.*T5ForConditionalGeneration is an encoder-decoder model.*"
                                         r"'decoder_input_ids': dec"):
        fxscale.llm.wrap(t5, max_len=32)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    dec = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    sm = fxscale.transform(t5, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": dec})
    ref = t5(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits  # the advice works
    assert fxscale.sqnr_db(ref, sm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits) > 15

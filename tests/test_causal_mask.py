"""transformers' plain causal mask is captured as SDPA's ``is_causal`` (passes/causal_mask.py):
no (B, 1, S, S) mask in the graph where the mask is the causal triangle for every length, and
the mask kept where it is not (padding, packed positions, a sliding window)."""

import pytest
import torch
from torch.export import Dim

from passes.capture import CaptureError, capture

T = pytest.importorskip("transformers")


def _sdpa(gm):
    return [n for n in gm.graph.nodes if "scaled_dot_product_attention" in str(n.target)]


def _is_causal(n) -> bool:
    mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
    causal = n.args[5] if len(n.args) > 5 else n.kwargs.get("is_causal", False)
    return mask is None and causal is True


def _llama(**kw):
    torch.manual_seed(0)
    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100, "use_cache": False}
    return T.LlamaForCausalLM(T.LlamaConfig(**{**cfg, **kw})).eval()


@torch.no_grad()
def test_capture__plain_causal_attention_is_sdpa_is_causal_and_computes_the_same_at_every_length():
    lm = _llama()
    gm = capture(lm, (torch.randint(0, 100, (2, 16)),), dynamic_shapes=({1: Dim("seq", max=64)},))
    nodes = _sdpa(gm)
    assert len(nodes) == 2 and all(_is_causal(n) for n in nodes), [n.args for n in nodes]
    for s in (1, 2, 7, 16, 64):
        x = torch.randint(0, 100, (3, s), generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(gm(x).logits, lm(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_capture__a_padding_mask_is_kept_and_padded_rows_compute_as_transformers_does():
    lm = _llama()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :4] = 0
    gm = capture(lm, (ids, mask))
    assert not any(_is_causal(n) for n in _sdpa(gm))
    torch.testing.assert_close(gm(ids, mask).logits[:, 4:], lm(ids, attention_mask=mask).logits[:, 4:],
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_capture__passed_position_ids_keep_the_packed_sequence_mask():
    """Two sequences packed in one row (positions restart): each attends only to its own tokens."""
    lm = _llama()
    ids = torch.randint(0, 100, (2, 10))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]).expand(2, -1)
    gm = capture(lm.model, (ids, None, pos))
    assert not any(_is_causal(n) for n in _sdpa(gm))
    want = lm.model(ids, position_ids=pos).last_hidden_state
    alone = lm.model(ids[:, 5:]).last_hidden_state
    torch.testing.assert_close(want[:, 5:], alone, rtol=1e-5, atol=1e-5)  # transformers does unpack them
    torch.testing.assert_close(gm(ids, None, pos).last_hidden_state, want, rtol=1e-5, atol=1e-5)


class _PacksPositions(torch.nn.Module):
    """A user's wrapper that passes packed positions to the model inside its forward."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        pos = torch.arange(ids.shape[1] // 2, device=ids.device).repeat(2)[None].expand(ids.shape[0], -1)
        return self.lm(ids, position_ids=pos).last_hidden_state


@torch.no_grad()
def test_capture__a_wrapper_that_passes_positions_inside_keeps_the_packed_mask():
    model = _PacksPositions(_llama().model).eval()
    ids = torch.randint(0, 100, (2, 10))
    gm = capture(model, (ids,))
    assert not any(_is_causal(n) for n in _sdpa(gm))
    torch.testing.assert_close(gm(ids), model(ids), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_capture__a_sliding_window_keeps_its_mask():
    torch.manual_seed(0)
    lm = T.MistralForCausalLM(T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                              sliding_window=4, use_cache=False)).eval()
    ids = torch.randint(0, 100, (2, 12))
    gm = capture(lm, (ids,))
    assert not any(_is_causal(n) for n in _sdpa(gm))
    torch.testing.assert_close(gm(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-5)


def test_capture__transformers_mask_functions_are_restored_after_capture_and_after_a_failure():
    import transformers.masking_utils as mu
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        find_packed_sequence_indices,
        sdpa_mask,
    )

    lm = _llama()
    capture(lm, (torch.randint(0, 100, (2, 8)),))
    with pytest.raises(CaptureError):
        capture(lm, (torch.randint(0, 100, (2, 8)), "not a mask"))
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is sdpa_mask
    assert mu.find_packed_sequence_indices is find_packed_sequence_indices

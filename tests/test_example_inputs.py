"""Example inputs given by name (a dict, or a tokenizer's ``BatchEncoding``) are mapped to
forward's positions, the optional parameters between filled with their defaults; keyword calls
of the transformed module skip optional parameters the same way (found by a new-user trial:
a dict was read as a tuple of its key strings)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxscale


class _Optional(nn.Module):
    """forward(x, mask=None, scale=2.0, y=None, *, shift=0.0): an optional argument between two tensors."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 32), nn.Linear(16, 32)

    def forward(self, x, mask=None, scale=2.0, y=None, *, shift=0.0):
        h = self.a(x) * scale
        if mask is not None:
            h = h * mask
        return torch.relu(h + self.b(y)) + shift


def test_dict_example__named_inputs_go_to_their_positions_with_defaults_between():
    m, x, y = _Optional().eval(), torch.randn(4, 16), torch.randn(4, 16)
    sm = fxscale.transform(m, {"y": y, "x": x}, calibration=[{"x": 2 * x, "y": y}])
    ref = m(x, y=y)
    assert fxscale.sqnr_db(ref, sm(x, y=y)) > 20
    assert torch.equal(sm(x, y=y), sm(x, None, 2.0, y))  # the keyword call: the same positions
    assert torch.equal(sm(y=y, x=x), sm(x, y=y))


def test_dict_example__unknown_or_keyword_only_names_say_so():
    m, x = _Optional().eval(), torch.randn(4, 16)
    with pytest.raises(TypeError, match=r"has no parameter \['z'\].*positional parameters: \['x', 'mask', 'scale', 'y'\]"):
        fxscale.transform(m, {"x": x, "y": x, "z": x})
    with pytest.raises(TypeError, match=r"takes \['shift'\] only by keyword"):
        fxscale.transform(m, {"x": x, "y": x, "shift": 1.0})
    with pytest.raises(TypeError, match="no value for 'x'"):
        fxscale.transform(m, {"y": x, "mask": x.new_ones(4, 32)})
    with pytest.raises(TypeError, match="tuple of the model's positional arguments"):
        fxscale.transform(m, x.tolist().__iter__())


def test_tokenizer_output__bert_transformed_from_its_batch_encoding_and_called_with_it(recwarn):
    """(BERT's config has use_cache=True too, but an encoder returns no cache: no warning about it.)"""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    enc = transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                      "token_type_ids": torch.zeros_like(ids)})
    sm = fxscale.transform(bert, enc)
    assert fxscale.sqnr_db(bert(**enc).last_hidden_state, sm(**enc).last_hidden_state) > 20
    assert not [w for w in recwarn if "use_cache" in str(w.message)]


def test_generate_on_a_transformed_module__says_what_to_use():
    sm = fxscale.transform(nn.Linear(4, 4).eval(), (torch.randn(2, 4),))
    with pytest.raises(AttributeError, match=r"forward only, not generate\(\).*fxscale.llm.wrap"):
        sm.generate(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        sm.nonexistent  # noqa: B018


class _Features(nn.Module):
    """forward(features: dict), as a SentenceTransformer's: a masked mean of ``lin(x)`` over the sequence."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)

    def forward(self, features):
        return {"embedding": (self.lin(features["x"]) * features["mask"].unsqueeze(-1)).mean(1)}


def test_dict_example__a_one_argument_forward_takes_the_dict_itself_and_varargs_say_what_to_do():
    """SentenceTransformer's forward(features: dict) and peft's PeftModel.forward(*args, **kwargs)
    (found by a new-user trial: both got 'has no parameter [...]; leave them out')."""

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    feats = {"x": torch.randn(4, 6, 8), "mask": torch.ones(4, 6)}
    m = _Features().eval()
    sm = fxscale.transform(m, feats)
    assert fxscale.sqnr_db(m(feats)["embedding"], sm(feats)["embedding"]) > 20
    with pytest.raises(TypeError, match=r"Wrapper.forward takes \*args, \*\*kwargs.*pass a tuple.*get_base_model"):
        fxscale.transform(Wrapper(nn.Linear(8, 8)).eval(), {"input": torch.randn(4, 8)})


def test_dynamic_shapes_for_a_dict_input__keep_the_batch_dynamic(recwarn):
    """``dynamic_shapes=({"x": {1: seq}, "mask": {1: seq}},)`` for forward(features: dict) replaced
    the batch dims of the entries, so the batch came out static (with a warning blaming the
    model's code; found by a user trial on SentenceTransformer)."""
    from torch.export import Dim

    seq = Dim("seq", max=32)
    m = _Features().eval()
    feats = {"x": torch.randn(4, 6, 8), "mask": torch.ones(4, 6)}
    sm = fxscale.transform(m, (feats,), dynamic_shapes=({"x": {1: seq}, "mask": {1: seq}},))
    assert not [w for w in recwarn if "batch dimension" in str(w.message)]
    other = {"x": torch.randn(3, 11, 8), "mask": torch.ones(3, 11)}
    assert fxscale.sqnr_db(m(other)["embedding"], sm(other)["embedding"]) > 20


def test_transform_of_a_compiled_module__captures_the_module_itself():
    """``transform(torch.compile(m), ...)``: the compiled wrapper's forward is (*args, **kwargs),
    so dynamic_shapes' entries were miscounted ('2 entries but the model takes 1 inputs')."""
    m = _Optional().eval()
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    sm = fxscale.transform(torch.compile(m), (x, None, 2.0, y), dynamic_shapes=(None, None, None, None))
    assert torch.equal(sm(x, None, 2.0, y), fxscale.transform(m, (x, None, 2.0, y))(x, None, 2.0, y))

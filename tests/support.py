"""Small models of every family the core must compose, and an eager reference for compositions
(imported as `tests.support`; fixtures live in conftest.py).

The reference never looks at the fused graph: it runs the user's unmodified models with forward hooks on
their blocks and recomputes each cross-attention from its weights with explicit softmax math.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from tests.reference import eager_reference as _eager_reference  # one reference for all tests
from tests.reference import run_model  # noqa: F401 - re-exported: the tests' way to run a user's model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "handwritten_gpt"))
warnings.filterwarnings("ignore", category=UserWarning)

VOCAB = 96


def _hf():
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers


# -- model families: factory(dim, depth) -> model; blocks(model) -> modules whose output is a block's output
def gpt(dim=48, depth=4):
    from gpt import GPT, GPTConfig
    return GPT(GPTConfig(vocab_size=VOCAB, n_layer=depth, n_embd=dim, n_head=4, block_size=64))


def xtransformers(dim=48, depth=4):
    from x_transformers import Decoder, TransformerWrapper
    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=Decoder(dim=dim, depth=depth, heads=4))


def gpt2(dim=48, depth=4):
    t = _hf()
    return t.GPT2LMHeadModel(t.GPT2Config(n_layer=depth, n_embd=dim, n_head=4, vocab_size=VOCAB, n_positions=64))


def _llama_like(cls_name, cfg_name, dim, depth, **extra):
    t = _hf()
    cfg = getattr(t, cfg_name)(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=depth,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                               max_position_embeddings=64, **extra)
    return getattr(t, cls_name)(cfg)


def llama(dim=48, depth=4):
    return _llama_like("LlamaForCausalLM", "LlamaConfig", dim, depth)


def qwen2(dim=48, depth=4):
    return _llama_like("Qwen2ForCausalLM", "Qwen2Config", dim, depth)


def mistral(dim=48, depth=4):
    return _llama_like("MistralForCausalLM", "MistralConfig", dim, depth, sliding_window=None)


def bert(dim=32, depth=2):
    t = _hf()
    return t.BertModel(t.BertConfig(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=depth,
                                    num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64))


DECODERS = {"gpt": gpt, "xtransformers": xtransformers, "gpt2": gpt2, "llama": llama, "qwen2": qwen2,
            "mistral": mistral}


def block_modules(model) -> list[torch.nn.Module]:
    """Written per family by hand (not calmgraph's detection): the module whose output is each block's."""
    name = type(model).__name__
    if name == "GPT":
        return list(model.blocks)
    if name == "TransformerWrapper":
        layers = model.attn_layers.layers
        return [layers[i][2] for i, kind in enumerate(model.attn_layers.layer_types) if kind == "f"]
    if name == "GPT2LMHeadModel":
        return list(model.transformer.h)
    if name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        return list(model.model.layers)
    if name == "BertModel":
        return list(model.encoder.layer)
    if name in ("TinyLM", "TinyEncoder"):
        return list(model.layers)
    raise KeyError(name)


def eager_reference(composed, models, input_ids, prompts=None, write_mask=None):
    """`tests.reference.eager_reference` with the blocks named by hand above. prompts: {name: (ids, mask)}."""
    return _eager_reference(composed, models, {n: block_modules(m) for n, m in models.items()}, input_ids, prompts,
                            write_mask)


def randomize_new_parameters(composed, seed=0, std=0.1):
    """Like a trained composition: every weight nonzero (norm scales around 1, gates open)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in composed.named_new_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1.0 if ".norm." in name else noise + 0.5 if name.endswith("gate") else noise)

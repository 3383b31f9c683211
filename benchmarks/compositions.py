"""The compositions the benchmarks measure: x-transformers decoders (so CALM-pytorch can run them too),
wired the way CALM-pytorch wires them by default, and HF Llama models built from configs (compile time)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def xt_decoder(dim: int, depth: int, heads: int, vocab: int = 512, max_len: int = 2048,
               device: str | torch.device = "cpu") -> nn.Module:
    from x_transformers import Decoder, TransformerWrapper
    with torch.device(device):
        return TransformerWrapper(num_tokens=vocab, max_seq_len=max_len,
                                  attn_layers=Decoder(dim=dim, depth=depth, heads=heads)).eval()


def calm_pytorch_pairs(n_augment: int, n_anchor: int, every: int = 4) -> list[list[int]]:
    """CALM-pytorch's default connections (`connect_every_num_layers=4`), 0-based: augment blocks 0, 4, 8, ...
    to anchor blocks spread by n_anchor // n, starting at 0 (its indices are 1-based; so are its docs)."""
    n = min(math.ceil(n_augment / every), n_anchor)
    return [[a, t] for a, t in zip(range(0, n_augment, every), range(0, n_anchor, n_anchor // n))]


def calm_spec(n_augments: int, depth_anchor: int, depth_augment: int, *, input: str = "prompt") -> dict:
    """An anchor and n augments, each augment -> anchor with CALM-pytorch's default layer pairs."""
    augments = [f"aug{i}" for i in range(n_augments)]
    return {"anchor": {"name": "anchor"},
            "augments": [{"name": a, "input": input} for a in augments],
            "edges": [{"source": a, "target": "anchor", "layers": calm_pytorch_pairs(depth_augment, depth_anchor)}
                      for a in augments]}


def calm_models(n_augments: int, *, dim: int, depth: int, heads: int, vocab: int = 512, device="cpu",
                dtype: torch.dtype | None = None, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    names = ["anchor", *[f"aug{i}" for i in range(n_augments)]]
    return {n: xt_decoder(dim, depth, heads, vocab, device=device).to(dtype=dtype) for n in names}


def llama(depth: int, *, dim: int = 1024, heads: int = 16, vocab: int = 32000, device: str = "meta") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=dim, intermediate_size=int(2.75 * dim), num_hidden_layers=depth,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()

"""Tiny models bundled for `calmgraph demo`: a decoder LM (anchor or shared augment) and a
bidirectional encoder (prompt augment). Random weights; small enough to compile and run in seconds."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Layer(nn.Module):
    """Pre-norm transformer layer: RMSNorm, multi-head self-attention, SwiGLU feed-forward."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.attn_norm, self.ff_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.gate_up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x, keep=None):
        """keep: optional (B, 1, 1, T) boolean mask of the positions attended to (non-causal layers)."""
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2)
                   for t in self.qkv(self.attn_norm(x)).chunk(3, dim=-1))          # (B, h, T, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=self.causal and keep is None)
        x = x + self.out(y.transpose(1, 2).reshape(B, T, D))
        gate, up = self.gate_up(self.ff_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


# A spec builds these without consent (calmgraph's own code), so what its kwargs may ask for is bounded:
# each size, and the whole model (a few GB at most in float32).
BOUNDS = {"vocab": 1_000_000, "dim": 16_384, "depth": 512, "heads": 1024, "max_len": 1_048_576}
MAX_PARAMETERS = 1_000_000_000


def check_sizes(**sizes: int) -> None:
    """Refuse sizes that are not whole numbers in bounds, heads that do not divide dim, or a model past
    MAX_PARAMETERS, before anything is allocated."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= BOUNDS[name]:
            raise ValueError(f"{name} must be a whole number from 1 to {BOUNDS[name]:,}; got {value!r}")
    if sizes["dim"] % sizes["heads"]:
        raise ValueError(f"heads ({sizes['heads']}) must divide dim ({sizes['dim']})")
    dim = sizes["dim"]
    total = (2 * sizes["vocab"] + sizes["max_len"]) * dim + sizes["depth"] * 10 * dim * dim
    if total > MAX_PARAMETERS:
        raise ValueError(f"these sizes make about {total:,} parameters, more than the {MAX_PARAMETERS:,} a demo "
                         "model may have; choose smaller ones")


class TinyLM(nn.Module):
    """forward(input_ids) -> logits (B, T, vocab)."""

    def __init__(self, vocab: int = 96, dim: int = 64, depth: int = 4, heads: int = 4, max_len: int = 128,
                 causal: bool = True):
        check_sizes(vocab=vocab, dim=dim, depth=depth, heads=heads, max_len=max_len)
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be true or false; got {causal!r}")
        super().__init__()
        self.max_seq_len = max_len  # the positions it has, as x-transformers says it (calmgraph checks calls)
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(Layer(dim, heads, causal) for _ in range(depth))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids):
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class TinyEncoder(TinyLM):
    """Bidirectional: forward(input_ids, attention_mask) -> hidden states (B, S, dim); padding is ignored."""

    def __init__(self, vocab: int = 96, dim: int = 64, depth: int = 4, heads: int = 4, max_len: int = 128):
        super().__init__(vocab, dim, depth, heads, max_len, causal=False)
        del self.head

    def forward(self, input_ids, attention_mask):
        keep = attention_mask.bool()[:, None, None, :]                                # (B, 1, 1, S)
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        for layer in self.layers:
            x = layer(x, keep)
        return self.norm(x)


def demo_models(seed: int = 0) -> dict[str, nn.Module]:
    """The demo's anchor and two augments, with different widths and depths."""
    torch.manual_seed(seed)
    return {
        "base": TinyLM(dim=64, depth=6, heads=4).eval(),
        "arith": TinyLM(dim=48, depth=5, heads=4).eval(),
        "notes": TinyEncoder(dim=32, depth=2, heads=2).eval(),
    }

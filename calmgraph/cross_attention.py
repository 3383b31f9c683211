"""The block CALM adds for each (source layer, target layer) pair: f_proj then f_cross (Bansal et al., 2024).

    delta = W_O . Attn(Q = norm(H_B) W_Q, K = f_proj(H_A) W_K, V = f_proj(H_A) W_V)      H_B <- H_B + delta

The block returns only `delta`; the residual add is its own node in the fused graph. With `gate="zero"`
W_O starts at zero, with `gate="tanh"` a scalar gate tanh(g) starts at zero: either way the composition
computes exactly the target model at initialisation.

Two options for shared input, where position i of both models is the same token (the paper's formula has
no positions): `rotary=True` rotates Q and K by their token positions (RoPE, Su et al. 2021), so a block can
attend by relative position as well as by content; `window=w` lets position t read only the source
positions t-w+1..t (`window=1`: the augment at the same token alone).

`null_kv=True` adds one learned key/value pair (no position) that every query may attend to, so a head can
read nothing from the source where the source has nothing for it. Without it a `window=1` block is a fixed
linear map of the source's state at each token: its softmax over one key is always 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .errors import InputError

NORMS = {"rms": nn.RMSNorm, "layer": nn.LayerNorm, "none": lambda dim: nn.Identity()}


class CrossAttention(nn.Module):
    def __init__(self, dim: int, dim_context: int, *, heads: int, dim_head: int, norm: str = "rms",
                 gate: str = "zero", project_context: bool = True, causal: bool = False, rotary: bool = False,
                 window: int | None = None, null_kv: bool = False):
        super().__init__()
        if not project_context and dim_context != dim:
            raise ValueError(f"project_context=False needs equal dims; got context {dim_context} and {dim}")
        if rotary and (not causal or dim_head % 2):
            raise ValueError(f"rotary needs aligned (causal, shared-input) sequences and an even dim_head; got "
                             f"causal={causal}, dim_head={dim_head}")
        if window is not None and (not causal or window < 1):
            raise ValueError(f"window needs aligned (causal, shared-input) sequences and a size >= 1; got "
                             f"causal={causal}, window={window}")
        self.heads, self.causal, self.rotary, self.window = heads, causal, rotary, window
        inner = heads * dim_head
        self.norm = NORMS[norm](dim)
        self.proj = nn.Linear(dim_context, dim) if project_context else nn.Identity()  # f_proj
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.null_kv = nn.Parameter(torch.randn(2, heads, 1, dim_head) * 0.02) if null_kv else None  # key, value
        self.gate = nn.Parameter(torch.zeros(1)) if gate == "tanh" else None
        if gate == "zero":
            nn.init.zeros_(self.to_out.weight)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None):
        """x: (B, T, dim) target states; context: (B, S, dim_context) source states; context_mask: (B, S),
        nonzero where the source position is real (prompt mode). Causal blocks: x holds the last T of the
        S positions (T == S but in a cached decode step)."""
        return self.attend(x, *self.context_kv(context), context_mask)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, S, dim_head) of the source states: what a decode step can reuse."""
        c = self.proj(context.to(self.to_kv.weight.dtype))                        # (B, S, dim)
        k, v = rearrange(self.to_kv(c), "b s (two h d) -> two b h s d", two=2, h=self.heads)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_mask: torch.Tensor | None = None,
               attention=None):
        if k.shape[0] != x.shape[0]:  # checked here, where the two sides meet (stages split before it)
            raise InputError(f"a prompt holds {k.shape[0]} sequences but input_ids {x.shape[0]}; "
                             "pass one prompt per sequence")
        q = rearrange(self.to_q(self.norm(x)), "b t (h d) -> b h t d", h=self.heads)
        mask = None if context_mask is None else context_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        t, s = q.shape[-2], k.shape[-2]
        if self.rotary:  # x holds the last t of the s positions
            q, k = rotate(q, torch.arange(s - t, s, device=q.device)), rotate(k, torch.arange(s, device=k.device))
        square = self.causal and self.window is None and statically_known_true(t == s)  # symbolic while exported
        if self.causal and not square:  # the last t of s positions (a cached decode step): i sees <= s - t + i
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
            if self.window is not None:  # ... and no further back than window - 1 positions
                mask = mask.triu(s - t - self.window + 1)
        return self._read(q, k, v, mask, square, attention)

    def attend_at(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, attention=None,
                  keep: torch.Tensor | None = None):
        """A cached decode step: x (B, T, dim) at source positions `positions` (T,); k, v (B, heads, S, dim_head)
        of source positions 0..S-1, rotated by them with rotary. A query reads no key after its own position
        (those are not written yet) and, with a window, none before the window. `attention`: SDPA's signature
        (q, k, v, mask), in place of SDPA. `keep` (B, S): False at positions that hold padding, not read."""
        q = rearrange(self.to_q(self.norm(x)), "b t (h d) -> b h t d", h=self.heads)
        if self.rotary:
            q = rotate(q, positions)
        key = torch.arange(k.shape[-2], device=q.device)
        mask = key <= positions[:, None]                                          # (T, S)
        if self.window is not None:
            mask = mask & (key > positions[:, None] - self.window)
        if keep is not None:
            mask = mask & keep[:, None, None, :]                                  # (B, 1, T, S)
        return self._read(q, k, v, mask, attention=attention)

    def _read(self, q, k, v, mask, square: bool = False, attention=None):
        """Attention of q over k, v (mask: True = read; square: plain causal), null key first, then W_O."""
        if self.null_kv is not None:  # one more key, first, that every query may read
            if square:
                mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
                square = False
            null_k, null_v = (n.to(k.dtype).expand(k.shape[0], -1, -1, -1) for n in self.null_kv)
            k, v = torch.cat((null_k, k), dim=-2), torch.cat((null_v, v), dim=-2)
            if mask is not None:
                mask = F.pad(mask, (1, 0), value=True)
        if attention is not None and not square:
            out = attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=square)
        if mask is not None:  # a prompt that is all padding gives no context (and not NaN)
            out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
        out = self.to_out(rearrange(out, "b h t d -> b t (h d)"))
        return out * self.gate.tanh() if self.gate is not None else out


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE on (..., T, d): channel pairs (i, i + d/2) turned by positions * base^(-2i/d), in float32."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.to(torch.float32)[:, None] * freq                       # (T, d/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)

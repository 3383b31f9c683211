"""An eager reference for compositions, independent of calmgraph's graph code.

It runs the user's own, unmodified models with forward hooks on the blocks the test names, and recomputes
each cross-attention from the block's weights with explicit softmax math. Nothing here reads the fused
graph: only the spec (which models, which inputs), `composed.links` (which layer pairs were resolved) and
the weights of the cross-attention blocks.

    blocks = {"base": list(llama.model.layers), "kv": list(gpt2.transformer.h)}
    expected = eager_reference(composed, models, blocks, input_ids, prompts={"notes": (ids, mask)})
    torch.testing.assert_close(composed(input_ids, notes_input_ids=ids, notes_mask=mask), expected)
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


# -- which modules are the blocks: chosen by the test, not by calmgraph's detection ------------------------
def config_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """For a transformers model: the one ModuleList with as many entries as its config says it has layers."""
    n = next(getattr(model.config, k) for k in LAYER_COUNT_KEYS if isinstance(getattr(model.config, k, None), int))
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and len({type(c) for c in m}) == 1]
    if len(found) != 1:
        raise LookupError(f"{type(model).__name__}: {len(found)} ModuleLists of length {n}: {[f for f, _ in found]}")
    return found[0]


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose output is each block's output, written per family by hand where it matters."""
    name = type(model).__name__
    if name == "GPT":                              # examples/handwritten_gpt
        return list(model.blocks)
    if name == "TransformerWrapper":               # x-transformers: a block ends at each feed-forward entry
        layers = model.attn_layers.layers
        return [layers[i][2] for i, kind in enumerate(model.attn_layers.layer_types) if kind == "f"]
    if hasattr(model, "config"):
        return list(config_block_list(model)[1])
    if isinstance(getattr(model, "layers", None), nn.ModuleList):   # calmgraph's demo models, the tests' own
        return list(model.layers)
    raise LookupError(f"no block rule for {name}; pass blocks={{name: [modules]}} explicitly")


# -- running a model the way a user would -----------------------------------------------------------------
def run_model(model: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model's own output as one tensor: logits, or the last hidden states of an encoder.
    x: token ids (B, T), or pixel values (B, C, H, W) for an image model."""
    params = inspect.signature(model.forward).parameters
    kwargs = {"use_cache": False} if "use_cache" in params else {}
    if x.is_floating_point():
        out = model(pixel_values=x, **kwargs)
    elif mask is None:
        out = model(x, **kwargs)
    elif "attention_mask" in params:
        out = model(x, attention_mask=mask, **kwargs)
    elif "mask" in params:
        out = model(x, mask=mask.bool(), **kwargs)
    elif len([p for p in params.values() if p.kind == p.POSITIONAL_OR_KEYWORD]) >= 2:
        out = model(x, mask, **kwargs)
    else:  # a model that takes no padding mask reads every position
        out = model(x, **kwargs)
    return first_tensor(out)


def first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, key, None), torch.Tensor):
            return getattr(out, key)
    return first_tensor(out[0])


# -- the math -----------------------------------------------------------------------------------------------
def reference_cross_attention(block, x, ctx, mask=None, causal=False):
    """CALM's f_cross(f_proj(ctx), x), from the block's weights, with explicit attention math.
    x: (B, T, D_target), ctx: (B, S, D_source), mask: (B, S) nonzero where the source position is real."""
    c = ctx.to(block.to_kv.weight.dtype)
    if isinstance(block.proj, nn.Linear):
        c = c @ block.proj.weight.T + block.proj.bias
    norm = block.norm
    if isinstance(norm, nn.RMSNorm):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight
    elif isinstance(norm, nn.LayerNorm):
        xn = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps)
        xn = xn * norm.weight + norm.bias
    else:
        xn = x
    h = block.heads
    B, T, _ = x.shape
    S = c.shape[1]
    q = (xn @ block.to_q.weight.T).view(B, T, h, -1).transpose(1, 2)           # (B, h, T, d)
    k, v = (c @ block.to_kv.weight.T).chunk(2, dim=-1)
    k, v = (t.reshape(B, S, h, -1).transpose(1, 2) for t in (k, v))            # (B, h, S, d)
    if getattr(block, "rotary", False):  # x holds the last T of the S positions
        q, k = complex_rotary(q, torch.arange(S - T, S)), complex_rotary(k, torch.arange(S))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])                  # (B, h, T, S)
    allowed = torch.ones(B, 1, T, S, dtype=torch.bool, device=x.device)
    if causal:  # query i sits at position S - T + i; with a window it reads back at most window - 1 places
        back = (torch.arange(S - T, S)[:, None] - torch.arange(S)[None, :]).to(x.device)
        window = getattr(block, "window", None) or S
        allowed = allowed & (back >= 0) & (back < window)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    if getattr(block, "null_kv", None) is not None:  # a key/value without position that every query may read
        null_k, null_v = block.null_kv
        scores = torch.cat((q @ null_k.transpose(-1, -2) / math.sqrt(q.shape[-1]), scores), dim=-1)
        v = torch.cat((null_v.expand(B, -1, -1, -1), v), dim=-2)
        allowed = torch.cat((torch.ones_like(allowed[..., :1]), allowed.expand(B, -1, T, -1)), dim=-1)
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = (weights @ v).transpose(1, 2).reshape(B, T, -1) @ block.to_out.weight.T
    return out * torch.tanh(block.gate) if block.gate is not None else out


def complex_rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE as complex multiplication in float64: channel pair (i, i + d/2) is the number x_i + j x_{i+d/2},
    turned by the angle position * 10000^(-2i/d)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    angle = positions.double()[:, None] * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    z = z * torch.polar(torch.ones_like(angle), angle).to(x.device)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def _order(spec) -> list[str]:
    """Models in an order where each comes after every model it reads (its own small topological sort)."""
    names, done = [m.name for m in spec.models], []
    while len(done) < len(names):
        ready = [n for n in names if n not in done and all(e.source in done for e in spec.edges if e.target == n)]
        done.append(sorted(ready)[0])
    return done


def eager_reference(composed, models: dict[str, nn.Module], blocks: dict[str, list[nn.Module]] | None,
                    input_ids: torch.Tensor, prompts: dict | None = None,
                    write_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The composition, computed with hooks on the user's own models.

    blocks: per model, the modules whose output (tap: output) or input (tap: input) is each block's hidden
    states; default `block_modules(model)`. prompts: {augment: (ids or pixel values, mask or None)}.
    write_mask: (B, T), where the blocks of `writes: masked` edges add (1) or not (0)."""
    spec, prompts, blocks = composed.spec, prompts or {}, dict(blocks or {})
    inputs = {a.name: a.input for a in spec.augments}
    states: dict[tuple[str, int], torch.Tensor] = {}

    def composed_states(name: str, i: int, h: torch.Tensor) -> torch.Tensor:
        total = h
        for link in composed.links:
            if link.target == name and link.target_layer == i:
                block = composed.get_submodule(".".join(("xattn", *link.module_path)))
                mask = prompts[link.source][1] if inputs.get(link.source) == "prompt" else None
                delta = reference_cross_attention(block, h, states[link.source, link.source_layer], mask,
                                                  causal=link.causal)
                if link.config.writes == "masked":
                    delta = torch.where(write_mask.bool()[..., None], delta, torch.zeros_like(delta))
                total = total + delta
        states[name, i] = total
        return total

    def output_hook(name, i):
        def hook(module, args, out):
            h = out if isinstance(out, torch.Tensor) else out[0]
            total = composed_states(name, i, h)
            return total if isinstance(out, torch.Tensor) else (total, *out[1:])
        return hook

    def input_hook(name, i):
        def hook(module, args, kwargs):
            if args:
                return (composed_states(name, i, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": composed_states(name, i, kwargs["hidden_states"])}
        return hook

    result = None
    with torch.no_grad():
        for name in _order(spec):
            model, tap = models[name], spec.model(name).tap
            mods = blocks.get(name) or block_modules(model)
            handles = [m.register_forward_hook(output_hook(name, i)) if tap == "output"
                       else m.register_forward_pre_hook(input_hook(name, i), with_kwargs=True)
                       for i, m in enumerate(mods)]
            try:
                if inputs.get(name) == "prompt":
                    run_model(model, *prompts[name])
                else:
                    result = run_model(model, input_ids)
            finally:
                for h in handles:
                    h.remove()
    return result


def randomize_new_parameters(composed, seed: int = 0, std: float = 0.2) -> None:
    """Move the cross-attention blocks away from their zero init, so that parity tests mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in composed.new_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise.to(p.dtype) + (1.0 if p.ndim == 1 and p.numel() > 1 else 0.0))

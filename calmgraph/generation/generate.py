"""Text generation with a composed model: batched, padded prompts, greedy or sampled (temperature, top-k, top-p).

The prompt augments run once per call, in the augment stage (`stage.py`). With a transformers anchor,
the anchor then reads the prompt once and each new token once, through its decode graph with a static KV
cache (`decode.py`); so does every shared augment that is a transformers causal LM, and each link from
one keeps its keys and values: a step costs one token through every model. A shared augment without such
a cache makes the shared augments run over the sequence so far at each step instead (only the anchor is
cached). Any other anchor (`cache=False`, or one transformers does not cache) recomputes the anchor stage
over the whole sequence at each step.

Padding. Prompts may come padded (left padding, as tokenizers give them for generation, with an
`attention_mask`). Rather than thread a mask and position ids into every model (custom models take
neither), each row's real tokens are moved to the front of a working buffer and what follows them is
filler. The anchor and shared augments are causal language models, so a position never sees what comes
after it: a row's logits are those of its unpadded prompt, and its next token is read at its own last
position. The cached path runs the rows of each prompt length together (one cache position for all).
The returned ids keep the caller's layout: `torch.cat([input_ids, new_tokens], dim=1)`.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch

from ..errors import CalmGraphError, InputError
from ..passes.merge import check_token_ids
from .decode import Decoder, build_decoder, cache_kwarg, decoded_models
from .stage import Contexts, Stages, context_stage, split_stages

_STAGES: WeakKeyDictionary = WeakKeyDictionary()  # composed -> (what it was split from, its stages, ...)
CACHE_ROUND = 32    # cache lengths are rounded up to a multiple of this, so that similar calls share a decoder
KEEP_DECODERS = 4   # decoders (each holds its KV cache) kept per composed model
STEP_COMPILE = {"mode": "reduce-overhead"}  # torch.compile options of a decode step (generate's compile_step)


def _entry(composed) -> dict:
    key = (composed.code, tuple((name, id(child)) for name, child in composed.named_children()))
    cached = _STAGES.get(composed)
    if cached is None or cached["key"] != key:
        cached = _STAGES[composed] = {"key": key, "decoders": {}}
    return cached


def stages_of(composed) -> Stages:
    """The composed model's stages, split once and reused while its graph and submodules stay the same
    (the stages share its submodules, so training and `.to()` need no new split)."""
    entry = _entry(composed)
    if "stages" not in entry:
        entry["stages"] = split_stages(composed, [a.name for a in composed.spec.prompts])
    return entry["stages"]


def contexts_of(composed) -> Contexts:
    entry = _entry(composed)
    if "contexts" not in entry:
        entry["models"] = decoded_models(composed)
        entry["contexts"] = context_stage(stages_of(composed).anchor, set(entry["models"]))
    return entry["contexts"]


def decoder_for(composed, batch: int, length: int) -> Decoder:
    """The KV-cache decode graph for `batch` rows and at least `length` positions (built once per batch
    size, cache length, device and dtype; the last few are kept)."""
    weight = next(composed.parameters())
    max_len = -(-length // CACHE_ROUND) * CACHE_ROUND
    key = (batch, max_len, weight.device, weight.dtype)
    entry = _entry(composed)
    decoders = entry["decoders"]
    if key not in decoders:
        contexts = contexts_of(composed)
        decoders[key] = build_decoder(composed, stages_of(composed).anchor, contexts, batch, max_len, entry["models"])
        while len(decoders) > KEEP_DECODERS:
            decoders.pop(next(iter(decoders)))
    return decoders[key]


def can_cache(composed) -> bool:
    """Whether generation can use the anchor's KV cache: a transformers causal LM as the anchor."""
    return composed.anchor_model is not None and cache_kwarg(composed.anchor_model) is not None


def _check_options(max_new_tokens, temperature, top_k, top_p, cache) -> None:
    if cache not in (None, True, False):
        raise InputError(f"cache must be None (use the anchor's KV cache when it has one), True or False; got {cache!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative int; got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 means greedy); got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be a positive int or None; got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1] or None; got {top_p!r}")


def _check_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise InputError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; got {got}")
    keep = attention_mask.to(input_ids.device).bool()
    empty = (~keep.any(1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"rows {empty} of attention_mask have no real token (all 0); every prompt needs at least one")
    return keep


def _prompt_inputs(composed, inputs: dict, batch: int) -> dict:
    composed.signature.check_keywords(inputs)
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] != batch:
            raise InputError(f"{name} has batch size {value.shape[0]} but input_ids has {batch}; "
                             "give one prompt per row")
    return inputs


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits (B, V) -> scaled logits with every token outside top-k / the top-p nucleus at -inf."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                      # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, index = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs   # mass of the more likely tokens: keep while it is below top_p
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, index, ordered)
    return logits


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> one token id per row (B,): argmax at temperature 0, else a sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(composed, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             cache: bool | None = None, compile_step: bool = False, **prompt_inputs) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + n): the prompts followed by n <= max_new_tokens new tokens.

    `<augment>_input_ids` / `<augment>_mask` feed the prompt augments (read once). A row that emits an
    `eos_token_id` is finished: its later tokens are `pad_token_id` (default: the first eos id);
    generation stops early once every row is finished. `cache`: None uses the anchor's KV cache when it
    has one (a transformers causal LM), True requires it, False recomputes the sequence at every step.
    `compile_step`: run the cached decode step through `torch.compile` (`STEP_COMPILE`: CUDA graphs on a
    GPU, where small models are bound by kernel launches); the first call compiles.
    """
    check_token_ids(input_ids, "input_ids")
    _check_options(max_new_tokens, temperature, top_k, top_p, cache)
    keep = _check_mask(attention_mask, input_ids)
    prompts = _prompt_inputs(composed, prompt_inputs, input_ids.shape[0])
    eos = None if eos_token_id is None else torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    if cache and not can_cache(composed):
        raise InputError(f"cache=True, but the anchor {composed.spec.anchor.name!r} "
                         f"({type(composed.anchor_model).__name__}) is not a transformers causal LM, which is what "
                         "the KV cache is traced from; leave cache unset to recompute instead")
    if compile_step and (cache is False or not can_cache(composed)):
        raise InputError("compile_step compiles the KV-cache decode step, which this call does not use (cache=False, "
                         "or an anchor transformers does not cache); leave compile_step off")

    lengths = keep.sum(1)                                                     # (B,) real tokens per row
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)         # real tokens first, in order
    width = int(lengths.max())
    packed = input_ids.gather(1, order)[:, :width].masked_fill(~keep.gather(1, order)[:, :width], 0)
    states = stages_of(composed).augment(**prompts)                           # prompt augments: once

    def pick(logits):
        return next_token(logits, temperature, top_k, top_p, generator)

    new = None
    if cache is not False and can_cache(composed) and max_new_tokens > 0:
        try:
            new = _generate_cached(composed, packed, lengths, states, max_new_tokens, pick, eos, pad, compile_step)
        except CalmGraphError as e:  # TraceError included: the cache could not be traced
            if cache:
                raise
            warnings.warn(f"generating without the anchor's KV cache: {e}", stacklevel=3)
    if new is None:
        new = _generate_recomputing(composed, packed, lengths, states, max_new_tokens, pick, eos, pad)
    return torch.cat([input_ids, new], dim=1)


def _finish(token, finished, eos, pad):
    """The tokens to return for one step (a finished row gets pad); updates `finished`."""
    out = token.masked_fill(finished, pad)
    if eos is not None:
        finished |= torch.isin(token, eos)
    return out


def _generate_recomputing(composed, packed, lengths, states, max_new_tokens, pick, eos, pad) -> torch.Tensor:
    """Each step runs the anchor stage over the whole sequence; rows are read at their own last position."""
    B, width = packed.shape
    rows = torch.arange(B, device=packed.device)
    buf = torch.zeros(B, width + max_new_tokens, dtype=packed.dtype, device=packed.device)
    buf[:, :width] = packed
    anchor = stages_of(composed).anchor
    new, finished = [], torch.zeros(B, dtype=torch.bool, device=packed.device)
    for step in range(max_new_tokens):
        logits = anchor(buf[:, :width + step], *states)                     # (B, width + step, vocab)
        token = pick(logits[rows, lengths + step - 1])
        buf[rows, lengths + step] = token
        new.append(_finish(token, finished, eos, pad))
        if eos is not None and bool(finished.all()):  # checked only with an eos: it waits for the device
            break
    return torch.stack(new, 1) if new else packed.new_zeros(B, 0)


def _generate_cached(composed, packed, lengths, states, max_new_tokens, pick, eos, pad, compile_step=False):
    """The anchor reads each prompt once and each new token once (its KV cache), a prompt length at a time."""
    B = packed.shape[0]
    contexts = contexts_of(composed)
    out = packed.new_full((B, max_new_tokens), pad)
    used = 0
    for length in lengths.unique().tolist():
        rows = (lengths == length).nonzero().flatten()
        group = tuple(s[rows] if isinstance(s, torch.Tensor) and s.ndim and s.shape[0] == B else s for s in states)
        decoder = decoder_for(composed, len(rows), length + max_new_tokens)
        step_fn = decoder.compiled(STEP_COMPILE) if compile_step else decoder.module
        seq = packed[rows, :length]
        ctx = contexts.module(seq, *group)
        kv = decoder.project(ctx)                                           # prompt links: once
        logits = decoder.module(seq, torch.arange(length, device=seq.device), *ctx, *kv)  # prefill
        finished = torch.zeros(len(rows), dtype=torch.bool, device=seq.device)
        for step in range(max_new_tokens):
            token = pick(logits[:, -1])
            out[rows, step] = _finish(token, finished, eos, pad)
            used = max(used, step + 1)
            if step + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            if contexts.reads_sequence:                                     # shared augments: refreshed
                seq = torch.cat([seq, token[:, None]], dim=1)
                ctx = contexts.module(seq, *group)
            logits = step_fn(token[:, None], torch.tensor([length + step], device=seq.device), *ctx, *kv)
    return out[:, :used]

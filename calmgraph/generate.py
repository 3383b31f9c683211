"""Text generation with a composed model: batched, padded prompts, greedy or sampled (temperature, top-k, top-p).

Each step recomputes the anchor stage (the anchor and the shared augments, as the paper does: a shared
augment reads the sequence generated so far) over the whole sequence; the prompt augments run once per
call, in the augment stage (`passes/stage.py`).

Padding. Prompts may come padded (left padding, as tokenizers give them for generation, with an
`attention_mask`). Rather than thread a mask and position ids into every model (custom models take
neither), each row's real tokens are moved to the front of a working buffer and what follows them is
filler. The anchor and shared augments are causal language models, so a position never sees what comes
after it: a row's logits are those of its unpadded prompt, and its next token is read at its own last
position. The returned ids keep the caller's layout: `torch.cat([input_ids, new_tokens], dim=1)`.
"""
from __future__ import annotations

from collections.abc import Sequence
from weakref import WeakKeyDictionary

import torch

from .errors import InputError
from .passes.merge import check_token_ids
from .passes.stage import Stages, split_stages

_STAGES: WeakKeyDictionary = WeakKeyDictionary()  # composed -> (what it was split from, its stages)


def stages_of(composed) -> Stages:
    """The composed model's stages, split once and reused while its graph and submodules stay the same
    (the stages share its submodules, so training and `.to()` need no new split)."""
    key = (composed.code, tuple((name, id(child)) for name, child in composed.named_children()))
    cached = _STAGES.get(composed)
    if cached is None or cached[0] != key:
        cached = _STAGES[composed] = (key, split_stages(
            composed, [a.name for a in composed.spec.augments if a.input == "prompt"]))
    return cached[1]


def _check_options(max_new_tokens, temperature, top_k, top_p) -> None:
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
    allowed = [n for n in composed.input_names if n != "input_ids"]
    unknown = [k for k in inputs if k not in allowed]
    if unknown:
        raise InputError(f"unknown inputs {unknown}; this composition takes input_ids"
                         f"{''.join(', ' + n for n in allowed)}")
    missing = [n for n in allowed if n.endswith("_input_ids") and n not in inputs]
    if missing:
        raise InputError(f"missing inputs {missing}: each prompt augment needs its own token ids")
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
             **prompt_inputs) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + n): the prompts followed by n <= max_new_tokens new tokens.

    `<augment>_input_ids` / `<augment>_mask` feed the prompt augments (read once). A row that emits an
    `eos_token_id` is finished: its later tokens are `pad_token_id` (default: the first eos id);
    generation stops early once every row is finished.
    """
    check_token_ids(input_ids, "input_ids")
    _check_options(max_new_tokens, temperature, top_k, top_p)
    keep = _check_mask(attention_mask, input_ids)
    prompts = _prompt_inputs(composed, prompt_inputs, input_ids.shape[0])
    eos = None if eos_token_id is None else torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if eos is not None else 0)

    B, device = input_ids.shape[0], input_ids.device
    lengths = keep.sum(1)                                                     # (B,) real tokens per row
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)         # real tokens first, in order
    width = int(lengths.max())
    buf = torch.zeros(B, width + max_new_tokens, dtype=input_ids.dtype, device=device)
    buf[:, :width] = input_ids.gather(1, order)[:, :width].masked_fill(~keep.gather(1, order)[:, :width], 0)
    rows = torch.arange(B, device=device)

    stages = stages_of(composed)
    states = stages.augment(**prompts)                                        # prompt augments: once
    new = torch.full((B, max_new_tokens), pad, dtype=input_ids.dtype, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for step in range(max_new_tokens):
        logits = stages.anchor(buf[:, :width + step], *states)                # (B, width + step, vocab)
        token = next_token(logits[rows, lengths + step - 1], temperature, top_k, top_p, generator)
        buf[rows, lengths + step] = token
        new[:, step] = token.masked_fill(finished, pad)
        n = step + 1
        if eos is not None:
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
    return torch.cat([input_ids, new[:, :n]], dim=1)

"""The next token from the logits: transformers' logits processors and warpers where transformers is
installed (repetition penalty, min_new_tokens, temperature, top-k, top-p: the same classes, in the same
order as its `generate`), then argmax or a sample. Without transformers, greedy and temperature / top-k /
top-p sampling still work (`filter_logits`); the other processors need it.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from .options import Options


def logits_process():
    """transformers' `generation.logits_process` module, or None where transformers is not installed."""
    try:
        from transformers.generation import logits_process
    except ImportError:
        return None
    return logits_process


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """logits (B, V) -> scaled logits with every token outside top-k / the top-p nucleus at -inf."""
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
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
    """logits (B, V) -> one token id per row (B,): argmax at temperature 0, else a sample (no transformers)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Chooser:
    """choose(logits (B, V), seen (B, T + step)) -> (scores, tokens): `seen` is the caller's input_ids and the
    tokens returned so far, what transformers' processors read."""

    def __init__(self, o: Options, prompt: torch.Tensor, attention_mask: torch.Tensor | None,
                 eos: torch.Tensor | None, generator: torch.Generator | None):
        self.options, self.generator = o, generator
        lp = logits_process()
        if lp is None:
            needs = [n for n, on in (("repetition_penalty", o.repetition_penalty != 1.0),
                                     ("min_new_tokens", o.min_new_tokens > 0)) if on]
            if needs:
                raise InputError(f"{' and '.join(needs)} use transformers' logits processors; install transformers "
                                 "or leave them unset")
            self.processors = None
            return
        self.processors = lp.LogitsProcessorList()
        if o.repetition_penalty != 1.0:  # as transformers: a left-padded row's pads are not penalised
            ignore = None if attention_mask is None else (attention_mask != 0).int().argmax(dim=1)
            self.processors.append(lp.RepetitionPenaltyLogitsProcessor(o.repetition_penalty, prompt_ignore_length=ignore))
        if o.min_new_tokens > 0 and eos is not None:
            self.processors.append(lp.MinNewTokensLengthLogitsProcessor(prompt.shape[1], o.min_new_tokens, eos,
                                                                        device=prompt.device))
        if not o.greedy:
            if o.temperature != 1.0:
                self.processors.append(lp.TemperatureLogitsWarper(o.temperature))
            if o.top_k:
                self.processors.append(lp.TopKLogitsWarper(top_k=o.top_k))
            if o.top_p is not None and o.top_p < 1.0:
                self.processors.append(lp.TopPLogitsWarper(top_p=o.top_p))

    @property
    def reads_seen(self) -> bool:
        """Whether a processor reads the tokens so far (else `seen` need not be kept)."""
        return bool(self.processors)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        o, logits = self.options, logits.float()
        if self.processors is None:
            scores = logits if o.greedy else filter_logits(logits, o.temperature, o.top_k, o.top_p)
        else:
            scores = self.processors(seen, logits) if self.processors else logits
        if o.greedy:
            return scores, scores.argmax(-1)
        return scores, torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(-1)

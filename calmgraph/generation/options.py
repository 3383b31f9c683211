"""`generate`'s options, named and defaulted as transformers' `generate` names them: greedy unless
`do_sample=True`; `temperature`, `top_k` and `top_p` apply only when sampling (given without it, they
warn with transformers' own words); sampling keeps the 50 likeliest tokens unless `top_k` says otherwise
(`top_k=0`: all), as transformers does. A `generation_config=` (a transformers `GenerationConfig` or a dict)
supplies defaults; keywords given to the call win over it.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InputError

DEFAULTS = {"max_new_tokens": None, "min_new_tokens": 0, "do_sample": False, "temperature": 1.0, "top_k": 50,
            "top_p": None, "repetition_penalty": 1.0, "eos_token_id": None, "pad_token_id": None}
# what a model's own GenerationConfig carries that changes nothing here
IGNORED = ("bos_token_id", "use_cache", "transformers_version", "_from_model_config")
# transformers' warning (GenerationConfig.validate) for a sampling flag given without do_sample
NOT_SAMPLING = ("`do_sample` is not set to `True`. However, `{flag}` is set to `{value}` -- this flag is only used in "
                "sample-based generation modes. You should set `do_sample=True` or unset `{flag}`.")


@dataclass(frozen=True)
class Options:
    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float
    eos_token_id: int | Sequence[int] | None
    pad_token_id: int | None

    @property
    def greedy(self) -> bool:
        """temperature=0 (calmgraph's spelling of greedy before `do_sample`) is greedy too."""
        return not self.do_sample or self.temperature == 0


def from_config(config) -> dict:
    """The options a `generation_config` sets: a transformers GenerationConfig (its non-default fields) or a dict."""
    if config is None:
        return {}
    if isinstance(config, dict):
        unknown = [k for k in config if k not in DEFAULTS and k not in IGNORED]
        if unknown:
            raise InputError(f"generation_config has unknown fields {unknown}; generate reads {', '.join(DEFAULTS)}")
        return {k: v for k, v in config.items() if k in DEFAULTS}
    if hasattr(config, "to_diff_dict"):
        given = config.to_diff_dict()
        unsupported = {k: v for k, v in given.items()
                       if k not in DEFAULTS and k not in IGNORED and v not in (None, False)}
        if unsupported:
            raise InputError(f"generation_config sets {unsupported}, which calmgraph's generate does not do (it "
                             f"decodes greedily or by sampling, one sequence per row); it reads {', '.join(DEFAULTS)}")
        return {k: v for k, v in given.items() if k in DEFAULTS}
    raise InputError(f"generation_config must be a transformers GenerationConfig or a dict; got {type(config).__name__}")


def resolve(generation_config, given: dict) -> Options:
    """The call's options: the defaults, then `generation_config`, then the keywords given (not None)."""
    values = {**DEFAULTS, **from_config(generation_config), **{k: v for k, v in given.items() if v is not None}}
    if values["max_new_tokens"] is None:
        raise InputError("max_new_tokens is required: pass it, or set it in generation_config")
    options = Options(**values)
    check(options)
    if not options.do_sample:
        for flag, neutral in (("temperature", (1.0, 0)), ("top_k", (None, 50)), ("top_p", (None, 1.0))):
            value = getattr(options, flag)
            if value not in neutral:
                # stacklevel: the line that called composed.generate
                warnings.warn(NOT_SAMPLING.format(flag=flag, value=value), UserWarning, stacklevel=5)
    return options


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    """A finite int or float (nan and inf would poison every score they touch)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check(o: Options) -> None:
    if not _int(o.max_new_tokens) or o.max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be a non-negative int; got {o.max_new_tokens!r}")
    if not _int(o.min_new_tokens) or o.min_new_tokens < 0:
        raise InputError(f"min_new_tokens must be a non-negative int; got {o.min_new_tokens!r}")
    if not isinstance(o.do_sample, bool):
        raise InputError(f"do_sample must be True or False; got {o.do_sample!r}")
    if not _number(o.temperature) or o.temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 means greedy); got {o.temperature!r}")
    if o.top_k is not None and (not _int(o.top_k) or o.top_k < 0):
        raise InputError(f"top_k must be a non-negative int (0: no top-k) or None; got {o.top_k!r}")
    if o.top_p is not None and (not _number(o.top_p) or not 0 < o.top_p <= 1):
        raise InputError(f"top_p must be in (0, 1] or None; got {o.top_p!r}")
    if not _number(o.repetition_penalty) or o.repetition_penalty <= 0:
        raise InputError(f"repetition_penalty must be a finite positive number (1.0: none); got {o.repetition_penalty!r}")
    eos = o.eos_token_id
    if eos is not None and not _int(eos) and not (isinstance(eos, Sequence) and eos and all(map(_int, eos))):
        raise InputError(f"eos_token_id must be an int, a non-empty list of ints, or None; got {eos!r}")
    if o.pad_token_id is not None and not _int(o.pad_token_id):
        raise InputError(f"pad_token_id must be an int or None; got {o.pad_token_id!r}")

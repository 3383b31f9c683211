"""Text generation with a composed model: batched, padded prompts; greedy, or sampled as transformers samples.

The prompt augments run once per call, in the augment stage (`stage.py`). With a transformers anchor,
the anchor then reads the prompt once and each new token once, through its decode graph with a static KV
cache (`decode.py`); so does every shared augment that is a transformers causal LM, and each link from
one keeps its keys and values: a step costs one token through every model. A shared augment without such
a cache makes the shared augments run over the sequence so far at each step instead (only the anchor is
cached). Any other anchor (`cache=False`, or one transformers does not cache) recomputes the anchor stage
over the whole sequence at each step. Each decode graph's first prefill and first three steps are checked
against that recomputing path (`check.py`). A composition sharded across processes recomputes, each process
its own prompts, in lockstep (`lockstep.py`).

Padding. Prompts may come padded (left padding, as tokenizers give them for generation, with an
`attention_mask`). Rather than thread a mask and position ids into every model (custom models take
neither), each row's real tokens are moved to the front of a working buffer and what follows them is
filler. The anchor and shared augments are causal language models, so a position never sees what comes
after it: a row's logits are those of its unpadded prompt, and its next token is read at its own last
position. The cached path runs the rows of each prompt length together (one cache position for all), all
lengths in step. The returned ids keep the caller's layout: `torch.cat([input_ids, new_tokens], dim=1)`.

Masked writes (`writes: masked`). `write_mask` covers the prompt and moves with its tokens; the new tokens
are not written to (the decode step's write_mask is zeros).
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch

from ..cross_attention import CrossAttention
from ..errors import CalmGraphError, InputError, InternalError, ParallelError, TraceError
from ..parallel import sharded as sharded_parameter
from ..passes.merge import check_token_ids, prompt_mask, write_mask
from ..signature import WRITE_MASK
from . import copies, lockstep
from .check import UNSOUND, Checked
from .decode import Decoder, build_decoder, cache_kwarg, decoded_models, shift_invariant, source_model
from .options import DEFAULTS, Options, resolve
from .sampling import Chooser, filter_logits, next_token  # noqa: F401 - filter_logits, next_token: public helpers
from .stage import Contexts, Stages, context_stage, split_stages
from .stopping import Verdicts, criteria, finish_lag, stopped

_STAGES: WeakKeyDictionary = WeakKeyDictionary()  # composed -> (what it was split from, its stages, ...)
CACHE_ROUND = 32    # the shortest KV cache; longer ones double (`cache_length`)
KEEP_DECODERS = 8   # decoders (each holds its KV caches) kept per composed model
REUSE_LONGER = 4    # a kept decoder with a cache up to this many times a call's bucket serves it (`decoder_for`)
PAD_ROWS = 2        # and, for a compiled step, one for up to this many times the call's rows
# torch.compile's keywords for a decode step (generate's compile_step=True): CUDA graphs (a GPU step is bound
# by launches); coordinate-descent tuning, under which inductor runs a one-row matmul as a reduction kernel of
# its own and tunes it (a batch-1 step 1.15-1.4x faster on an H200 than cuBLAS's); and combo kernels, which
# launch independent kernels as one (a block's q/k/v products, gate and up: 544 -> 289 kernels a token, 1.34x
# at batch 1 in shared mode), with no weight copied. See benchmarks/README.md, "At LLM shapes". A cold first
# compile tunes for up to 7 minutes on an H200 at those shapes (inductor caches it on disk).
STEP_COMPILE = {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True, "combo_kernels": True}}
# torch.compile's keywords for the prefill (generate's compile_prefill=True): one compile for every prompt
# length. It runs the prompt through fused kernels rather than the eager graph's several hundred ops, which on
# a GPU are bound by their launches. Under CUDA graphs ({"options": {"triton.cudagraphs": True}}) the first
# token came 2.6x sooner than with this on an H200 at batch 1, but a 128-token call gained only 1.02-1.03x, for
# a second compile and a graph per prompt length (docs/generation.md): an option, not the default.
PREFILL_COMPILE = {"dynamic": True}
COMPILE_KEYWORDS = ("backend", "mode", "options", "dynamic", "fullgraph")


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


def augment_stage(composed, options: dict | None = None):
    """The prompt augments' stage (`stages_of(composed).augment`), or with `options` (compile_prefill) its
    `torch.compile`, made once per composed model and options."""
    stage = stages_of(composed).augment
    if options is None or not composed.spec.prompts:
        return stage
    entry = _entry(composed)
    if entry.get("augment_compiled", (None,))[0] != options:
        entry["augment_compiled"] = (dict(options), torch.compile(stage, **options))
    return entry["augment_compiled"][1]


def contexts_of(composed) -> Contexts:
    entry = _entry(composed)
    if "contexts" not in entry:
        entry.setdefault("models", decoded_models(composed))
        entry["contexts"] = context_stage(stages_of(composed).anchor, set(entry["models"]))
    return entry["contexts"]


def decode_anchor_alone(composed) -> bool:
    """After a decode graph of the anchor and its shared augments failed (a trace, or its check): decode the
    anchor alone, the shared augments rerun over the sequence at each step, as for augments without a cache.
    False where the anchor was decoded alone already."""
    entry, anchor = _entry(composed), (composed.spec.anchor.name,)
    if (entry.get("models") or decoded_models(composed)) == anchor:
        return False
    entry["models"] = anchor
    for made in ("contexts", "ragged"):
        entry.pop(made, None)
    entry["decoders"].clear()
    return True


def cache_length(length: int, positions: int | None = None) -> int:
    """The KV cache a call needing `length` positions decodes in: the first of 32, 64, 128... that holds it,
    so that a decoder (a trace, and a compile) serves every length up to its own and a cache is at most
    twice what a call needs; no longer than the models' `positions` where that is enough."""
    bucket = CACHE_ROUND << ((max(length, 1) - 1) // CACHE_ROUND).bit_length()
    return bucket if positions is None or bucket <= positions else max(length, positions)


def decoder_for(composed, batch: int, length: int, slot: int = 0, ragged: bool = False,
                reuse: bool = False, pad_rows: bool = False) -> Decoder:
    """The KV-cache decode graph for `batch` rows and at least `length` positions (built once per batch
    size, cache length, device, dtype, autocast dtype and raggedness; the KEEP_DECODERS used last are kept).
    Groups of rows decoded side by side with the same batch size and cache length take slots 1, 2...: copies
    with caches of their own.
    `ragged`: rows of several prompt lengths, left-padded (`build_decoder`).
    `reuse` (a call decoding all its rows in one decoder): a decoder kept whose cache is longer than the
    bucket `length` needs, by at most REUSE_LONGER times, serves it (the smallest such): its trace and its
    compiled step are reused, for attention over more (masked) cache slots. With `pad_rows` too (a compiled
    step), one kept for up to PAD_ROWS times `batch` rows serves as well (the fewest rows first): the caller
    fills the rows past its own (`decoder.batch`) with copies of its first."""
    weight = next(composed.parameters())
    max_len = cache_length(length, composed.signature["input_ids"].positions)
    autocast = torch.get_autocast_dtype(weight.device.type) if torch.is_autocast_enabled(weight.device.type) \
        else None
    key = (batch, max_len, weight.device, weight.dtype, autocast, ragged)
    entry = _entry(composed)
    decoders = entry["decoders"]
    if reuse and not slot and (*key, 0) not in decoders:
        rows = PAD_ROWS * batch if pad_rows else batch
        larger = [k[:-1] for k in decoders if batch <= k[0] <= rows and k[2:] == (*key[2:], 0)
                  and max_len <= k[1] <= REUSE_LONGER * max_len]
        key = min(larger, key=lambda k: k[:2], default=key)
    if (*key, slot) not in decoders:
        if slot:
            decoders[(*key, slot)] = decoder_for(composed, batch, length, 0, ragged).with_own_caches()
        else:
            contexts = contexts_of(composed)
            decoders[(*key, 0)] = build_decoder(composed, stages_of(composed).anchor, contexts, batch, max_len,
                                                entry["models"], ragged, autocast is not None)
        while len(decoders) > KEEP_DECODERS:
            decoders.pop(next(iter(decoders)))
    decoders[(*key, slot)] = decoders.pop((*key, slot))  # the last used last: the first to go is the least used
    return decoders[(*key, slot)]


def ragged_ok(composed) -> bool:
    """Whether rows of several prompt lengths decode in one decoder, each row's positions shifted by its
    padding: every decoded model is `decode.shift_invariant`, and no link both rotates its queries and keys
    and has a null key (unrotated, it makes the scores depend on the query's own position). Found once per
    composed model; `CachedSteps` also falls back to a decoder per length if the padding cannot be added."""
    entry = _entry(composed)
    if "ragged" not in entry:
        contexts_of(composed)                                            # finds the decoded models
        links = [m for m in composed.modules() if isinstance(m, CrossAttention)]
        entry["ragged"] = (all(shift_invariant(source_model(composed, m)) for m in entry["models"])
                           and not any(link.rotary and link.null_kv is not None for link in links))
    return entry["ragged"]


def can_cache(composed) -> bool:
    """Whether generation can use the anchor's KV cache: a transformers causal LM as the anchor (found once
    per composed model, as its stages: it walks every module of the anchor)."""
    entry = _entry(composed)
    if "can_cache" not in entry:
        entry["can_cache"] = composed.anchor_model is not None and cache_kwarg(composed.anchor_model) is not None
    return entry["can_cache"]


def _check_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise InputError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; got {got}")
    keep = prompt_mask(input_ids, attention_mask.to(input_ids.device), "attention_mask").bool()  # 0/1 only
    empty = (~keep.any(1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"rows {empty} of attention_mask have no real token (all 0); every prompt needs at least one")
    return keep


def _compile_options(value, name: str, default: dict) -> dict | None:
    """torch.compile's keywords for `name` (compile_step, compile_prefill; None: run it eager)."""
    if isinstance(value, bool):
        return dict(default) if value else None
    if not isinstance(value, dict):
        raise InputError(f"{name} must be True, False or a dict of torch.compile keywords "
                         f"({', '.join(COMPILE_KEYWORDS)}); got {value!r}")
    unknown = sorted(set(map(str, value)) - set(COMPILE_KEYWORDS))
    if unknown:
        raise InputError(f"{name}: torch.compile takes no {unknown}; it takes {', '.join(COMPILE_KEYWORDS)}")
    if "mode" in value and "options" in value:
        raise InputError(f"{name}: give torch.compile a mode or options, not both (options "
                         "{'triton.cudagraphs': True} is what mode='reduce-overhead' sets)")
    return dict(value)


def _check_eos(ids: list[int], vocab: int | None) -> None:
    """eos ids the models cannot emit would never finish a row: most likely another tokenizer's. (One of
    several may be outside, as transformers allows: the others still finish rows.)"""
    outside = [i for i in ids if i < 0 or (vocab is not None and i >= vocab)]
    if ids and len(outside) == len(ids):
        bound = f"[0, {vocab})" if vocab is not None else "of non-negative ids"
        said = outside[0] if len(ids) == 1 else ids
        raise InputError(f"eos_token_id {said} is outside the vocabulary {bound} of the models reading the "
                         "sequence, so no row could ever finish; pass the eos id of their tokenizer")


OPTIONS = (*DEFAULTS, "attention_mask", "generation_config", "stopping_criteria", "streamer", "generator", "cache",
           "compile_step", "compile_prefill")


def _prompt_inputs(composed, inputs: dict, batch: int) -> dict:
    unknown = [k for k in inputs if k not in composed.signature.names]
    if unknown:
        takes = ", ".join(f"{i.name}{'' if i.required else ' (optional)'}" for i in composed.signature.inputs)
        raise InputError(f"unknown keywords {unknown}: generate takes {', '.join(OPTIONS)}, and the inputs of this "
                         f"composition: {takes}")
    composed.signature.check_keywords(inputs)
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] != batch:
            raise InputError(f"{name} has batch size {value.shape[0]} but input_ids has {batch}; "
                             "give one prompt per row")
    return inputs


@torch.inference_mode()
def generate(composed, input_ids: torch.Tensor, max_new_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             cache: bool | None = None, compile_step: bool | dict = False, *, compile_prefill: bool | dict = False,
             concat_projections: bool = False,
             do_sample: bool | None = None,
             min_new_tokens: int | None = None, repetition_penalty: float | None = None,
             generation_config=None, stopping_criteria=None, streamer=None, **prompt_inputs) -> torch.Tensor:
    """input_ids (B, T) -> (B, T + n): the prompts followed by n <= max_new_tokens new tokens.

    As transformers' `generate`: greedy unless `do_sample=True` (then `temperature`, `top_k`, `top_p`);
    `min_new_tokens`, `repetition_penalty` (transformers' logits processors); `generation_config` (a
    GenerationConfig or a dict; the keywords given win); `stopping_criteria` (called with the ids so far and
    the scores; a row it stops is finished); `streamer` (`put` the prompt, then each step's tokens, then `end`).
    `temperature=0` is greedy too. `generator` seeds the samples.

    The prompt and max_new_tokens must fit the positions of the models reading the sequence (refused
    before anything is allocated otherwise), and only ids all of them can embed are generated.

    `<augment>_input_ids` / `<augment>_mask` feed the prompt augments (read once); `write_mask` (B, T), where
    the composition takes one, says where in the prompt its `writes: masked` blocks add (new tokens: nowhere).
    A row that emits an `eos_token_id` is finished: its later tokens are `pad_token_id` (default: the first
    eos id); generation stops early once every row is finished (with a compiled step on a GPU, seen up to
    `stopping.FINISH_LAG` steps late, so as not to wait for the GPU at each step; the steps past it are dropped).
    `cache`: None uses the KV caches when the anchor has one (a transformers causal LM), True requires it,
    False recomputes the sequence at every step.
    `compile_step`: run the cached decode step through `torch.compile`: True with `STEP_COMPILE` (CUDA
    graphs, coordinate-descent tuning and combo kernels), a dict with those keywords instead (e.g. `{"mode":
    "reduce-overhead"}` compiles in a third of the time and decodes slower at batch 1). Its caches are sized to
    a bucket (`cache_length`: 32, 64, 128... positions), so it compiles once per batch size and bucket (a
    call whose rows share a decoder decodes in a kept one up to REUSE_LONGER times its bucket, and up to
    PAD_ROWS times its rows).
    `concat_projections` (with `compile_step`): the compiled step computes each block's q/k/v, and its gate
    and up, as one product over their weights concatenated (`fuse.concat_projections`), which costs a copy of
    those weights (about 64% of a Llama's), made once per composed model; at 8 rows on an H200 the step took
    0.82x the GPU time, at one row on an H100 it made 1.21x the tokens/s (benchmarks/README.md, "At LLM shapes").
    `compile_prefill`: run what reads the prompts through `torch.compile` too (the cached prefill, and the
    prompt augments' stage): True with `PREFILL_COMPILE` (dynamic shapes: one compile for every prompt length;
    the prefill's per batch size and bucket), or a dict of its keywords.
    On a composition sharded with `calmgraph.parallel.shard`, every process calls it for its own prompts, and
    each recomputes the sequence at each step, in lockstep with the others (`lockstep.py`).
    """
    sharded = sharded_parameter(composed)
    # a sharded call runs its forwards in step with the other processes', which it tells if it raises
    rounds = lockstep.Rounds(sharded[1], input_ids) if sharded is not None else None
    try:
        given = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        call = _checked_call(composed, input_ids, generation_config, given, sharded, generator, attention_mask, cache,
                             compile_step, compile_prefill, concat_projections, stopping_criteria, prompt_inputs)
        packed, lengths, writes = _packed(input_ids, call)
        steps = _steps(composed, packed, lengths, call.prompts, writes, call.options.max_new_tokens, cache,
                       call.step_options, call.prefill_options, concat_projections, rounds)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        # a streamer or a criterion sees every step it is given: read each verdict at once for them
        lag = 0 if streamer is not None or call.stop is not None else finish_lag(
            input_ids.device, call.step_options is not None and isinstance(steps, CachedSteps))
        new = _decode(steps, input_ids, call, streamer, composed.signature["input_ids"].vocab, lag)
        if rounds is not None:
            steps.drain()
    except Exception:
        if rounds is not None:
            rounds.fail()
        raise
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, new], dim=1)


@dataclass
class _Call:
    """A generate call's arguments, checked and resolved."""
    options: Options
    step_options: dict | None
    prefill_options: dict | None
    keep: torch.Tensor               # (B, T) bool: the prompt's real tokens
    lengths: torch.Tensor            # (B,) real tokens per row
    width: int                       # the longest row's
    prompts: dict                    # the prompt augments' inputs
    writes: torch.Tensor | None      # write_mask, where the composition takes one
    eos: torch.Tensor | None
    pad: int
    choose: Chooser
    stop: object                     # the stopping criteria, or None


def _checked_call(composed, input_ids, generation_config, given: dict, sharded, generator, attention_mask, cache,
                  compile_step, compile_prefill, concat_projections, stopping_criteria, prompt_inputs) -> _Call:
    """Every argument checked before anything runs or is allocated (an `InputError` naming the argument);
    `given`: the generation options passed as keywords, which win over `generation_config`'s."""
    shared = composed.signature["input_ids"]  # the smallest vocabulary and fewest positions reading the sequence
    check_token_ids(input_ids, "input_ids")
    o = resolve(generation_config, given)
    if not (cache is None or isinstance(cache, bool)):
        raise InputError("cache must be None (use the anchor's KV cache when it has one), True or False; "
                         f"got {cache!r}")
    step_options = _compile_options(compile_step, "compile_step", STEP_COMPILE)
    prefill_options = _compile_options(compile_prefill, "compile_prefill", PREFILL_COMPILE)
    if not isinstance(concat_projections, bool):
        raise InputError(f"concat_projections must be True or False; got {concat_projections!r}")
    if concat_projections and step_options is None:
        raise InputError("concat_projections rewrites the compiled decode step; pass compile_step=True with it")
    if generator is not None and (not isinstance(generator, torch.Generator)
                                  or generator.device.type != input_ids.device.type):
        got = f"one on {generator.device}" if isinstance(generator, torch.Generator) else repr(generator)
        raise InputError(f"generator must be a torch.Generator on the ids' device ({input_ids.device}); got {got}")
    keep = _check_mask(attention_mask, input_ids)
    check_token_ids(input_ids.masked_fill(~keep, 0), "input_ids", shared.vocab)  # padding is never read
    prompts = _prompt_inputs(composed, prompt_inputs, input_ids.shape[0])
    writes = prompts.pop(WRITE_MASK, None)
    if writes is not None:
        writes = write_mask(input_ids, writes, WRITE_MASK).to(input_ids.device)
    eos_ids = [o.eos_token_id] if isinstance(o.eos_token_id, int) else list(o.eos_token_id or ())
    _check_eos(eos_ids, shared.vocab)
    eos = torch.tensor(eos_ids, device=input_ids.device) if eos_ids else None
    pad = o.pad_token_id if o.pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    if cache and not can_cache(composed):
        raise InputError(f"cache=True, but the anchor {composed.spec.anchor.name!r} "
                         f"({type(composed.anchor_model).__name__}) is not a transformers causal LM, which is what "
                         "the KV cache is traced from; leave cache unset to recompute instead")
    if sharded is not None and (cache or step_options is not None or prefill_options is not None):
        raise ParallelError(f"this composition is sharded across processes (e.g. {sharded[0]!r}), so it "
                            "generates by recomputing the sequence at each step; the KV-cache decode graphs "
                            "(cache=True, compile_step, compile_prefill) are traced from whole models. Leave those "
                            "unset, or save the new parameters (composed.save_new) and generate from the "
                            "composition compiled unsharded, after cg.load_new")
    for name, compiled in (("compile_step", step_options), ("compile_prefill", prefill_options)):
        if compiled is not None and (cache is False or not can_cache(composed)):
            raise InputError(f"{name} compiles the KV-cache decode graph, which this call does not use "
                             f"(cache=False, or an anchor transformers does not cache); leave {name} off")
    choose = Chooser(o, input_ids, attention_mask, eos, generator)
    stop = criteria(stopping_criteria)
    lengths = keep.sum(1)
    width = int(lengths.max())
    if shared.positions is not None and width + o.max_new_tokens > shared.positions:
        raise InputError(f"a prompt of {width} tokens and max_new_tokens={o.max_new_tokens} need "
                         f"{width + o.max_new_tokens} positions, but the models reading the sequence have "
                         f"{shared.positions}; lower max_new_tokens to at most {max(shared.positions - width, 0)}")
    return _Call(o, step_options, prefill_options, keep, lengths, width, prompts, writes, eos, pad, choose, stop)


def _packed(input_ids: torch.Tensor, call: _Call):
    """Each row's real tokens moved to its front (`packed`, (B, width), zeros after them), their count
    (`lengths`, (B,)), and the write mask moved with them."""
    keep, width = call.keep, call.width
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)         # real tokens first, in order
    real = keep.gather(1, order)[:, :width]
    packed = input_ids.gather(1, order)[:, :width].masked_fill(~real, 0)
    writes = call.writes
    if writes is not None:
        writes = writes.gather(1, order)[:, :width].masked_fill(~real, 0)
    return packed, call.lengths, writes


def _steps(composed, packed, lengths, prompts, writes, max_new_tokens, cache, step_options, prefill_options,
           concat_projections, rounds):
    """The steps a call decodes through: cached (checked against the recomputing path at first use) where the
    composition's models decode with a KV cache, else recomputing; on a sharded composition, in lockstep."""
    if rounds is not None:
        if cache is None and can_cache(composed):
            warnings.warn("generating without the KV cache: this composition is sharded across processes, and the "
                          "decode graphs are traced from whole models; each step recomputes the sequence",
                          stacklevel=4)
        run = lockstep.forward_of(composed, prompts, writes is not None)
        return lockstep.Lockstep(RecomputedSteps(composed, packed, lengths, (), max_new_tokens, writes, run), rounds)
    states = augment_stage(composed, prefill_options)(**prompts)              # prompt augments: once
    steps = None
    recompute = functools.partial(RecomputedSteps, composed, packed, lengths, states, max_new_tokens, writes)
    cacheable = cache is not False and can_cache(composed)
    unsound = _entry(composed).get(UNSOUND) if cacheable else None
    if unsound is not None:   # a decode graph of this composition failed its check (`check.py`)
        if cache:
            raise InternalError(f"{unsound}. generate(..., cache=False) recomputes")
        warnings.warn(f"generating without the KV cache: {unsound}", stacklevel=4)
    elif cacheable and max_new_tokens > 0:
        cached = functools.partial(CachedSteps, composed, packed, lengths, states, max_new_tokens, step_options,
                                   writes, prefill_options, concat_projections)
        try:
            try:
                steps = cached()
            except TraceError as e:   # a shared augment's: the anchor alone, if it was not already
                if e.model == composed.spec.anchor.name or e.model is None or not decode_anchor_alone(composed):
                    raise
                warnings.warn(f"decoding the anchor alone with a KV cache; the shared augments rerun over the "
                              f"sequence at each step: {e}", stacklevel=4)
                steps = cached()
        except CalmGraphError as e:  # TraceError included: the cache could not be traced
            if cache:
                raise
            warnings.warn(f"generating without the anchor's KV cache: {e}", stacklevel=4)
    if steps is None:
        steps = recompute()
    elif not (steps.checked("prefill") and steps.checked("step")):
        steps = Checked(steps, recompute(), _entry(composed), strict=bool(cache))
    return steps


def _decode(steps, input_ids, call: _Call, streamer, vocab, lag: int = 0) -> torch.Tensor:
    """The loop: logits -> a token per row -> the next logits, until max_new_tokens or every row is finished.
    Only ids every model reading the sequence can embed are chosen: an anchor whose vocabulary is larger than
    a shared augment's never emits the ids past the smaller one (it could not read them back). Whether every
    row is finished is read `lag` steps late at most (`Verdicts`); the steps made past the finish are dropped."""
    o, choose, eos, pad, stop = call.options, call.choose, call.eos, call.pad, call.stop
    B = input_ids.shape[0]
    seen, new = input_ids, []
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    verdicts = Verdicts(lag) if eos is not None or stop is not None else None  # else: no row finishes
    done = None
    logits = steps.first() if o.max_new_tokens else None
    for step in range(o.max_new_tokens):
        if vocab is not None and logits.shape[-1] > vocab:
            logits[:, vocab:] = float("-inf")  # the steps return a fresh tensor each time: no copy needed
        scores, token = choose(logits, seen)
        out = token.masked_fill(finished, pad)
        new.append(out)
        if choose.reads_seen or stop is not None:
            seen = torch.cat([seen, out[:, None]], dim=1)
        if streamer is not None:
            streamer.put(out.cpu())
        if eos is not None:
            finished |= torch.isin(token, eos)
        if stop is not None:
            finished |= stopped(stop(seen, scores), B, finished.device)
        if verdicts is not None:
            done = verdicts.add(step, finished)
        if done is not None or step + 1 == o.max_new_tokens:
            break
        logits = steps.next(token, step)
    if verdicts is not None and done is None:
        done = verdicts.last()
    new = new if done is None else new[:done + 1]
    return torch.stack(new, 1) if new else input_ids.new_zeros(B, 0)


class RecomputedSteps:
    """Each step runs the anchor stage over the whole sequence; rows are read at their own last position."""

    def __init__(self, composed, packed, lengths, states, max_new_tokens, writes=None, run=None):
        B, width = packed.shape
        self.rows, self.lengths, self.width, self.states = torch.arange(B, device=packed.device), lengths, width, states
        self.buf = packed  # grows as tokens come (doubling), not to max_new_tokens at once: a row may stop early
        self.writes = writes  # write_mask, packed like buf; 0 past the prompt
        # `run`: the anchor stage's call made another way (`lockstep.forward_of`), on the weights as they are
        self.anchor = stages_of(composed).anchor if run is None else run
        # under autocast: each linear weight cast once, not at every step
        self.weights = ({} if run is not None
                        else copies.by_identity(self.anchor, copies.autocast_copies(composed, packed.device)))

    def _logits(self, n: int):
        args = (self.buf[:, :n], *(() if self.writes is None else (self.writes[:, :n],)), *self.states)
        if self.weights:
            return torch.func.functional_call(self.anchor, self.weights, args, tie_weights=False)
        return self.anchor(*args)                                                   # (B, n, vocab)

    def first(self):
        return self._logits(self.width)[self.rows, self.lengths - 1]

    def next(self, token, step):
        if self.width + step + 1 > self.buf.shape[1]:
            self.buf = torch.cat([self.buf, torch.zeros_like(self.buf)], dim=1)
            if self.writes is not None:
                self.writes = torch.cat([self.writes, torch.zeros_like(self.writes)], dim=1)
        self.buf[self.rows, self.lengths + step] = token
        return self._logits(self.width + step + 1)[self.rows, self.lengths + step]

    def idle(self) -> None:
        """A forward of one position, whose logits nobody reads (`lockstep.Lockstep.drain`)."""
        self._logits(1)


class CachedSteps:
    """The decode graphs read each prompt once and each new token once, a decoder per prompt length, all
    lengths in step (so a step's logits, hence its samples, processors and streamer, cover every row)."""

    def __init__(self, composed, packed, lengths, states, max_new_tokens, step_options: dict | None = None,
                 writes: torch.Tensor | None = None, prefill_options: dict | None = None, concat: bool = False):
        B = packed.shape[0]
        self.contexts = contexts_of(composed)
        self.groups, slots = [], {}
        compiles = step_options is not None or prefill_options is not None
        entry = _entry(composed)
        cast = copies.cast_weights(composed, packed.device, entry) if compiles else None  # every compiled graph's
        joined = copies.concat_weights(entry) if concat else None    # after cast: it may join cast copies
        # the eager graphs (an eager step, the contexts) read the compiled graphs' copies where there are some
        self.weights = ({} if step_options is not None else cast.copies if cast is not None
                        else copies.autocast_copies(composed, packed.device))
        self._named: dict[int, dict] = {}
        positions_cap = composed.signature["input_ids"].positions
        spans = [((lengths == n).nonzero().flatten(), n, None) for n in lengths.unique().tolist()]
        if len(spans) > 1 and writes is None and not self.contexts.reads_sequence and ragged_ok(composed):
            width = int(lengths.max())
            try:
                decoder_for(composed, B, width + max_new_tokens, 0, ragged=True, reuse=True,
                            pad_rows=step_options is not None)
                spans = [(torch.arange(B, device=packed.device), width, lengths)]   # one decoder, left-padded
            except TraceError:  # an attention the padding cannot be added to: a decoder per length
                _entry(composed)["ragged"] = False
        for rows, length, padded in spans:         # padded: each row's length, or None
            size = (len(rows), cache_length(length + max_new_tokens, positions_cap), padded is not None)
            slots[size] = slots.get(size, -1) + 1                            # side by side: caches of its own
            decoder = decoder_for(composed, len(rows), length + max_new_tokens, slots[size], padded is not None,
                                  reuse=len(spans) == 1, pad_rows=step_options is not None)
            # rows the decoder has past the call's: copies of its first, whose logits nobody reads
            feed = torch.cat([rows, rows[:1].expand(decoder.batch - len(rows))])
            group = tuple(s[feed] if isinstance(s, torch.Tensor) and s.ndim and s.shape[0] == B else s for s in states)
            seq, keep = packed[feed, :length], ()
            if padded is not None:  # each row's prompt ends at slot `length`; no attention reads the slots before it
                slot = torch.arange(length, device=packed.device) - (length - padded[feed])[:, None]
                real = slot >= 0
                seq = packed[feed].gather(1, slot.clamp(min=0)).masked_fill(~real, 0)
                keep = (torch.cat([real, real.new_ones(len(feed), decoder.max_len - length)], 1),)
            ctx = self._run(self.contexts.module, seq, *group)
            # each step's position is a view of this: made on the host every step, it would be a pageable
            # copy, which waits for the device and so stops the host from running ahead of the GPU
            positions = torch.arange(length, length + max_new_tokens, device=packed.device)
            # write_mask, last: the prompt's at prefill; a new token's is 0 (made once: CUDA graphs need a fixed input)
            takes = decoder.takes_writes
            self.groups.append({"rows": rows, "feed": feed, "length": length, "decoder": decoder, "states": group,
                                "seq": seq, "positions": positions,
                                "writes": (writes[feed, :length],) if takes else (),
                                "no_writes": (writes.new_zeros(len(feed), 1),) if takes else (),
                                "keep": keep,
                                "ctx": ctx, "kv": decoder.project(ctx),            # prompt links: once
                                "step": decoder.step if step_options is None else decoder.compiled(step_options, cast,
                                                                                                    concat=joined),
                                "prefill": None if prefill_options is None else decoder.compiled(prefill_options, cast,
                                                                                                 prefill=True)})
        self.batch = B

    def _run(self, graph, *args):
        """An eager graph under autocast runs on `autocast_copies` of the composed model's linear weights, by
        its own names for them (a compiled step holds copies of its own: `Decoder.compiled`)."""
        if not self.weights:
            return graph(*args)
        if id(graph) not in self._named:
            self._named[id(graph)] = copies.by_identity(graph, self.weights)
        return torch.func.functional_call(graph, self._named[id(graph)], args, tie_weights=False)

    def _gather(self, parts):
        """(B, vocab) from each group's (rows, vocab), copied as each comes (a CUDA graph's output lives
        only until the next replay)."""
        logits = None
        for g in self.groups:
            part = parts(g)
            if logits is None:
                logits = part.new_empty(self.batch, part.shape[-1])
            logits[g["rows"]] = part[:len(g["rows"])]
        return logits

    @staticmethod
    def _callable(g: dict, role: str):
        if role == "step":
            return g["step"]
        return g["decoder"].module if g["prefill"] is None else g["prefill"]

    def checked(self, role: str) -> bool:
        """Whether every group's `role` ("prefill" or "step") callable has given the recomputing path's
        logits once (`check.Checked`)."""
        return all(role in g["decoder"].checked.get(self._callable(g, role), ()) for g in self.groups)

    def mark_checked(self, role: str) -> None:
        for g in self.groups:
            g["decoder"].checked.setdefault(self._callable(g, role), set()).add(role)

    def first(self):
        def prefill(g):
            args = (g["seq"], torch.arange(g["length"], device=g["seq"].device), *g["ctx"], *g["kv"], *g["writes"],
                    *g["keep"])
            return (self._run(g["decoder"].module, *args) if g["prefill"] is None else g["prefill"](*args))[:, -1]
        return self._gather(prefill)

    def next(self, token, step):
        def advance(g):
            new = token[g["feed"], None]
            if self.contexts.reads_sequence:      # a shared augment without a cache: rerun over the sequence
                g["seq"] = torch.cat([g["seq"], new], dim=1)
                g["ctx"] = self._run(self.contexts.module, g["seq"], *g["states"])
            position = g["positions"][step:step + 1]
            return self._run(g["step"], new, position, *g["ctx"], *g["kv"], *g["no_writes"], *g["keep"])[:, -1]
        return self._gather(advance)

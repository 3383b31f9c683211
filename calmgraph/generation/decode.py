"""Decode graph: the anchor and its shared augments, each with a static KV cache, their cross-attention
spliced in, for generation.

The fused graph recomputes the whole sequence at every step. For transformers causal LMs, generation
instead runs a second graph, in which each decoded model is traced again with torch.export around a
`StaticCache` (its cache tensors are buffers the graph updates in place; identical blocks share one
trace, `tracing/shared.py`): the prompt is read once (prefill), then each step reads one new token through
every model. Block outputs are found as in the
fused graph, and the links are spliced at them with the composed model's own cross-attention modules
(shared, not copied):

    ctx = contexts.module(input_ids, *states)              # what the links read from outside the graph
    kv = decoder.project(ctx)                              # prompt links' keys and values: once
    logits = decoder.module(new_ids, cache_position, *ctx, *kv)        # (B, new, vocab)
    logits = decoder.module(new_ids, cache_position, *ctx, *kv, write_mask)   # with `writes: masked` links
    logits = decoder.step(token, position, *ctx, *kv[, zeros])  # after prefill: no masked block (`unwritten`)
    logits = decoder.module(..., keep)                     # a ragged decoder: False at padded slots (last)

A link from a shared augment decoded in the graph (`LinkCache`) keeps its source's projected keys and
values for every position so far, writes the new positions' at each step, and attends over them by
position (causal, `window`, `null_kv` and rotary as in the full sequence). A link from a prompt reads
keys and values projected once (`CrossAttention.context_kv`), through an `Attend` module sharing its
block's weights. The shared augments are decoded so only when every one of them is a transformers causal
LM (`decoded_models`); otherwise only the anchor is, and `contexts` (`stage.context_stage`) runs the
shared augments over the whole sequence at each step. A decoder is built for one batch size and cache
length, and its shapes do not change from step to step. Its `cache_position` holds consecutive positions
(the prompt's, then one new position a step). `fuse.py` rewrites the graph so that a step runs fewer ops
(on a GPU, where an eager step is bound by kernel launches, fewer launches): fused RMSNorm, rotary by
`roll`, cache positions read from `cache_position` rather than rebuilt in every layer.

A ragged decoder (`build_decoder(..., ragged=True)`) decodes rows of several prompt lengths together, each
left-padded to end at the same slot: its models must be `shift_invariant` (a row's positions are its slots,
shifted by its padding), and every attention reads `keep` (`pad_masks`, `LinkCache`).
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import logging
import operator
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..blocks import find_blocks
from ..cross_attention import rotate
from ..errors import InternalError, TraceError
from ..families import CACHE_KWARGS, is_transformers
from ..graph import build_order
from ..passes.base import Merged
from ..passes.merge import inline
from ..passes.splice import masked, splice
from ..plan import LINK_KEY, ROOT
from ..signature import WRITE_MASK
from ..tracing.entry import ENTRY
from ..tracing.frontends import exported_module, get_attr
from ..tracing.shared import trace_shared
from ..tracing.taps import block_inputs, block_outputs
from .fuse import (concat_projections, flex_grouped_attention, fuse, grouped_attention, grouped_attention_of,
                   noop_block_mask, scale_past_products, sdpa_gqa)
from .stage import Contexts, links_into

log = logging.getLogger(__name__)   # under "calmgraph"
FUSE = True  # apply fuse.py's rewrites to each decode graph (benchmarks/decode_ops.py measures both)
KEEP = "keep"   # a ragged decoder's last input: (batch, max_len), False at the slots that hold padding
MATH_ATTENTION = True  # compile the step's attention as math (`MathAttention`; benchmarks/step_kernels.py measures both)
# ... and, where MATH_ATTENTION, as torch's flex_attention (`fuse.flex_grouped_attention`): one kernel an attention on a
# GPU where the math is several; off: the step ran 0.82x (batch 1) and 0.85x (batch 8) as fast on an H100, untuned
# (benchmarks/generate_scale.py compiled_flex_attention; docs/generate_scale_history.md, section 12)
FLEX_ATTENTION = False
# the compiled step's RMSNorms scaled past the products that read them (`fuse.scale_past_products`), so that a
# one-row product does not wait for the norm's own kernel. A probe of 16 Llama MLP blocks on an H100, with the
# norm's weight folded into a copy of the product's (this rewrite multiplies the input instead: no copy): 48 ->
# 32 kernels, 0.80x (0.25B-shaped) and 0.96x (1.1B-shaped) the time (decode_kernels_gpu.json,
# `norm_scale_after_product`). Off until a whole step is timed with it (generate_scale.py
# compiled_scale_past_products). A step under autocast keeps its norms (they are not fused to `rms_norm`).
SCALE_PAST_PRODUCTS = False

# A decoder layer's attention over an encoder's states, by its name in transformers (BART's family, Whisper;
# BERT's): not causal, yet a causal LM runs it only when given encoder states, which generate never passes.
CROSS_ATTENTION = ("encoder_attn", "crossattention")


def cache_kwarg(model: nn.Module) -> str | None:
    """The name under which a transformers causal LM takes a KV cache, or None if it is not one. A model with
    a self-attention that says it is not causal (BERT's as an encoder, which reads ahead) takes a cache
    argument too, but no cache decodes it a token at a time; one that says it sits in a decoder (BigBird-Pegasus's,
    whose decoder passes it a causal mask) is causal. (Each trace is checked besides: `check_decodes`.)"""
    if not is_transformers(model) or any(getattr(m, "is_causal", True) is False
                                         and getattr(m, "is_decoder", False) is not True
                                         and name.rpartition(".")[2] not in CROSS_ATTENTION
                                         for name, m in model.named_modules()):
        return None
    params = inspect.signature(model.forward).parameters
    return next((k for k in CACHE_KWARGS if k in params), None)


def cache_shapes(model: nn.Module, kwarg: str, config) -> list[tuple[int, int, int] | None] | None:
    """Per layer, the (heads, key dim, value dim) the model's attention caches, read from a one-token forward
    into a dynamic cache: what the config says is not always that (latent attention's keys and values differ
    in width; Falcon's multi-query attention keeps one head). None where that forward fails."""
    from transformers.cache_utils import DynamicCache
    device = next(p for p in model.parameters() if p.is_floating_point()).device
    try:
        cache = DynamicCache(config=config)
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True, **{kwarg: cache})
    except Exception:  # noqa: BLE001 - the config's shapes, then; tracing says what fails
        return None
    return [(layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1])
            if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.ndim == 4
            and isinstance(getattr(layer, "values", None), torch.Tensor) and layer.values.ndim == 4 else None
            for layer in cache.layers]


class CachedEntry(nn.Module):
    """forward(input_ids, cache_position) -> logits of those positions, reading and updating the cache."""

    def __init__(self, model: nn.Module, batch: int, max_len: int):
        super().__init__()
        from transformers.cache_utils import StaticCache, StaticLayer, StaticSlidingWindowLayer
        from transformers.integrations.executorch import get_head_shapes

        setattr(self, ENTRY, model)
        self.kwarg = cache_kwarg(model)
        config = model.config.get_text_config()
        self.cache = StaticCache(max_cache_len=max_len, config=config)
        for i, layer in enumerate(self.cache.layers):  # sliding windows branch on the position: not traceable
            if isinstance(layer, StaticSlidingWindowLayer):
                self.cache.layers[i] = StaticLayer(max_len)
        weight = next(p for p in model.parameters() if p.is_floating_point())
        shapes = cache_shapes(model, self.kwarg, config)
        if shapes is None:
            self.cache.early_initialization(batch, *get_head_shapes(config), weight.dtype, weight.device)
        for layer, shape in zip(self.cache.layers, shapes or ()):
            if shape is not None and isinstance(layer, StaticLayer):
                heads, k_dim, v_dim = shape
                empty = functools.partial(torch.zeros, dtype=weight.dtype, device=weight.device)
                layer.lazy_initialization(empty(batch, heads, 0, k_dim), empty(batch, heads, 0, v_dim))
        for i, layer in enumerate(self.cache.layers):  # buffers, so that the traced graph owns them
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids, cache_position):
        for layer in self.cache.layers:  # a prefill at position 0 starts the cache afresh
            layer.cumulative_length.copy_(cache_position[0])
        out = self.model(input_ids=input_ids, cache_position=cache_position, use_cache=True,
                         **{self.kwarg: self.cache})
        return out.logits


def alias_on(source: nn.Module, composed: nn.Module, prefix: str) -> nn.Module:
    """A copy of the anchor `source` whose parameters and buffers are the composed model's own (same
    objects: its device, dtype and any later in-place change); what the fused graph never read is moved."""
    target = next(p for p in composed.parameters())
    memo: dict[int, torch.Tensor] = {}
    for kind, tensors in (("parameter", source.named_parameters()), ("buffer", source.named_buffers())):
        for name, t in tensors:
            try:
                memo[id(t)] = getattr(composed, f"get_{kind}")(f"{prefix}.{name}")
            except AttributeError:
                moved = t.detach().to(target.device, target.dtype if t.is_floating_point() else t.dtype)
                memo[id(t)] = nn.Parameter(moved, requires_grad=False) if kind == "parameter" else moved
    return copy.deepcopy(source, memo).eval()


def trace_cached(entry: CachedEntry) -> fx.GraphModule:
    ids = torch.zeros(entry.cache.layers[0].keys.shape[0], 2, dtype=torch.long, device=entry.cache.layers[0].keys.device)
    auto = torch.export.Dim.AUTO
    return exported_module(torch.export.export(entry, (ids, torch.arange(2, device=ids.device)), strict=False,
                                               dynamic_shapes=({1: auto}, {0: auto})))


class Attend(nn.Module):
    """A cross-attention block's attention alone, on keys and values computed once (traced by torch.compile
    under `MathAttention`, through `fuse.grouped_attention`, as `LinkCache`)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, k, v, context_mask=None):
        return self.block.attend(x, k, v, context_mask, _math())


class LinkCache(nn.Module):
    """A link from a decoded shared augment: its source's keys and values, one slot per position.

    forward(x, context, cache_position): x and context hold the same new positions; their keys and values
    (rotated by their positions, with rotary) are written at `cache_position`, then x attends to every
    position written so far (the slots after it hold stale or zero values and are masked). Traced by
    torch.compile under `MathAttention`, it attends through `fuse.grouped_attention` (the cache read in its
    dtype, as the models' attention in that step), not through SDPA's math (the cache cast to fp32)."""

    def __init__(self, block: nn.Module, batch: int, max_len: int):
        super().__init__()
        self.block = block
        weight = block.to_kv.weight
        shape = (batch, block.heads, max_len, weight.shape[0] // 2 // block.heads)
        self.register_buffer("keys", torch.zeros(shape, dtype=weight.dtype, device=weight.device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=weight.dtype, device=weight.device), persistent=False)

    def forward(self, x, context, cache_position, keep=None):
        k, v = self.block.context_kv(context)
        if self.block.rotary:
            k = rotate(k, cache_position)
        self.keys.index_copy_(2, cache_position, k.to(self.keys.dtype))   # autocast's dtype, in the block's
        self.values.index_copy_(2, cache_position, v.to(self.values.dtype))
        return self.block.attend_at(x, self.keys, self.values, cache_position, _math(), keep)


def _math():
    """The attention a link's block reads its keys and values with: `step_attention()` while torch.compile
    traces a step under `MathAttention` (the keys and values read in their dtype), else SDPA."""
    return step_attention() if MATH_ATTENTION and torch.compiler.is_compiling() else None


def step_attention():
    """The compiled step's attention over a cache: `fuse.grouped_attention`, or with FLEX_ATTENTION its
    flex_attention twin."""
    return flex_grouped_attention if FLEX_ATTENTION else grouped_attention


class MathAttention:
    """A compiled decode step (`step`) called with SDPA's math backend alone, so that torch.compile traces its
    attention as math (matmuls and a softmax), not as a fused kernel: at one query a row there is little to
    fuse inside the attention and much around it, which inductor fuses only where it sees the math. On an H200
    (TinyLlama-shaped anchor, shared augment, batch 1), cuDNN's kernel took 16% of a compiled step's GPU time,
    and the step took 14% less without it (benchmarks/results/decode_kernels_gpu.json).

    The backend is chosen when the first call traces the step. It is set around each call, not inside the
    compiled code: there dynamo would record the switch in the graph, which AOTAutograd's cache refuses, so
    that every new process would trace the step again (pytorch/pytorch#194007). torch's compile caches do not
    key on the backend (pytorch/pytorch#185449): a step compiled with another (benchmarks' fused-attention
    variants) compiles with those caches off."""

    def __init__(self, step):
        self.step = step

    def __call__(self, *args):
        with sdpa_kernel(SDPBackend.MATH):
            return self.step(*args)


@dataclass
class Decoder:
    module: fx.GraphModule   # forward(input_ids, cache_position, *contexts, *kv[, write_mask]) -> logits
    batch: int
    max_len: int
    precomputed: list[tuple[str, int]]  # per prompt link: its Attend module's path, the index of its context
    models: tuple[str, ...]             # the models it decodes with a cache: the anchor last
    to_compile: fx.GraphModule          # the step torch.compile gets (`module`, or a variant on its caches)
    step: fx.GraphModule                # the eager step after prefill (`module`, or without what it never writes)
    _compiled: dict = field(default_factory=dict, repr=False)  # "step" / "prefill" -> (options, cast key, compiled)
    ragged: bool = False                # it takes `keep` (last): rows of several prompt lengths, left-padded
    # callable (an eager graph, a compiled step) -> the roles ("prefill", "step") in which it gave the
    # recomputing path's logits (`check.py`)
    checked: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    def compiled(self, options: dict, cast=None, prefill: bool = False, concat=None):
        """`torch.compile(self.to_compile, **options)` under `MathAttention`, made once per decoder: its step's shapes
        are fixed (but for a shared augment recomputed over the growing sequence, which recompiles). With
        `prefill`, `torch.compile(self.module, **options)` instead: the prefill, whose length is the prompt's
        (give `dynamic=True`), and whose attention over many queries is left to SDPA's kernels.

        `cast` (generate under autocast: a `copies.CastWeights`, its `key` and its cast `copies` by the id of
        each weight): what is compiled is a twin holding those copies in place of the weights (its caches and
        other weights shared), so that no step casts them again. `concat` (a step only; generate's
        `concat_projections`: `copies.ConcatWeights`, weights -> one tensor of them concatenated): the step
        compiled is rewritten by `fuse.concat_projections` over those tensors."""
        role = "prefill" if prefill else "step"
        key = (None if cast is None else cast.key, concat is not None and not prefill)
        made = self._compiled.get(role)
        if made is None or made[:2] != (options, key):
            graph = self.module if prefill else self.to_compile
            if cast is not None:
                memo = {id(t): t for t in (*graph.parameters(), *graph.buffers())}
                graph = copy.deepcopy(graph, {**memo, **cast.copies})
            if key[1]:
                graph = _concatenated(graph, concat)
            if not prefill and MATH_ATTENTION and FLEX_ATTENTION:
                # made here, eagerly, where the step's caches are: read by every attention
                noop_block_mask(next(itertools.chain(graph.buffers(), graph.parameters())).device)
            compiled = torch.compile(graph, **options)
            # torch.compile works at the first call: with tuning, minutes at LLM shapes on a GPU, in silence
            log.info("generate: the %s for %d rows and %d cache slots compiles at its first call", role,
                     self.batch, self.max_len)
            if not prefill and MATH_ATTENTION:
                compiled = MathAttention(compiled)
            made = self._compiled[role] = (dict(options), key, compiled)
        return made[2]

    @property
    def takes_writes(self) -> bool:
        """Whether its step takes a write_mask (last): a `writes: masked` link into a decoded model."""
        return any(n.op == "placeholder" and n.target == WRITE_MASK for n in self.module.graph.nodes)

    def with_own_caches(self) -> "Decoder":
        """The same decode graphs with caches of their own (the weights shared): for rows decoded beside
        this decoder's, so that nothing is traced twice."""
        memo = {id(p): p for p in self.module.parameters()}
        module, to_compile, step = copy.deepcopy((self.module, self.to_compile, self.step), memo)  # one memo: caches stay shared
        return Decoder(module, self.batch, self.max_len, self.precomputed, self.models, to_compile, step,
                       ragged=self.ragged)

    def project(self, contexts: tuple) -> list[torch.Tensor]:
        """The keys and values of the prompt links, in the order the decoder takes them."""
        return [t for path, i in self.precomputed
                for t in self.module.get_submodule(path).block.context_kv(contexts[i])]


def source_model(composed, name: str) -> nn.Module | None:
    """The frozen alias of model `name` the composition was traced from (None if it does not keep it)."""
    return composed.traced_model(name)


def decoded_models(composed) -> tuple[str, ...]:
    """The models a decoder runs with a KV cache, in build order: the anchor, and the shared augments when
    every one of them is a transformers causal LM (a model without a cache would be recomputed over the
    whole sequence at each step, and would need every model it reads recomputed with it)."""
    anchor, order = composed.spec.anchor.name, build_order(composed.spec)
    shared = [a.name for a in composed.spec.augments if not a.is_prompt]
    if shared and all(cache_kwarg(source_model(composed, m)) is not None for m in shared):
        return tuple(m for m in order if m in shared or m == anchor)
    return (anchor,)


STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # rotary whose frequencies do not depend on the length


def shift_invariant(model: nn.Module) -> bool:
    """Whether the model's outputs do not change when every position of a row moves by the same amount: a
    rotary model (attention reads only position differences) with no absolute position embedding and static
    frequencies (dynamic and long-rope scaling change them with the length). Rows of several prompt lengths
    then decode in one decoder, each row's prompt ending at the same slot (left-padded)."""
    config = getattr(model, "config", None)
    if config is None or not is_transformers(model):
        return False
    config = config.get_text_config()
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    names = [type(m).__name__ for m in model.modules()]
    absolute = any(n.endswith(("PositionalEmbedding", "PositionEmbedding")) for n in names) or any(
        name.split(".")[-1] in ("wpe", "embed_positions", "position_embeddings") for name, _ in model.named_modules())
    return kind in STATIC_ROPE and any(n.endswith("RotaryEmbedding") for n in names) and not absolute


def padded_mask(mask: torch.Tensor, keep: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """A model's attention mask (True attends; (B or 1, 1, T, L)) that also reads no padded slot (`keep`:
    (B, L), False at padding), but for a query's own slot, so that a padded query attends to something (its
    output is never read; a row that attends to nothing would be NaN)."""
    own = torch.arange(keep.shape[-1], device=keep.device) == cache_position[:, None]      # (T, L)
    return mask & (keep[:, None, None, :] | own)


SOFTMAX = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default, torch.ops.aten._safe_softmax.default)


def pad_masks(graph: fx.Graph, keep: fx.Node, position: fx.Node, max_len: int) -> None:
    """Every attention of the models in `graph` (SDPA, each with a boolean mask) reads `padded_mask`; a
    TraceError where one has none (a model that lets SDPA mask causally by itself, or an additive mask), or
    where a model computes its attention by hand (transformers' eager attention, as Gemma2's softcapping
    needs: a softmax of (batch, heads, queries, cache slots) scores, whose additive mask would still read
    the padding; GPT-OSS's and Flint's take one more, a learned sink per head)."""
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op == "call_function" and node.target in SOFTMAX and isinstance(val, torch.Tensor) \
                and val.ndim == 4 and val.shape[-1] >= max_len:
            raise TraceError(f"{node.name} is an attention computed without SDPA (eager attention): its mask "
                             "cannot take the padding")
    made: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.scaled_dot_product_attention.default:
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        val = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if val is None or val.dtype != torch.bool or node.kwargs.get("is_causal") or len(node.args) > 5:
            raise TraceError(f"{node.name} attends without a boolean mask to add padding to")
        if mask not in made:
            with graph.inserting_after(mask):
                made[mask] = graph.call_function(padded_mask, (mask, keep, position))
            made[mask].meta["val"] = val
        if len(node.args) > 3:
            node.args = (*node.args[:3], made[mask], *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": made[mask]}


def off_by(got: torch.Tensor, want: torch.Tensor, loose: bool) -> float | None:
    """The largest difference of two sets of logits relative to the largest logit, where it is past what
    rounding explains (1e-3; `loose`, for 16-bit floats: 5e-2), else None. NaN is past it; equal values
    (infinities too) differ by 0."""
    got, want = got.float(), want.float()
    finite = want[want.isfinite()]
    error = (torch.where(got == want, 0.0, got - want).abs().max().item()
             / max(finite.abs().max().item() if finite.numel() else 0.0, 1e-6))
    return None if error <= (5e-2 if loose else 1e-3) else error


def check_decodes(gm: fx.GraphModule, model: nn.Module, name: str, batch: int) -> None:
    """A prefill of 2 positions, then a step at position 2, through the traced `gm`, give the model's own
    logits over the 3 tokens. A trace can bake what the model derived from the cache as constants (BERT's
    embeddings slice their positions from the cache's length, traced as 0): its first step then fails or
    reads the wrong positions. The caches' 3 written slots are overwritten by the next prefill."""
    device = next(p for p in model.parameters() if p.is_floating_point()).device
    run = fx.Interpreter(gm).run   # the graph: a shared trace leaves gm's code as traced (`tracing/shared.py`)
    try:
        vocab = model.get_input_embeddings().weight.shape[0]   # ids the model embeds
        ids = (torch.arange(batch * 3, device=device).view(batch, 3) * 7919) % max(vocab - 3, 1) + 3
        with torch.no_grad():
            steps = torch.cat([run(ids[:, :2], torch.arange(2, device=device)),
                               run(ids[:, 2:], torch.tensor([2], device=device))], dim=1)
            full = model(input_ids=ids, use_cache=False).logits
        error = off_by(steps, full, loose=full.element_size() < 4)
        why = None if error is None else f"its logits at positions 0-2 are {error:.2g} (relative) off its own forward's"
    except Exception as e:  # noqa: BLE001 - the reason, in one line
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    if why is not None:
        raise TraceError(f"{name!r} traced with a static KV cache does not decode as it computes ({why}); "
                         "generate(..., cache=False) recomputes instead", model=name)


def _traced(composed, name: str, batch: int, max_len: int) -> tuple[fx.GraphModule, list[fx.Node]]:
    """Model `name` traced around a static cache, with its taps (the nodes of its block outputs or inputs)."""
    source, model_spec = source_model(composed, name), composed.spec.model(name)
    if source is None or cache_kwarg(source) is None:
        raise TraceError(f"model {name!r} ({type(source).__name__}) is not a transformers causal LM, so it "
                         "has no KV cache to generate with; generate(..., cache=False) recomputes instead")
    model = alias_on(source, composed, name)
    blocks = find_blocks(model, model_spec.blocks)
    # traced in the model's dtypes, as the fused graph is: a step run under autocast is autocast op by op
    # (`build_decoder`'s `autocast`), and the trace does not depend on the call that first needs it
    plain = torch.autocast(next(model.parameters()).device.type, enabled=False)
    try:
        with plain:
            entry = CachedEntry(model, batch, max_len)
            state = [{"keys": layer.keys, "values": layer.values, "length": layer.cumulative_length}
                     for layer in entry.cache.layers]
            # identical blocks share one trace, as in the fused graph: each copy reads its own cache layer
            gm = trace_shared(entry, blocks, lambda: trace_cached(entry), state) or trace_cached(entry)
    except Exception as e:  # noqa: BLE001 - the model's own reason, in one line
        raise TraceError(f"could not trace {name!r} with a static KV cache: {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:300]}; generate(..., cache=False) "
                         "recomputes instead", model=name) from None
    with plain:
        check_decodes(gm, model, name, batch)
    outputs = block_outputs(gm.graph, blocks)
    return gm, outputs if model_spec.tap == "output" else block_inputs(gm.graph, blocks, outputs)


def build_decoder(composed, anchor_stage: fx.GraphModule, contexts: Contexts, batch: int, max_len: int,
                  models: tuple[str, ...] | None = None, ragged: bool = False, autocast: bool = False) -> Decoder:
    """The decode graph of `models` (default: the anchor alone) for `batch` rows and `max_len` positions;
    it takes the values `contexts` returns (the anchor stage's nodes it names), then the prompt links' keys
    and values. `ragged`: it also takes `keep` (batch, max_len), False at the slots that hold padding, which
    no attention reads (the models' and the links from decoded models). `autocast`: the step will run under
    autocast, in dtypes other than those traced (`fuse.fuse`'s `traced_dtypes`)."""
    anchor = composed.spec.anchor.name
    models = models or (anchor,)
    graph, root = fx.Graph(), nn.Module()
    root.add_module(ROOT, composed.get_submodule(ROOT))
    ids, position = graph.placeholder("input_ids"), graph.placeholder("cache_position")
    inputs = {name: graph.placeholder(name) for name in contexts.names}
    stage_links = links_into(anchor_stage.graph, set(models))
    reads = dict(zip(contexts.names, contexts.reads))
    fixed = [n for n in stage_links if n.args[1].name in reads and not reads[n.args[1].name]]  # from a prompt
    kv = {n.target: (graph.placeholder(f"k_{i}"), graph.placeholder(f"v_{i}")) for i, n in enumerate(fixed)}
    masked = any(n.meta[LINK_KEY].config.writes == "masked" for n in stage_links)
    writes = graph.placeholder(WRITE_MASK) if masked else None   # of the step's positions
    keep = graph.placeholder(KEEP) if ragged else None
    taps = {}
    for name in models:  # build order: a model's sources are in the graph before it
        gm, model_taps = _traced(composed, name, batch, max_len)
        root.add_module(name, gm)
        env, out = inline(graph, gm.graph, name, (ids, position))
        taps[name] = [env[t] for t in model_taps]
    graph.output(out)  # the anchor's, last
    if ragged:
        pad_masks(graph, keep, position, max_len)

    # a link from outside the decoded models reads what it read in the anchor stage, now a decoder input
    for node in stage_links:
        link = node.meta[LINK_KEY]
        if link.source not in models:
            taps.setdefault(link.source, {})[link.source_layer] = inputs[node.args[1].name]
    merged = Merged(graph, root, taps, {},
                    masks={n.meta[LINK_KEY].source: inputs[n.args[2].name] for n in stage_links if len(n.args) > 2},
                    write_mask=writes)
    splice(merged, [n.meta[LINK_KEY] for n in stage_links], list(models), blocks=root.get_submodule(ROOT))
    attend = _reroute(graph, root, kv, models, batch, max_len, keep)
    if FUSE:
        fuse(graph, root, ids, position, traced_dtypes=not autocast)
    cast_cache_writes(graph, root)   # after fuse: a cast that is a no-op as traced is not under autocast
    keep_live(graph)
    graph.lint()
    module = to_compile = fx.GraphModule(root, graph, class_name="Decoder")
    if FUSE:  # both steps read the KV caches unrepeated, each its own way (fuse.py); same root, so same caches
        module = _rewritten(module, sdpa_gqa)
        if MATH_ATTENTION:
            to_compile = _rewritten(to_compile, functools.partial(grouped_attention_of, attention=step_attention()))
        if SCALE_PAST_PRODUCTS:
            to_compile = _rewritten(to_compile, functools.partial(scale_past_products, root=to_compile))
    step = module
    if writes is not None:  # a new token is never written: the steps run without the masked blocks
        step, to_compile = unwritten(module), unwritten(to_compile)
    names = {name: i for i, name in enumerate(contexts.names)}
    # the graphs run eager read their weights flat; torch.compile gets `to_compile` as the rewrites left it
    module, step = flat_attributes(module), flat_attributes(step)
    return Decoder(module, batch, max_len, [(attend[n.target], names[n.args[1].name]) for n in fixed], tuple(models),
                   to_compile, step, ragged=ragged)


def _graph_copy(module: fx.GraphModule) -> fx.Graph:
    """A copy of `module`'s graph (same targets: a GraphModule over it shares the module's attributes)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    return graph


def _rewritten(decoder: fx.GraphModule, rewrite) -> fx.GraphModule:
    """`decoder` with `rewrite(graph)` applied to a copy of its graph (itself where it rewrote nothing)."""
    graph = _graph_copy(decoder)
    if not rewrite(graph):
        return decoder
    keep_live(graph)
    graph.lint()
    return fx.GraphModule(decoder, graph, class_name="Decoder")


def flat_attributes(decoder: fx.GraphModule) -> fx.GraphModule:
    """A twin of `decoder` (the same tensors and submodules) whose `get_attr` nodes read attributes of the
    root itself. fx's code reads a dotted target one `nn.Module.__getattr__` at a time, a few microseconds a
    weight at each call: an eager step at LLM shapes reads hundreds and is bound by the host. The submodules
    it calls keep their paths (`Decoder.project` finds the links by them)."""
    graph, attributes, flat = _graph_copy(decoder), {}, {}
    for node in graph.nodes:
        if node.op == "call_module":
            attributes[node.target] = decoder.get_submodule(node.target)
        elif node.op == "get_attr":
            value = get_attr(decoder, node.target)
            node.target = flat.setdefault(id(value), f"_attr{len(flat)}")
            attributes[node.target] = value
    graph.lint()
    return fx.GraphModule(attributes, graph, class_name="Decoder")   # fx installs each at its target


def _concatenated(step: fx.GraphModule, concat) -> fx.GraphModule:
    """`step` with `fuse.concat_projections` applied to a copy of its graph, each group's weights read from
    `concat(weights)`, a buffer of the new module (the rest shared)."""
    graph = _graph_copy(step)
    module = fx.GraphModule(step, graph, class_name="Decoder")

    names: list[str] = []

    def buffer(weights):
        names.append(f"concat_projection_{len(names)}")
        module.register_buffer(names[-1], concat(weights), persistent=False)
        return names[-1]
    concat_projections(graph, lambda linear: operator.attrgetter(linear.args[1].target)(module), buffer)
    graph.lint()
    module.recompile()
    return module


def unwritten(decoder: fx.GraphModule) -> fx.GraphModule:
    """The decode graph for steps after prefill, where `write_mask` is 0: each `writes: masked` block adds
    nothing, so it goes, with what only it reads (its link cache; an augment no other link reads, with its
    KV cache writes). It still takes the write_mask, unused, so both graphs are called alike. Same caches."""
    graph = _graph_copy(decoder)
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is masked]:
        for user in list(node.users):   # the residual sum: total + masked delta
            if user.target is not operator.add or user.args[1] is not node:
                raise InternalError(f"a masked block's delta is read by {user.format_node()}, not by its residual sum")
            user.replace_all_uses_with(user.args[0])
            graph.erase_node(user)
    keep_live(graph)
    graph.lint()
    return fx.GraphModule(decoder, graph, class_name="Decoder")


def _written(node: fx.Node) -> fx.Node | None:
    """The node an in-place op writes (its first argument), if `node` is one."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.arguments or not node.args:
        return None
    alias, first = schema.arguments[0].alias_info, node.args[0]
    return first if alias is not None and alias.is_write and isinstance(first, fx.Node) else None


def _writes(node: fx.Node) -> fx.Node | None:
    """The buffer (a get_attr node) an in-place op writes, if `node` is one."""
    written = _written(node)
    return written if written is not None and written.op == "get_attr" else None


def cast_cache_writes(graph: fx.Graph, root: nn.Module) -> None:
    """Each cache write casts what it writes to the cache's dtype. Under autocast a model's keys and values
    come in autocast's dtype while its cache holds the model's (`index_copy_` refuses the mix); a key cast up
    and read back by autocast is the same number. Without autocast the cast is a no-op."""
    for node in list(graph.nodes):
        buffer = _writes(node)
        if buffer is None:
            continue
        dtype = functools.reduce(getattr, buffer.target.split("."), root).dtype   # a buffer, or a lifted constant
        args = list(node.args)
        for i, arg in enumerate(args[1:], 1):
            val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
            if isinstance(val, torch.Tensor) and val.is_floating_point():
                with graph.inserting_before(node):
                    args[i] = graph.call_function(torch.ops.aten.to.dtype, (arg, dtype))
                args[i].meta = dict(arg.meta)
        node.args = tuple(args)


def _written_base(node: fx.Node) -> fx.Node | None:
    """What an in-place op writes, through any views of it (a slice of a fresh tensor, of a cache buffer), if
    `node` is one: the node those views were taken of."""
    base = _written(node)
    while base is not None and base.op == "call_function" and base.args and isinstance(base.args[0], fx.Node):
        view = getattr(base.target, "_schema", None)   # a view returns an alias of its first argument
        if view is None or not view.returns or view.returns[0].alias_info is None \
                or view.returns[0].alias_info.is_write:
            break
        base = base.args[0]
    return base


def keep_live(graph: fx.Graph) -> None:
    """Dead-code elimination that sees writes: a node stays if the output needs it, and an in-place write
    stays while something that stays reads what it writes (a cache; a fresh tensor filled through slices, as
    latent attention assembles its keys). So an augment's head goes, and so do the layers after its last
    tapped block, cache writes included."""
    writers: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if (base := _written_base(node)) is not None:
            writers.setdefault(base, []).append(node)
    live, todo = set(), [next(n for n in graph.nodes if n.op == "output")]
    while todo:
        node = todo.pop()
        if node not in live:
            live.add(node)
            todo.extend(node.all_input_nodes)
            todo.extend(writers.get(node, ()))
    for node in reversed(graph.nodes):
        if node not in live and node.op != "placeholder":
            graph.erase_node(node)


def _reroute(graph: fx.Graph, root: nn.Module, kv: dict, models, batch: int, max_len: int,
             keep: fx.Node | None = None) -> dict[str, str]:
    """Prompt links attend to their keys and values (tap, context, mask -> tap, k, v, mask); links from a
    decoded model read their `LinkCache` (tap, context -> tap, context, cache_position[, keep]). Returns the
    prompt links' Attend paths."""
    position = next(n for n in graph.nodes if n.op == "placeholder" and n.target == "cache_position")
    root.add_module("attend", nn.Module())
    root.add_module("link_cache", nn.Module())
    attend = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or LINK_KEY not in node.meta:
            continue
        name = node.target.removeprefix(ROOT + ".").replace(".", "_")
        block = root.get_submodule(node.target)
        if node.target in kv:
            root.attend.add_module(name, Attend(block))
            attend[node.target] = f"attend.{name}"
            node.target, node.args = attend[node.target], (node.args[0], *kv[node.target], *node.args[2:])
        elif node.meta[LINK_KEY].source in models:
            root.link_cache.add_module(name, LinkCache(block, batch, max_len))
            node.target, node.args = f"link_cache.{name}", (*node.args[:2], position, *([keep] if keep else []))
    return attend

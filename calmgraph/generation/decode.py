"""Decode graph: the anchor with a static KV cache and its cross-attention spliced in, for generation.

The fused graph recomputes the whole sequence at every step. For a transformers anchor, generation
instead runs a second graph, traced with torch.export from the anchor wrapped around a `StaticCache`
(the cache tensors are buffers the graph updates in place): the prompt is read once (prefill), then each
step reads one new token. Its block outputs are found as in the fused graph, and the anchor's links are
spliced at them with the composed model's own cross-attention modules (shared, not copied):

    ctx = contexts.module(input_ids, *states)              # what the anchor's cross-attention reads
    kv = decoder.project(ctx)                              # prompt links' keys and values: once
    logits = decoder.module(new_ids, cache_position, *ctx, *kv)        # (B, new, vocab)

`contexts` (`stage.context_stage`) is the anchor stage less the anchor: the prompt states passed through, and the shared augments
run over the sequence so far (a shared augment is recomputed each step; only the anchor is cached). A
link from a prompt reads keys and values projected once (`CrossAttention.context_kv`), through an
`Attend` module sharing its block's weights. A decoder is built for one batch size and cache length.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..blocks import find_blocks
from ..errors import TraceError
from ..families import CACHE_KWARGS, is_transformers
from ..passes.base import Merged
from ..passes.merge import inline
from ..passes.splice import splice
from ..plan import LINK_KEY, ROOT
from ..tracing.entry import ENTRY
from ..tracing.taps import block_inputs, block_outputs
from .stage import Contexts, anchor_links

def cache_kwarg(model: nn.Module) -> str | None:
    """The name under which a transformers causal LM takes a KV cache, or None if it is not one."""
    if not is_transformers(model):
        return None
    params = inspect.signature(model.forward).parameters
    return next((k for k in CACHE_KWARGS if k in params), None)


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
        self.cache.early_initialization(batch, *get_head_shapes(config), weight.dtype, weight.device)
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
    program = torch.export.export(entry, (ids, torch.arange(2, device=ids.device)), strict=False,
                                  dynamic_shapes=({1: auto}, {0: auto}))
    gm = program.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    return gm


class Attend(nn.Module):
    """A cross-attention block's attention alone, on keys and values computed once."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x, k, v, context_mask=None):
        return self.block.attend(x, k, v, context_mask)


@dataclass
class Decoder:
    module: fx.GraphModule   # forward(input_ids, cache_position, *contexts, *kv) -> logits
    batch: int
    max_len: int
    precomputed: list[tuple[str, int]]  # per prompt link: its Attend module's path, the index of its context
    _compiled: tuple | None = field(default=None, repr=False)           # (options, compiled module)

    def compiled(self, options: dict):
        """`torch.compile(self.module, **options)`, made once (the decode step: fixed shapes but for a shared
        augment's growing context, which recompiles)."""
        if self._compiled is None or self._compiled[0] != options:
            self._compiled = (dict(options), torch.compile(self.module, **options))
        return self._compiled[1]

    def project(self, contexts: tuple) -> list[torch.Tensor]:
        """The keys and values of the prompt links, in the order the decoder takes them."""
        return [t for path, i in self.precomputed
                for t in self.module.get_submodule(path).block.context_kv(contexts[i])]


def build_decoder(composed, anchor_stage: fx.GraphModule, contexts: Contexts, batch: int, max_len: int) -> Decoder:
    """The anchor's decode graph for `batch` rows and `max_len` positions; it takes the values `contexts`
    returns (the anchor stage's nodes it names), then the prompt links' keys and values."""
    spec = composed.spec
    anchor = spec.anchor.name
    source = composed.anchor_model
    if source is None or cache_kwarg(source) is None:
        raise TraceError(f"anchor {anchor!r} ({type(source).__name__}) is not a transformers causal LM, so it "
                         "has no KV cache to generate with; generate(..., cache=False) recomputes instead")
    model = alias_on(source, composed, anchor)
    blocks = find_blocks(model, spec.anchor.blocks)
    entry = CachedEntry(model, batch, max_len)
    try:
        gm = trace_cached(entry)
    except Exception as e:  # noqa: BLE001 - the model's own reason, in one line
        raise TraceError(f"could not trace anchor {anchor!r} with a static KV cache: {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:300]}; generate(..., cache=False) "
                         "recomputes instead") from None
    outputs = block_outputs(gm.graph, blocks)
    taps = outputs if spec.anchor.tap == "output" else block_inputs(gm.graph, blocks, outputs)

    graph, root = fx.Graph(), nn.Module()
    root.add_module(anchor, gm)
    root.add_module(ROOT, composed.get_submodule(ROOT))
    ids, position = graph.placeholder("input_ids"), graph.placeholder("cache_position")
    inputs = {name: graph.placeholder(name) for name in contexts.names}
    stage_links = anchor_links(anchor_stage.graph, anchor)
    reads = dict(zip(contexts.names, contexts.reads))
    fixed = [n for n in stage_links if not reads[n.args[1].name]]          # links from a prompt
    kv = {n.target: (graph.placeholder(f"k_{i}"), graph.placeholder(f"v_{i}")) for i, n in enumerate(fixed)}
    env, out = inline(graph, gm.graph, anchor, (ids, position))
    graph.output(out)

    # the anchor's links read what they read in the anchor stage, now the decoder's inputs
    sources = {}
    for node in stage_links:
        link = node.meta[LINK_KEY]
        sources.setdefault(link.source, {})[link.source_layer] = inputs[node.args[1].name]
    merged = Merged(graph, root, {anchor: [env[t] for t in taps], **sources}, {},
                    masks={n.meta[LINK_KEY].source: inputs[n.args[2].name] for n in stage_links if len(n.args) > 2})
    splice(merged, [n.meta[LINK_KEY] for n in stage_links], [anchor], blocks=root.get_submodule(ROOT))
    root.add_module("attend", nn.Module())
    attend = {}
    for node in graph.nodes:  # a prompt link attends to its keys and values (tap, context, mask -> tap, k, v, mask)
        if node.op == "call_module" and node.target in kv:
            name = node.target.removeprefix(ROOT + ".").replace(".", "_")
            root.attend.add_module(name, Attend(root.get_submodule(node.target)))
            attend[node.target] = f"attend.{name}"
            node.target, node.args = attend[node.target], (node.args[0], *kv[node.target], *node.args[2:])
    graph.lint()
    module = fx.GraphModule(root, graph, class_name="AnchorDecoder")
    names = {name: i for i, name in enumerate(contexts.names)}
    return Decoder(module, batch, max_len, [(attend[n.target], names[n.args[1].name]) for n in fixed])

"""`compile`: spec + models -> one fused torch.fx GraphModule. Each stage is a pass in `passes/`."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch.fx as fx
import torch.nn as nn

from .blocks import find_blocks
from .composed import ComposedModel
from .errors import LayerRefError, Problem
from .blocks import BlockListError
from .graph import build_order
from .passes.gather import find_all_blocks, gather, unchanged
from .passes.merge import merge
from .passes.outline import outline_blocks
from .passes.prune import prune as prune_pass
from .passes.resolve import resolve
from .passes.splice import splice
from .passes.trace import model_device, trace_model
from .passes.verify import verify
from .sources import load_models
from .spec import CompositionSpec, load_spec


def compile(spec: CompositionSpec | str | Path | dict, models: dict[str, nn.Module] | None = None, *,
            prune: bool = True) -> ComposedModel:
    """Compile a composition. The models are not modified; see the README for what this means for
    `requires_grad`. Every problem with the spec or the models is raised before anything is built."""
    started = time.perf_counter()
    models = load_models(spec, models)                              # given, or built from `source:`
    spec = load_spec(spec)
    models = gather(spec, models)                                   # names, types, one device
    with unchanged(models):                                         # a forward that writes a weight: refused
        composed = _build(spec, models, prune)
    composed.compile_seconds = time.perf_counter() - started
    return composed


def _build(spec: CompositionSpec, models: dict[str, nn.Module], prune: bool) -> ComposedModel:
    blocks = find_all_blocks(spec, models)                          # every model's block list
    traced = {m.name: trace_model(m.name, models[m.name], blocks[m.name], tap=m.tap,
                                  prompt=getattr(m, "input", "shared") == "prompt",
                                  prompt_input=getattr(m, "prompt_input", "input_ids")) for m in spec.models}
    links = resolve(spec, traced)                                   # layer refs -> (source, target) blocks
    order = build_order(spec)                                       # sources before targets, anchor last
    merged = merge(spec, traced, order)                             # one graph, namespaced per model
    splice(merged, links, order)                                    # cross-attention nodes
    owner = fx.GraphModule(merged.root, merged.graph)
    augments = [a.name for a in spec.augments]
    pruned = prune_pass(owner.graph, {a: merged.taps[a] for a in augments},
                        {a: merged.outputs[a] for a in augments}, enabled=prune)
    owner = outline_blocks(owner, blocks).module                    # each block: one submodule, called once
    # a link whose block feeds nothing the anchor reads was pruned with its block (GraphModule keeps only
    # the modules its graph calls): list only the live ones
    live = {n.target for n in owner.graph.nodes if n.op == "call_module"}
    links = [link for link in links if ".".join(("xattn", *link.module_path)) in live]
    composed = ComposedModel(owner, owner.graph, spec=spec, links=links, pruned=pruned,
                             frontends={n: t.frontend for n, t in traced.items()}, input_names=merged.input_names)
    anchor_out = merged.outputs[spec.anchor.name].meta["val"].shape
    prompts = [traced[a.name].example for a in spec.augments if a.input == "prompt"]
    verify(composed, prompts, model_device(models[spec.anchor.name]), anchor_out)
    composed.taps = {n: _tap_points(t) for n, t in traced.items()}  # what `inspect` lists and draws
    composed._anchor_model = (traced[spec.anchor.name].module,)  # generation's KV-cache trace starts here
    return composed


@dataclass(frozen=True)
class TapPoint:
    index: int
    name: str    # qualified module name of the block
    dim: int     # hidden size of what the block reads/writes
    runs: int = 1  # times the block runs in one forward; a block that runs more (looped) cannot be tapped


def tap_points(model: nn.Module, blocks: str | None = None, *, tap: str = "output",
               prompt: bool = False, prompt_input: str = "input_ids") -> list[TapPoint]:
    """The blocks of `model` an edge can tap, in order, with their hidden sizes (from tracing)."""
    try:
        found = find_blocks(model, blocks)
    except BlockListError as e:
        raise LayerRefError([Problem("blocks", str(e))]) from None
    return _tap_points(trace_model(type(model).__name__, model, found, prompt=prompt, tap=tap,
                                   prompt_input=prompt_input))


def _tap_points(traced) -> list[TapPoint]:
    return [TapPoint(b.index, b.name, int(n.meta["val"].shape[-1]), r)
            for b, n, r in zip(traced.blocks, traced.taps, traced.runs)]

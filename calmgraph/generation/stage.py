"""Stage split: the fused graph -> an augment stage and an anchor stage, both torch.fx GraphModules.

Prompt augments read only their own inputs, so during generation their states are the same at every step.
The augment stage holds every prompt model (its inputs, blocks, and any cross-attention into it) up to
the states the rest of the graph reads; the anchor stage holds everything else and takes those states
as inputs:

    states = stages.augment(<aug>_input_ids=..., <aug>_mask=...)     # tuple, once per prompt
    logits = stages.anchor(input_ids, *states)                        # == composed(input_ids, ...)

(`write_mask`, where the composition takes one, is the anchor stage's second input.)

A node's side comes from `node.meta["calmgraph_model"]`, from the target of the link a spliced node
carries (`calmgraph_link`), or, for the input checks merge adds, from its inputs. Both stages share the
composed model's submodules (weights, buffers), so training or `.to()` on it is seen by the stages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from ..errors import InternalError, TraceError
from ..plan import LINK_KEY, MODEL_KEY
from ..signature import WRITE_MASK

SEQUENCE = ("input_ids", WRITE_MASK)  # the anchor stage's own inputs


@dataclass
class Stages:
    augment: fx.GraphModule   # forward(<aug>_input_ids..., <aug>_mask=None...) -> tuple of states
    anchor: fx.GraphModule    # forward(input_ids, [write_mask,] *states) -> anchor logits
    states: list[str]         # names of the values passed from one stage to the other, in order


def _augment_side(graph: fx.Graph, prompts: set[str]) -> set[fx.Node]:
    side: set[fx.Node] = set()
    for node in graph.nodes:
        link = node.meta.get(LINK_KEY)
        if node.op == "placeholder":
            owned = node.name not in SEQUENCE              # `<aug>_input_ids`, `<aug>_mask`
        elif node.op == "output":
            owned = False
        elif node.meta.get(MODEL_KEY) is not None:
            owned = node.meta[MODEL_KEY] in prompts
        elif link is not None:
            owned = link.target in prompts
        else:                                              # merge's input checks: follow their inputs
            owned = bool(node.all_input_nodes) and all(a in side for a in node.all_input_nodes)
        if owned:
            side.add(node)
    return side


def _module_over(composed: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A GraphModule whose children ARE the composed model's children (no attribute is copied)."""
    gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name=class_name)
    for name, child in composed.named_children():
        gm.add_module(name, child)
    gm.graph = graph
    graph.lint()
    return gm


def split_stages(composed: fx.GraphModule, prompts: list[str]) -> Stages:
    """Split `composed` (fused graph) for the prompt augments named in `prompts`."""
    graph = composed.graph
    side = _augment_side(graph, set(prompts))
    for node in side:
        leaked = [a.name for a in node.all_input_nodes if a not in side]
        if leaked:  # the spec forbids shared -> prompt edges, so this is a calmgraph bug
            raise InternalError(f"cannot split the fused graph: prompt-side node {node.name!r} reads "
                                 f"{leaked} from the anchor side")
    boundary = [n for n in graph.nodes if n in side and any(u not in side for u in n.users)]

    augment, env = fx.Graph(), {}
    for node in graph.nodes:
        if node in side:
            env[node] = augment.node_copy(node, env.__getitem__)
    augment.output(tuple(env[n] for n in boundary))

    anchor, env = fx.Graph(), {}
    main = [n for n in graph.nodes if n.op == "placeholder" and n not in side]   # input_ids, write_mask
    for node in main:
        env[node] = anchor.node_copy(node)
    for node in boundary:
        env[node] = anchor.placeholder(node.name)
        env[node].meta = {k: node.meta[k] for k in ("val", "tensor_meta") if k in node.meta}
    for node in graph.nodes:
        if node not in side and node not in main:
            env[node] = anchor.node_copy(node, env.__getitem__)

    return Stages(_module_over(composed, augment, "AugmentStage"), _module_over(composed, anchor, "AnchorStage"),
                  [n.name for n in boundary])


def anchor_links(graph: fx.Graph, anchor: str) -> list[fx.Node]:
    """The cross-attention nodes into the anchor, in graph order."""
    return links_into(graph, {anchor})


def links_into(graph: fx.Graph, targets: set[str]) -> list[fx.Node]:
    """The cross-attention nodes into any of `targets`, in graph order."""
    return [n for n in graph.nodes if n.op == "call_module" and getattr(n.meta.get(LINK_KEY), "target", None) in targets]


def made_by(node: fx.Node, models: set[str]) -> bool:
    """Whether `node` is computed by one of `models` (a node of it, or a link spliced into it)."""
    return node.meta.get(MODEL_KEY) in models or getattr(node.meta.get(LINK_KEY), "target", None) in models


@dataclass
class Contexts:
    module: fx.GraphModule   # forward(input_ids, *states) -> tuple: what the decoded models' links read from outside
    names: list[str]         # the anchor stage's nodes it returns, in order
    reads: list[bool]        # per context: whether it reads the sequence (a shared augment's) or not (a prompt's)

    @property
    def reads_sequence(self) -> bool:
        """False when they are prompt states only: the same at every step."""
        return any(self.reads)


def context_stage(anchor_stage: fx.GraphModule, decoded: set[str]) -> Contexts:
    """What the links into the `decoded` models (the anchor, and the shared augments decoded with it) read
    from outside them: the prompt states, passed through, and any other shared augment, run over the
    sequence; with the anchor stage's own inputs."""
    graph = anchor_stage.graph
    wanted = list(dict.fromkeys(a for n in links_into(graph, decoded) for a in n.args[1:] if not made_by(a, decoded)))
    ids = next(n for n in graph.nodes if n.op == "placeholder")
    reads, needed = [], set()
    for value in wanted:
        ancestors, todo = set(), [value]
        while todo:
            node = todo.pop()
            if node not in ancestors:
                ancestors.add(node)
                todo.extend(node.all_input_nodes)
        reads.append(ids in ancestors)
        needed |= ancestors
    if any(n.op == "placeholder" and n.name == WRITE_MASK for n in needed):
        raise TraceError("a shared augment recomputed at each step is the target of a writes: masked link, and "
                         "the step's contexts take no write_mask; generate(..., cache=False) recomputes instead")
    stage, env = fx.Graph(), {}
    for node in graph.nodes:
        if node.op == "placeholder" and node.name != WRITE_MASK or node in needed:
            env[node] = stage.node_copy(node, env.__getitem__)
    stage.output(tuple(env[n] for n in wanted))
    return Contexts(_module_over(anchor_stage, stage, "ContextStage"), [n.name for n in wanted], reads)

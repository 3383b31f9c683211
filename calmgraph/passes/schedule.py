"""Pass, schedule: each augment runs as late as the links reading it allow, between the anchor's blocks.

Merged, the fused graph runs every augment first, then the anchor. Eagerly on a GPU that order leaves the
GPU idle while a small augment's kernels are launched one by one (it is bound by the host) and only then
queues the anchor's larger ones. Run just before the first link that reads it, an augment's launches go
out while the anchor blocks already queued keep the GPU busy: the overlap that running the models one
after the other (anchor first) gets for free.

Each model's own nodes keep their relative order (an fx graph from the fx front end may hold in-place ops
whose order matters without a data edge saying so); only where the models interleave changes.
"""
from __future__ import annotations

import torch.fx as fx

from ..plan import LINK_KEY, MODEL_KEY
from .base import CompileState, Pass, PassResult


def _owner(node: fx.Node) -> str | None:
    """The model a node computes for: its own, or for a cross-attention node the model it writes into."""
    model = node.meta.get(MODEL_KEY)
    return model if model is not None else getattr(node.meta.get(LINK_KEY), "target", None)


def late_order(graph: fx.Graph, augments: set[str]) -> list[fx.Node]:
    """The graph's nodes, anchor-side nodes in their order, each augment's nodes (in theirs) pulled in only
    when a later node needs them; what nothing needs goes just before the output."""
    queues: dict[str, list[fx.Node]] = {name: [] for name in augments}
    for node in graph.nodes:
        if _owner(node) in queues:
            queues[_owner(node)].append(node)
    head = dict.fromkeys(queues, 0)           # per augment: its first node not yet placed
    order: list[fx.Node] = []
    placed: set[fx.Node] = set()

    def place(node: fx.Node) -> None:
        stack = [node]
        while stack:                          # each push is a node earlier in the graph: it ends
            n = stack[-1]
            if n in placed:
                stack.pop()
                continue
            owner = _owner(n)
            if owner in queues and queues[owner][head[owner]] is not n:
                stack.append(queues[owner][head[owner]])   # its model's earlier nodes first
                continue
            waiting = [a for a in n.all_input_nodes if a not in placed]
            if waiting:
                stack.extend(reversed(waiting))
                continue
            stack.pop()
            placed.add(n)
            order.append(n)
            if owner in queues:
                head[owner] += 1

    for node in graph.nodes:                  # the inputs first, in their order: they are the signature
        if node.op == "placeholder":
            place(node)
    for node in graph.nodes:
        if node.op == "output":
            for name, queue in queues.items():
                for n in queue[head[name]:]:
                    place(n)
        if _owner(node) not in queues:
            place(node)
    return order


def schedule(graph: fx.Graph, augments: set[str]) -> int:
    """Reorders `graph` in place (`late_order`); returns how many nodes changed position."""
    before = list(graph.nodes)
    order = late_order(graph, augments)
    output = before[-1]
    for node in order[:-1]:
        output.prepend(node)
    return sum(a is not b for a, b in zip(before, order))


class Schedule(Pass):
    """Augments interleaved with the anchor: each runs just before the first link that reads it."""

    requires = ("module", "pruned")
    ensures = ("scheduled",)

    def call(self, state: CompileState) -> PassResult:
        moved = schedule(state.module.graph, {a.name for a in state.spec.augments})
        state.module.graph.lint()
        state.module.recompile()
        state.scheduled = True
        return PassResult(state, moved > 0)

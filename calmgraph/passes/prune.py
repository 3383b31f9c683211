"""Pass 5, prune: remove what no edge reads (augment blocks past the deepest tap, augment heads).

The fused graph returns only the anchor's output, so an augment's later blocks and head are dead code.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from ..plan import LINK_KEY, MODEL_KEY, Link
from .base import CompileState, Pass, PassResult, PruneReport, flat_module


# fx's dead-code elimination keeps nodes it cannot prove pure: torch.export's runtime checks (dtype, device,
# shape asserts) and "random" ops such as attention (dropout_p is 0: the models were traced in eval mode).
# Kept, they would keep every block they touch alive.
_CHECKS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
           torch.ops.aten.sym_constrain_range_for_size.default}


def _is_impure(node: fx.Node) -> bool:
    if node.op == "call_method":   # fx calls no method impure; an in-place one (`scale.mul_(2)`) writes what
        return node.target.endswith("_") and not node.target.startswith("_")   # a later node may read
    return node.target not in _CHECKS and node.is_impure(impure_random=False)


def _count(graph: fx.Graph) -> Counter:
    return Counter(n.meta.get(MODEL_KEY) for n in graph.nodes if n.meta.get(MODEL_KEY))


def prune(graph: fx.Graph, augment_taps: dict[str, list[fx.Node]], augment_outputs: dict[str, fx.Node],
          enabled: bool = True) -> PruneReport:
    before = _count(graph)
    if enabled:
        graph.eliminate_dead_code(is_impure_node=_is_impure)
    after = _count(graph)
    alive = set(graph.nodes)
    kept = {name: max((i + 1 for i, n in enumerate(taps) if n in alive and n.users), default=0)
            for name, taps in augment_taps.items()}
    return PruneReport(dict(before), dict(after), kept, {k: len(v) for k, v in augment_taps.items()},
                       {name: out not in alive for name, out in augment_outputs.items()})


def live_links(graph: fx.Graph, links: list[Link]) -> list[Link]:
    """The links whose block the graph still calls: a block feeding only pruned computation went with it."""
    called = {n.meta[LINK_KEY] for n in graph.nodes if n.op == "call_module" and LINK_KEY in n.meta}
    return [link for link in links if link in called]


class Prune(Pass):
    """Dead code out (augment blocks past the deepest tap, augment heads); `state.links` keeps the live ones."""

    requires = ("module", "merged", "links")
    ensures = ("pruned",)

    def call(self, state: CompileState) -> PassResult:
        graph, merged = state.module.graph, state.merged
        augments = [a.name for a in state.spec.augments]
        state.pruned = prune(graph, {a: merged.taps[a] for a in augments}, {a: merged.outputs[a] for a in augments},
                             enabled=state.prune)
        state.links = live_links(graph, state.links)
        # the GraphModule keeps only the modules its graph still calls
        state.module = flat_module(state.module, graph)
        return PassResult(state, state.pruned.nodes_removed > 0)

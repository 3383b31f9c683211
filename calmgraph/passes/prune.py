"""Pass 5, prune: remove what no edge reads (augment blocks past the deepest tap, augment heads).

The fused graph returns only the anchor's output, so an augment's later blocks and head are dead code.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from .merge import MODEL_KEY


@dataclass(frozen=True)
class PruneReport:
    nodes_before: dict[str, int]
    nodes_after: dict[str, int]
    blocks_kept: dict[str, int]      # per augment: blocks still computed
    blocks_total: dict[str, int]
    head_removed: dict[str, bool]    # per augment: its output (LM head) no longer computed

    @property
    def nodes_removed(self) -> int:
        return sum(self.nodes_before.values()) - sum(self.nodes_after.values())


# fx's dead-code elimination keeps nodes it cannot prove pure: torch.export's runtime checks (dtype, device,
# shape asserts) and "random" ops such as attention (dropout_p is 0: the models were traced in eval mode).
# Kept, they would keep every block they touch alive.
_CHECKS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
           torch.ops.aten.sym_constrain_range_for_size.default}


def _is_impure(node: fx.Node) -> bool:
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

"""The plan of a composition: one `Link` per cross-attention block, resolved from the spec's edges.

A frozen value, apart from building and running it (as mergekit keeps its plan apart from executing it):
`resolve` makes the links, `splice` builds a block for each, `prune` says which survive, and generation
and inspection read them back from `composed.links` and from the `LINK_KEY` of the nodes they made.
"""
from __future__ import annotations

from dataclasses import dataclass

from .spec import CrossAttentionSpec

ROOT = "xattn"                   # every new module lives under it: composed.xattn.<source>_to_<target>.l<i>_to_l<j>
MODEL_KEY = "calmgraph_model"    # node.meta key: the model a node of the fused graph came from
LINK_KEY = "calmgraph_link"      # node.meta key: the link a spliced node computes


@dataclass(frozen=True)
class Link:
    """One cross-attention block: target block `target_layer` attends to source block `source_layer`."""

    edge: int                  # index into spec.edges
    source: str
    target: str
    source_layer: int
    target_layer: int
    source_dim: int
    target_dim: int
    heads: int
    dim_head: int
    config: CrossAttentionSpec
    causal: bool               # shared source: position t sees source positions <= t

    @property
    def module_path(self) -> tuple[str, str]:
        return f"{self.source}_to_{self.target}", f"l{self.source_layer}_to_l{self.target_layer}"

    @property
    def qualified_name(self) -> str:
        """Where its block lives in the composed model: `xattn.<source>_to_<target>.l<i>_to_l<j>`."""
        return ".".join((ROOT, *self.module_path))

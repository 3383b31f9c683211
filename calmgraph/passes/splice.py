"""Pass 4, splice: a cross-attention node for every link, its delta added to the target's tap.

All links into one tap read the tap's original value and their deltas are summed (order-free):
    h' = h + xattn_1(h, ctx_1) + xattn_2(h, ctx_2)
A block with `writes: masked` adds its delta only where the call's `write_mask` is 1 (`masked`).
Every later use of h then reads h'. Targets are spliced in build order, so a model that is both a target
and a source (augment -> augment -> anchor) passes on its composed states.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from functools import partial

import torch
import torch.nn as nn

from ..cross_attention import CrossAttention
from ..errors import InternalError
from ..plan import LINK_KEY, ROOT, Link
from .base import CompileState, Merged, Pass, PassResult, flat_module


INITIAL = "calmgraph_initial"  # attribute of a block built on the meta device: () -> its initial values


def build_block(link: Link, like) -> CrossAttention:
    """A cross-attention block on the device and in the floating dtype of the target's states `like`.

    Its initial values are drawn on the CPU from a seed of its own, the one draw it takes from the global
    RNG: so on the meta device (a composition compiled without weights, to be sharded and loaded rank by
    rank: `parallel.load_sharded`) the block is built on meta at no cost, and keeps under INITIAL how to
    draw the very values a compile on real weights gives it, when they are loaded."""
    seed = int(torch.randint(0, 2**62, (), device="cpu"))
    if like.device.type == "meta":
        block = _drawn(link, seed, "meta")
        setattr(block, INITIAL, partial(_initial_values, link, seed, like.dtype))
        return block.to(dtype=like.dtype)
    return _drawn(link, seed, "cpu").to(device=like.device, dtype=like.dtype)


def _drawn(link: Link, seed: int, device: str) -> CrossAttention:
    c = link.config
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        return CrossAttention(link.target_dim, link.source_dim, heads=link.heads, dim_head=link.dim_head,
                              norm=c.norm, gate=c.gate, project_context=c.project_context, causal=link.causal,
                              rotary=c.positions == "rotary", window=c.window, null_kv=c.null_kv)


def _initial_values(link: Link, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return _drawn(link, seed, "cpu").to(dtype=dtype).state_dict()


def masked(delta: torch.Tensor, write_mask: torch.Tensor) -> torch.Tensor:
    """A block's delta (B, T, dim) where write_mask (B, T) is 1, zero where it is 0."""
    return delta * write_mask[..., None].to(delta.dtype)


def splice(merged: Merged, links: list[Link], order: list[str], blocks: nn.Module | None = None
           ) -> dict[str, CrossAttention]:
    """Adds the blocks under `merged.root.xattn` and rewires the graph. Returns {module path: block}.
    With `blocks` (an existing `xattn`, e.g. the composed model's for its decode graph) they are reused."""
    graph, root = merged.graph, merged.root
    if blocks is None:
        root.add_module(ROOT, nn.ModuleDict())
    into: dict[tuple[str, int], list[Link]] = defaultdict(list)
    for link in links:
        into[link.target, link.target_layer].append(link)
    added = {}
    for target in order:
        for (name, layer), group in sorted(into.items(), key=lambda kv: kv[0][1]):
            if name != target:
                continue
            tap = merged.taps[target][layer]
            created, last, total = set(), tap, tap
            for link in group:
                edge_key, pair_key = link.module_path
                edges = root.get_submodule(ROOT)
                if blocks is not None:
                    block = edges.get_submodule(f"{edge_key}.{pair_key}")
                else:
                    if edge_key not in edges:
                        edges[edge_key] = nn.ModuleDict()
                    block = edges[edge_key][pair_key] = build_block(link, tap.meta["val"])
                path = f"{ROOT}.{edge_key}.{pair_key}"
                added[path] = block
                context = merged.taps[link.source][link.source_layer]
                args = (tap, context, merged.masks[link.source]) if link.source in merged.masks else (tap, context)
                with graph.inserting_after(last):
                    delta = graph.call_module(path, args)
                added_delta = delta
                if link.config.writes == "masked":
                    if merged.write_mask is None:
                        raise InternalError(f"{path} writes where write_mask says, but this graph has no write_mask")
                    with graph.inserting_after(delta):
                        added_delta = graph.call_function(masked, (delta, merged.write_mask))
                with graph.inserting_after(added_delta):
                    total = graph.call_function(operator.add, (total, added_delta))
                for node in {delta, added_delta, total}:
                    node.meta = {LINK_KEY: link, **{k: tap.meta[k] for k in ("val",) if k in tap.meta}}
                    created.add(node)
                last = total
            tap.replace_all_uses_with(total, delete_user_cb=lambda user: user not in created)
            merged.taps[target][layer] = total
    graph.lint()
    return added


class Splice(Pass):
    """A cross-attention node for every link; the fused graph becomes a module (`state.module`)."""

    requires = ("merged", "links", "order")
    ensures = ("module",)

    def call(self, state: CompileState) -> PassResult:
        splice(state.merged, state.links, state.order)
        state.module = flat_module(state.merged.root, state.merged.graph)
        return PassResult(state, bool(state.links))

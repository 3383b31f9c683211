"""Taps: where each block's hidden states are in a traced graph, how often each block runs, and whether
the states are laid out one vector per token."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..blocks import Block
from ..errors import TraceError
from .entry import ENTRY


def _in(node: fx.Node, members: tuple[str, ...]) -> bool:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if any(path == m or path.startswith(m + ".") for m in members):
            return True
    return False


def hidden_of(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) and val.ndim == 3 and val.is_floating_point() else None


def _owners(graph: fx.Graph, blocks: list[Block]) -> dict[fx.Node, int]:
    """Node -> position of the block whose computation it is part of, for the nodes inside a block.
    One pass over the graph, so finding every block's output stays linear in the depth."""
    position = {f"{ENTRY}.{m}": i for i, b in enumerate(blocks) for m in b.members}
    owners = {}
    for node in graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            parts = path.split(".")
            hit = next((position[p] for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1)) if p in position), None)
            if hit is not None:
                owners[node] = hit
                break
    return owners


def block_outputs(graph: fx.Graph, blocks: list[Block]) -> list[fx.Node]:
    """For each block, the last node computed inside it that is read outside it: the block's output."""
    owners = _owners(graph, blocks)
    by_block: list[list[fx.Node]] = [[] for _ in blocks]
    for node, i in owners.items():
        by_block[i].append(node)
    outs = []
    for i, block in enumerate(blocks):
        inside = by_block[i]
        if not inside:
            raise TraceError(f"block {block.name!r} never runs in the model's forward, so its list is not the "
                             "model's transformer blocks")
        escaping = [n for n in inside if any(owners.get(u) != i for u in n.users)]
        # a block returning a tuple: its hidden states are element 0
        escaping = [next((u for u in n.users if getattr(u.target, "__name__", "") == "getitem" and u.args[1] == 0), n)
                    if hidden_of(n) is None and n.op == "call_module" else n for n in escaping]
        hidden = [n for n in escaping if hidden_of(n) is not None]
        if not hidden:
            shapes = [tuple(v.shape) if isinstance(v := n.meta.get("val"), torch.Tensor) else type(v).__name__
                      for n in escaping]
            raise TraceError(f"found no hidden states (batch, seq, dim) leaving block {block.name!r}; "
                             f"what leaves it: {shapes[:4]}")
        outs.append(hidden[-1])
    return outs


def block_runs(graph: fx.Graph, blocks: list[Block]) -> list[int]:
    """For each block, how many times it runs in one forward. A call of a module is one call_module node
    (fx front end: members are leaves) or one nn_module_stack key (torch.export keys each call apart:
    `...layers.1`, `...layers.1@1`). A member runs as often as the least-called module at or under it: a
    member that is a ModuleList (x-transformers' entries) is never called itself, and a submodule shared
    with later blocks (called more often) must not count as a rerun."""
    members = {f"{ENTRY}.{m}": i for i, b in enumerate(blocks) for m in b.members}

    def member_of(path: str) -> str | None:
        parts = path.split(".")
        return next((p for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1)) if p in members), None)

    calls: dict[str, dict[str, set]] = {m: {} for m in members}
    for node in graph.nodes:
        if node.op == "call_module" and (m := member_of(node.target)):
            calls[m].setdefault(node.target, set()).add(node.name)
            continue
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            if m := member_of(path):
                calls[m].setdefault(path, set()).add(key)
    runs = [0] * len(blocks)
    for m, i in members.items():
        if calls[m]:
            runs[i] = max(runs[i], min(len(c) for c in calls[m].values()))
    return runs


def block_inputs(graph: fx.Graph, blocks: list[Block], outputs: list[fx.Node]) -> list[fx.Node]:
    """For each block, the hidden states it reads: the previous block's output, or for the first block
    the value from outside it with the shape of its output (the embeddings)."""
    members = tuple(f"{ENTRY}.{m}" for m in blocks[0].members)
    dim = hidden_of(outputs[0]).shape[-1]
    feeding = [a for n in graph.nodes if _in(n, members) for a in n.all_input_nodes
               if not _in(a, members) and hidden_of(a) is not None and hidden_of(a).shape[-1] == dim]
    if not feeding:
        raise TraceError(f"found no hidden states entering block {blocks[0].name!r}")
    order = {n: i for i, n in enumerate(graph.nodes)}
    return [max(feeding, key=order.__getitem__), *outputs[:-1]]



def check_layout(graph: fx.Graph, blocks: list[Block], taps: list[fx.Node], tokens: bool) -> None:
    """A tap must hold one vector per input token, batch first: (batch, seq, dim) with the input's batch and
    (for token inputs) its length. Cross-attention masks (causal, padding) index the tap's positions as the
    input's tokens. An image model's sequence (its patches) is its own."""
    example = next(n for n in graph.nodes if n.op == "placeholder").meta["val"]
    want = tuple(example.shape[:2]) if tokens else (example.shape[0],)
    for block, tap in zip(blocks, taps):
        got = tuple(tap.meta["val"].shape)
        if not all(statically_known_true(g == w) for g, w in zip(got, want)):
            raise TraceError(
                f"block {block.name!r} passes on hidden states of shape {got}, not (batch, seq, dim) with the "
                f"input's {'batch and sequence length' if tokens else 'batch'} {want}: a tap must hold one vector "
                "per token, batch first (e.g. XLNet keeps (seq, batch, dim); ProphetNet concatenates its n-gram "
                "streams along the sequence), so cross-attention cannot line its positions up with the tokens")


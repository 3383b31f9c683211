"""Find a model's transformer blocks: the layers an edge can tap.

A model's blocks are the entries of one `nn.ModuleList` (or `nn.Sequential`): named by the spec's
`blocks:` or found as the list of same-typed modules holding the most parameters. A family may group
several entries into one block (`families.block_groups`: x-transformers' attention + feed-forward).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch.nn as nn

from .families import block_groups


@dataclass(frozen=True)
class Block:
    index: int
    name: str                  # qualified name a spec can use, e.g. "model.layers.3"
    members: tuple[str, ...]   # qualified names of the modules whose computation is this block


class BlockListError(Exception):
    """Internal: why no block list could be found (turned into a located spec problem by the caller)."""


def _is_block_list(module: nn.Module) -> bool:
    children = list(module.children())
    return (isinstance(module, (nn.ModuleList, nn.Sequential)) and len(children) > 0
            and len({type(c) for c in children}) == 1
            and all(any(True for _ in c.parameters()) for c in children))


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_list_candidates(model: nn.Module) -> list[str]:
    """Qualified names of every list that could hold the blocks, best guess first."""
    found = [(name, m) for name, m in model.named_modules() if name and _is_block_list(m)]
    found.sort(key=lambda nm: (-_n_params(nm[1]), nm[0].count("."), nm[0]))
    return [name for name, _ in found]


def find_blocks(model: nn.Module, path: str | None = None) -> list[Block]:
    if path is None:
        candidates = block_list_candidates(model)
        if not candidates:
            raise BlockListError(
                f"found no nn.ModuleList of same-typed blocks in {type(model).__name__}; "
                "name the list with `blocks:` in the spec")
        path = candidates[0]
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        close = difflib.get_close_matches(path, block_list_candidates(model), n=3, cutoff=0.3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise BlockListError(f"{type(model).__name__} has no submodule {path!r}; {hint}"
                             f"block lists found: {block_list_candidates(model) or 'none'}") from None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise BlockListError(f"{path!r} is a {type(blocks).__name__}, not a non-empty nn.ModuleList of blocks; "
                             f"block lists found: {block_list_candidates(model) or 'none'}")

    entries = [f"{path}.{i}" for i in range(len(blocks))]
    owner = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    groups = block_groups(owner, entries) or [(name,) for name in entries]
    return [Block(i, members[-1], members) for i, members in enumerate(groups)]


def head_count(model: nn.Module, blocks: list[Block]) -> int | None:
    """The model's attention head count, if it says so (config or attribute); None if unknown."""
    config = getattr(model, "config", None)
    for key in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    first = model.get_submodule(blocks[0].members[0]) if blocks else model
    for module in first.modules():
        for key in ("heads", "n_head", "num_heads", "num_attention_heads"):
            value = getattr(module, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None

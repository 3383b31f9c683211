"""Find a model's transformer blocks: the layers an edge can tap.

A model's blocks are the entries of one `nn.ModuleList` (or `nn.Sequential`): named by the spec's
`blocks:` or found as the list of same-typed modules holding the most parameters. A family may group
several entries into one block (`families.block_groups`: x-transformers' attention + feed-forward).
Blocks not held in one list (a hybrid model, an encoder-decoder) are named one by one: `blocks:` as a
list of qualified names, or in Python a callable `model -> [modules]`, in the order they run.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Sequence

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


def find_blocks(model: nn.Module, path: str | Sequence[str] | Callable | None = None) -> list[Block]:
    if callable(path):
        return _named_blocks(model, _names_of(model, path))
    if isinstance(path, (list, tuple)):
        return _named_blocks(model, list(path))
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


def _names_of(model: nn.Module, fn: Callable) -> list[str]:
    """The qualified names of the modules a `blocks:` callable returns for `model`."""
    what = getattr(fn, "__qualname__", type(fn).__name__)
    try:
        modules = fn(model)
    except Exception as e:  # noqa: BLE001 - the user's function: its reason, located by the caller
        raise BlockListError(f"blocks callable {what} raised {type(e).__name__}: {e}") from None
    if not isinstance(modules, (list, tuple)) or not all(isinstance(m, nn.Module) for m in modules):
        raise BlockListError(f"blocks callable {what} returned {type(modules).__name__}; it must return a list "
                             "of the model's modules, one per block")
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False) if name}
    outside = [type(m).__name__ for m in modules if id(m) not in names]
    if outside:
        raise BlockListError(f"blocks callable {what} returned modules that are not submodules of "
                             f"{type(model).__name__} ({', '.join(outside)})")
    return [names[id(m)] for m in modules]


def _named_blocks(model: nn.Module, names: list[str]) -> list[Block]:
    """One block per qualified name, in the order given (the order they run)."""
    known = [name for name, _ in model.named_modules() if name]
    if not names:
        raise BlockListError("the list of blocks is empty; name at least one block")
    for name in names:
        if not isinstance(name, str) or name not in known:
            close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise BlockListError(f"{type(model).__name__} has no submodule {name!r}{hint}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BlockListError(f"blocks named more than once: {', '.join(twice)}")
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise BlockListError(f"block {nested[0][1]!r} lies inside block {nested[0][0]!r}; blocks cannot nest")
    return [Block(i, name, (name,)) for i, name in enumerate(names)]


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

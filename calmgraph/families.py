"""What calmgraph knows about particular model libraries, in one place.

Everything else is generic: a model is traced as `model(input_ids)`, its blocks are the entries of one
`nn.ModuleList`. These are the exceptions, each with the family that needs it. A user with a model of
their own that the fx front end cannot follow passes `leaf_modules=` to `cg.compile` (as torchvision's
`feature_extraction` does) instead of editing this table.
"""
from __future__ import annotations

from typing import Iterable

import torch.nn as nn

# Modules that do shape arithmetic a symbolic tracer cannot follow, kept opaque by the fx front end:
# x-transformers' position embeddings (AbsolutePositionalEmbedding, ...), BERT's embeddings.
FX_LEAF_CLASSES = ("AbsolutePositionalEmbedding", "ScaledSinusoidalEmbedding", "RotaryEmbedding", "BertEmbeddings")

# The keyword under which a model takes a padding mask, in order of preference. x-transformers calls it
# `mask` and wants booleans (True = attend); transformers calls it `attention_mask` (1 = attend).
MASK_KWARGS = ("attention_mask", "mask")
BOOLEAN_MASK_KWARGS = frozenset({"mask"})

# What transformers calls the KV cache argument (5.x, 4.x); a model that takes one is cached when generating.
CACHE_KWARGS = ("cache", "past_key_values")


def is_transformers(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def frontend_order(model: nn.Module) -> list[str]:
    """transformers models go to torch.export first: their mask builders defeat symbolic tracing."""
    return ["export", "fx"] if is_transformers(model) else ["fx", "export"]


def block_groups(owner: nn.Module, entries: list[str]) -> list[tuple[str, ...]] | None:
    """Entries of a block list that together make one block, or None when each entry is a block.
    x-transformers keeps attention and feed-forward as separate entries (`layer_types` 'a', 'f', ...):
    one block ends at each 'f'."""
    layer_types = getattr(owner, "layer_types", None)
    if not (isinstance(layer_types, (tuple, list)) and len(layer_types) == len(entries) and "f" in layer_types):
        return None
    groups, members = [], []
    for name, kind in zip(entries, layer_types):
        members.append(name)
        if kind == "f":
            groups.append(tuple(members))
            members = []
    return groups


def leaf_predicate(extra: Iterable[type | str] = ()):
    """`is_leaf(module, qualname)` for the fx front end: the table's classes, plus the user's
    `leaf_modules` (module classes, class names, or qualified module names)."""
    extra = tuple(extra)
    classes = tuple(e for e in extra if isinstance(e, type))
    names = {e for e in extra if isinstance(e, str)}

    def is_leaf(module: nn.Module, qualname: str) -> bool:
        return (type(module).__name__ in FX_LEAF_CLASSES or isinstance(module, classes)
                or type(module).__name__ in names or qualname in names)
    return is_leaf

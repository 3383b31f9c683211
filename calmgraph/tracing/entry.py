"""Entry wrappers: every model, whatever its signature, as `forward(inputs) -> one tensor`, traced on a
frozen alias of the user's model (the same weight storage, none of the user's hooks or flags).

The user's model is never traced itself: it is deep-copied with every parameter and buffer replaced by a
frozen alias of the same storage (no weight is copied, the user's `requires_grad` is not touched), without
the user's hooks, and the copy is put in eval mode.
"""
from __future__ import annotations

import copy
import inspect

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import TraceError
from ..families import BOOLEAN_MASK_KWARGS, MASK_KWARGS

ENTRY = "model"  # attribute under which the entry wrapper holds the model; stripped from node targets

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def frozen_alias(model: nn.Module, apply=None) -> nn.Module:
    """A structural copy of `model` sharing its weight storage; parameters frozen, user's flags untouched.
    The copy carries none of the user's forward/backward hooks: they would run (fx) or be baked in (export)
    inconsistently, and tracing would call them; the fused graph computes each model's plain forward.
    `apply` (a tensor function, as `nn.Module._apply` takes): its weights are `apply` of the model's instead
    (a cast: new storage)."""
    apply = apply or (lambda t: t)
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(apply(p.detach()), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = apply(b.detach())
    alias = copy.deepcopy(model, memo)
    for module in alias.modules():  # the user's hooks stay on the user's model, not in the fused graph
        for attr in HOOK_DICTS:
            if isinstance(getattr(module, attr, None), dict):
                getattr(module, attr).clear()
    return alias.eval()


def model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def first_tensor(out):
    """The logits (or hidden states) in whatever a model returns: a tensor, an HF output, a tuple."""
    if isinstance(out, (torch.Tensor, fx.Proxy)):  # a Proxy while the fx front end traces
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, (torch.Tensor, fx.Proxy)):
            return value
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    raise TypeError(f"model returned {type(out).__name__}, in which no tensor was found")



def _call_kwargs(model: nn.Module) -> tuple[dict, str | None]:
    """Keyword arguments that turn a model's cache off, and the name under which it takes a padding mask."""
    params = inspect.signature(model.forward).parameters
    fixed = {"use_cache": False} if "use_cache" in params else {}
    mask_kw = next((k for k in MASK_KWARGS if k in params), None)
    return fixed, mask_kw


class Entry(nn.Module):
    """forward(input_ids) -> one tensor, whatever the model returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        setattr(self, ENTRY, model)
        self.fixed_kwargs, _ = _call_kwargs(model)

    def forward(self, input_ids):
        return first_tensor(self.model(input_ids, **self.fixed_kwargs))


class PromptEntry(Entry):
    """forward(input_ids, attention_mask) -> one tensor; the padding mask reaches the model if it takes one."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        _, self.mask_kw = _call_kwargs(model)

    def forward(self, input_ids, attention_mask):
        kwargs = dict(self.fixed_kwargs)
        if self.mask_kw in BOOLEAN_MASK_KWARGS:  # x-transformers: boolean, True = attend
            kwargs[self.mask_kw] = attention_mask.bool()
        elif self.mask_kw is not None:
            kwargs[self.mask_kw] = attention_mask
        return first_tensor(self.model(input_ids, **kwargs))


class PixelEntry(Entry):
    """forward(pixel_values) -> one tensor: an image model (e.g. transformers' ViTModel) as a prompt augment."""

    def forward(self, pixel_values):
        return first_tensor(self.model(pixel_values=pixel_values, **self.fixed_kwargs))


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images a model reads, from its config or its own attributes."""
    for source in (getattr(model, "config", None), model):
        size = getattr(source, "image_size", None)
        channels = getattr(source, "num_channels", getattr(source, "channels", None))
        if isinstance(channels, int) and isinstance(size, int):
            return channels, size, size
        if isinstance(channels, int) and isinstance(size, (tuple, list)) and len(size) == 2:
            return channels, int(size[0]), int(size[1])
    raise TraceError(f"{type(model).__name__} reads pixel_values but says neither its image_size nor its "
                     "num_channels (config or attribute); set model.image_size and model.num_channels")



def entry_for(alias: nn.Module, kind: str) -> Entry:
    """The wrapper for a model read as `kind`: "ids" (shared), "prompt" (ids + mask) or "pixels"."""
    return {"ids": Entry, "prompt": PromptEntry, "pixels": PixelEntry}[kind](alias)

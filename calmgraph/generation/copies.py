"""The copies of the composed model's weights that generation decodes on: under autocast, its linear weights
cast once (`autocast_copies` for the eager graphs of a call, `CastWeights` for the compiled graphs of every
call), rather than at every op of every step; and, for `concat_projections`, the weights of each group of
projections concatenated (`ConcatWeights`). Each graph reads them by the identity of the weight they copy."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


def autocast_weights(composed, device: torch.device) -> tuple[torch.dtype | None, list[nn.Parameter]]:
    """Under autocast, its dtype and the float32 weights and biases of the composition's `nn.Linear` layers
    (else None, []). Autocast caches no cast in inference mode, nor of a weight that does not require grad:
    at each step it would cast every one of them again (on a GPU, a kernel each). A linear casts its weight
    to that dtype anyway, so a step computes the same numbers on copies cast once. The layers are found in
    the cross-attention blocks and in the models as traced (an outlined block holds its weights without
    them). A weight tied to another module's (read by other ops too) is left out, and so is a subclass of
    `nn.Linear`, whose forward may not be a linear."""
    if not torch.is_autocast_enabled(device.type):
        return None, []
    eligible: set[int] = set()
    for module in (composed, *(composed.traced_model(m.name) for m in composed.spec.models)):
        if module is not None:
            eligible |= linear_weights(module, device)
    return torch.get_autocast_dtype(device.type), [p for p in _untied(composed) if id(p) in eligible]


@dataclass(frozen=True)
class CastWeights:
    """`autocast_weights` cast once for compiled graphs, by the id of the weight: one set per composed model
    and autocast dtype, which every decoder's compiled step and prefill hold (CUDA graphs keep their
    addresses, so `refresh` copies the weights into them in place, at each call)."""
    key: tuple                                   # (dtype, the weights' ids)
    copies: dict[int, nn.Parameter]
    pairs: tuple[tuple[nn.Parameter, nn.Parameter], ...]

    def refresh(self) -> None:
        with torch.no_grad():
            for weight, copy in self.pairs:
                copy.copy_(weight)


def cast_weights(composed, device: torch.device, entry: dict) -> CastWeights | None:
    """The composed model's `CastWeights` under autocast, refreshed (None without autocast); `entry`: what
    generate keeps for the composed model, where they stay between calls."""
    dtype, weights = autocast_weights(composed, device)
    if not weights:
        return None
    key = (dtype, frozenset(map(id, weights)))
    cast = entry.get("cast")
    if cast is None or cast.key != key:
        pairs = tuple((w, nn.Parameter(w.detach().to(dtype), requires_grad=False)) for w in weights)
        cast = entry["cast"] = CastWeights(key, {id(w): c for w, c in pairs}, pairs)
    else:
        cast.refresh()
    return cast


class ConcatWeights:
    """Weights concatenated for compiled steps (generate's `concat_projections`), one tensor per group of
    weights, which every decoder of the composed model shares: by the ids of the weights (it holds them, so
    that the ids stay theirs). `refresh` copies them again in place (CUDA graphs keep the addresses) where a
    weight may have changed since: one whose version moved, or one without a version (made in inference
    mode: an autocast copy, refreshed at each call)."""

    def __init__(self):
        self.made: dict[tuple, tuple[list[torch.Tensor], list[int] | None, torch.Tensor]] = {}

    @staticmethod
    def _versions(weights) -> list[int] | None:
        return None if any(w.is_inference() for w in weights) else [w._version for w in weights]

    def __call__(self, weights: list[torch.Tensor]) -> torch.Tensor:
        key = tuple(map(id, weights))
        if key not in self.made:
            with torch.no_grad():
                self.made[key] = (list(weights), self._versions(weights), torch.cat([w.detach() for w in weights]))
        return self.made[key][2]

    def refresh(self) -> None:
        for key, (weights, versions, joined) in self.made.items():
            now = self._versions(weights)
            if now is None or now != versions:
                with torch.no_grad():
                    torch.cat([w.detach() for w in weights], out=joined)
                self.made[key] = (weights, now, joined)


def concat_weights(entry: dict) -> ConcatWeights:
    """The composed model's `ConcatWeights` (kept in generate's `entry` for it), refreshed."""
    concat = entry.setdefault("concat", ConcatWeights())
    concat.refresh()
    return concat


def autocast_copies(composed, device: torch.device) -> dict[int, torch.Tensor]:
    """`autocast_weights` cast once, by the id of the weight (each graph names them its own way:
    `by_identity`); they hold half the float32 weights' memory for the call."""
    dtype, weights = autocast_weights(composed, device)
    return {id(p): p.detach().to(dtype) for p in weights}


def linear_weights(module: nn.Module, device: torch.device) -> set[int]:
    """The ids of the float32 weights and biases on `device` of `module`'s `nn.Linear` layers (not of a
    subclass), but for those `module` also holds under another name (tied)."""
    once = {id(p) for p in _untied(module)}
    return {id(p) for m in module.modules() if type(m) is nn.Linear for p in m.parameters(recurse=False)
            if p.dtype == torch.float32 and p.device.type == device.type and id(p) in once}


def _untied(module: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, list] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(p)
    return [ps[0] for ps in seen.values() if len(ps) == 1]


def by_identity(graph: nn.Module, copies: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`autocast_copies` by the names `graph` gives the same weights (for `torch.func.functional_call`)."""
    return {name: copies[id(p)] for name, p in graph.named_parameters(remove_duplicate=False) if id(p) in copies}

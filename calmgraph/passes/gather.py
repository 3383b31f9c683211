"""Pass 0, gather: the models named by the spec, checked against it, and each one's blocks found.

Nothing is traced or built here; every problem is reported before any work is done.
"""
from __future__ import annotations

import torch.nn as nn

from ..blocks import Block, BlockListError, find_blocks
from ..errors import LayerRefError, ModelError, Problem
from ..spec import CompositionSpec
from ..tracing.entry import model_device
from .base import CompileState, Pass, PassResult


def gather(spec: CompositionSpec, models: dict[str, nn.Module] | None) -> dict[str, nn.Module]:
    models = dict(models or {})
    names = [m.name for m in spec.models]
    missing = [n for n in names if n not in models]
    extra = [n for n in models if n not in names]
    if missing or extra:
        parts = [f"no model given for {missing}" if missing else "", f"models {extra} are not in the spec" if extra else ""]
        raise ModelError(f"{'; '.join(p for p in parts if p)}: pass models={{name: nn.Module}} for exactly "
                         f"the spec's models {names}")
    for name in names:
        if not isinstance(models[name], nn.Module):
            raise ModelError(f"model {name!r} is a {type(models[name]).__name__}, not a torch.nn.Module")
    devices = {name: model_device(models[name]) for name in names}
    if len({d.type for d in devices.values()}) > 1 or len(set(devices.values())) > 1:
        listing = ", ".join(f"{n}: {d}" for n, d in devices.items())
        raise ModelError(f"all models must be on one device to be fused into one graph ({listing}); "
                         "move them with .to(device) before compiling")
    return {name: models[name] for name in names}


def find_all_blocks(spec: CompositionSpec, models: dict[str, nn.Module]) -> dict[str, list[Block]]:
    problems, found = [], {}
    locs = {spec.anchor.name: "anchor", **{a.name: f"augments[{i}]" for i, a in enumerate(spec.augments)}}
    for m in spec.models:
        try:
            found[m.name] = find_blocks(models[m.name], m.blocks)
        except BlockListError as e:
            problems.append(Problem(f"{locs[m.name]}.blocks", str(e)))
    if problems:
        raise LayerRefError(problems)
    return found


class Gather(Pass):
    """The models checked against the spec, and each one's blocks found."""

    ensures = ("blocks",)

    def call(self, state: CompileState) -> PassResult:
        state.models = gather(state.spec, state.models)
        state.blocks = find_all_blocks(state.spec, state.models)
        return PassResult(state, False)

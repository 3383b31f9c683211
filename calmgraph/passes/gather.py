"""Pass 0, gather: the models named by the spec, checked against it, and each one's blocks found.

Nothing is traced or built here; every problem is reported before any work is done.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..blocks import Block, BlockListError, find_blocks
from ..errors import LayerRefError, ModelError, Problem, TraceError
from ..spec import CompositionSpec
from .trace import model_device


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


@contextmanager
def unchanged(models: dict[str, nn.Module]):
    """Compiling runs the traced graphs (shape checks, verification) on tensors that share the models'
    storage, so a forward that writes its own buffer (a call counter, a cache) would write the user's.
    Version counters, shared with those aliases, show any such write: buffers are put back from a copy
    taken here (buffers are small; weights are not copied) and the write is refused."""
    tensors = {f"{name}.{n}": t for name, m in models.items()
               for n, t in (*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False))}
    versions = {k: t._version for k, t in tensors.items()}
    saved = {f"{name}.{n}": b.clone() for name, m in models.items() for n, b in m.named_buffers(remove_duplicate=False)}
    try:
        yield
    finally:  # put back what was written, whether or not compiling failed (then its own error propagates)
        written = [k for k, t in tensors.items() if t._version != versions[k]]
        with torch.no_grad():
            for k in written:
                if k in saved:
                    tensors[k].copy_(saved[k])
    if written:
        kept = [k for k in written if k not in saved]
        raise TraceError(f"running the traced forward wrote {written} in place (restored: "
                         f"{[k for k in written if k in saved] or 'none'}{'; not restorable: ' + str(kept) if kept else ''})"
                         "; a composition must be a pure function of the models' weights: make the forward "
                         "leave its parameters and buffers alone (e.g. keep a counter outside the module)")

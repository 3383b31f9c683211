"""Device constants follow the model: torch.export writes the device it traced on into the graph (factory
calls like `arange(..., device=cpu)`, `to(x, cpu)`, metadata checks), so a composition compiled on the CPU
and moved with `.to("cuda")` would still build those tensors on the CPU. `ComposedModel` calls `retarget`
after every move, on its graph and on the graphs nested in it (torch.export's higher-order op bodies).

Dtype constants cannot follow so: a norm traced from float32 casts up to float32 and back to its input's
dtype, both written as float32, and which of the two a cast was is gone. `dtype_constants` finds them, so
that a cast of the weights to another dtype is refused rather than run into a dtype clash."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn


def _moved(value, device: torch.device):
    if isinstance(value, torch.device) and value != device:
        return device
    return value


def retarget(graph: fx.Graph, device: torch.device) -> bool:
    """Point every device constant in `graph` at `device`; True if any changed."""
    changed = False
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        args = tuple(_moved(a, device) for a in node.args)
        kwargs = {k: _moved(v, device) for k, v in node.kwargs.items()}
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed = True
    return changed


def dtype_constants(module: nn.Module) -> set[torch.dtype]:
    """The floating dtypes written as constants into the graphs of `module` (itself and those nested)."""
    found: set[torch.dtype] = set()

    def note(value):
        if isinstance(value, torch.dtype) and value.is_floating_point:
            found.add(value)
    for m in module.modules():
        if isinstance(m, fx.GraphModule):
            for node in m.graph.nodes:
                if node.op in ("call_function", "call_method"):
                    fx.node.map_aggregate((node.args, node.kwargs), note)
    return found


def retarget_module(module: nn.Module, device: torch.device) -> None:
    """`retarget` on every GraphModule in `module` (itself included), recompiling those that changed."""
    for m in module.modules():
        if isinstance(m, fx.GraphModule) and retarget(m.graph, device):
            recompile(m)


def recompile(m: fx.GraphModule) -> None:
    """`m.recompile()` on the class the GraphModule was made with. A wrapper that swapped its class for a
    subclass (FSDP2's fully_shard makes `FSDP<class>`) would otherwise get a call wrapper of its own that
    calls itself: a sharded composition loaded or moved after sharding (`parallel.load_sharded`)."""
    cls = type(m)
    made = next((c for c in cls.__mro__ if "_wrapped_call" in vars(c)), cls)  # set by GraphModule.recompile
    if made is cls:
        m.recompile()
        return
    m.__class__ = made
    try:
        m.recompile()
    finally:
        m.__class__ = cls

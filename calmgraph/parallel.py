"""Training at scale on the block-granular fused graph: activation checkpointing and FSDP2 sharding.

Both act on the blocks the outline pass made (`passes/outline.py`): each block of each model is one
submodule, called once from the root graph by a node marked `calmgraph_block`.

    checkpoint_blocks(composed)   # each block's activations recomputed in backward, not kept
    shard(composed)               # FSDP2: each block, then the root, sharded over the ranks

Either order works; call both before building the optimizer (sharding replaces the parameters).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils.checkpoint

from .errors import ParallelError
from .passes.outline import BLOCK_KEY


def block_paths(composed: fx.GraphModule) -> list[str]:
    """The paths of the block submodules the root graph calls, in graph order."""
    return list(dict.fromkeys(n.meta[BLOCK_KEY] for n in composed.graph.nodes if BLOCK_KEY in n.meta))


def _require_blocks(composed: fx.GraphModule, what: str) -> list[str]:
    if not isinstance(composed, fx.GraphModule):
        raise ParallelError(f"{what} takes a composed model (cg.compile's result); got {type(composed).__name__}")
    paths = block_paths(composed)
    if not paths:
        raise ParallelError(f"{what}: the composed model's graph calls no block submodule (it was not built by "
                            "this version's cg.compile); compile the spec again")
    return paths


def checkpointed(composed: fx.GraphModule) -> list[str]:
    """The block paths whose calls already run through torch.utils.checkpoint."""
    return [n.meta[BLOCK_KEY] for n in composed.graph.nodes
            if BLOCK_KEY in n.meta and n.target is torch.utils.checkpoint.checkpoint]


def checkpoint_blocks(composed: fx.GraphModule) -> fx.GraphModule:
    """Run every block call through `torch.utils.checkpoint` (non-reentrant): a block keeps only its inputs
    for backward and recomputes the rest, so activation memory no longer grows with the blocks' insides.
    Rewrites `composed`'s graph in place (and returns it); calling it again changes nothing. The values
    and gradients are those of the plain graph; it works eager, under torch.compile and with `shard`."""
    _require_blocks(composed, "checkpoint_blocks")
    graph = composed.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or BLOCK_KEY not in node.meta:
            continue
        with graph.inserting_before(node):
            block = graph.get_attr(node.target)
            call = graph.call_function(torch.utils.checkpoint.checkpoint, (block, *node.args),
                                       {**node.kwargs, "use_reentrant": False})
        call.meta = dict(node.meta)
        block.meta = {k: v for k, v in node.meta.items() if k != BLOCK_KEY and k != "val"}
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph.lint()
    composed.recompile()
    return composed


def shard(composed: fx.GraphModule, mesh=None, **fsdp_options) -> fx.GraphModule:
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) on each block, then on the root (embeddings, heads,
    norms and the new cross-attention blocks): each rank keeps about 1/world of every weight and gathers a
    block's weights only while that block runs. In place; returns `composed`. `mesh` and `fsdp_options`
    (e.g. `mp_policy`, `reshard_after_forward`) go to `fully_shard`; without a mesh, all ranks of the
    default process group. Gradients of the new parameters are averaged over the ranks (as DDP does)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard

    paths = _require_blocks(composed, "shard")
    if mesh is None and not (dist.is_available() and dist.is_initialized()):
        raise ParallelError("shard needs torch.distributed initialised (launch with torchrun or accelerate, "
                            "then dist.init_process_group) or a device mesh")
    if isinstance(composed, FSDPModule):
        raise ParallelError("this composed model is already sharded; shard it once")
    for path in paths:
        fully_shard(composed.get_submodule(path), mesh=mesh, **fsdp_options)
    fully_shard(composed, mesh=mesh, **fsdp_options)
    return composed


def local_numel(module: nn.Module) -> int:
    """Elements of `module`'s parameters held by this rank (a sharded parameter counts its local shard)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())

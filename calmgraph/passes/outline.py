"""Pass, outline: every block of every model becomes one submodule of the fused graph, called once.

The fused graph is flat (torch.export front end: ATen ops reading weights through `get_attr`); tools that
act on modules (FSDP2, activation checkpointing, ZeRO-3) need modules that are called. Each block's
nodes become a `torch.fx.GraphModule` at `<model>.<block name>` (e.g. `base.model.layers.3`), called from
the root graph by one `call_module` node, and holding the block's weights at their own relative names
(`self_attn.q_proj.weight`): the same Parameter objects, nothing copied, nothing registered twice.
Cross-attention nodes stay in the root graph, between the block calls.

A block's nodes: those of its model computed inside one of the block's member modules (from
`nn_module_stack`, or a `call_module` target under a member), and every node of the same model between
the first and last of them (the glue the parent's forward runs per layer, e.g. x-transformers' residual
bookkeeping). Weights under a member's name (and constants torch.export lifted out of the code) move
into the block when only the block reads them.
A block that is already one `call_module` of its own path (the fx front end's leaf blocks) stays as it is.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from ..blocks import Block
from .merge import MODEL_KEY
from .trace import ENTRY

BLOCK_KEY = "calmgraph_block"   # node.meta key on a block's call_module node: the block's path
CARRIED_META = ("val", "tensor_meta", MODEL_KEY)
LIFTED = "_calmgraph_"          # prefix of what trace._strip_entry moved onto a model (export's constants)


@dataclass(frozen=True)
class OutlineReport:
    module: fx.GraphModule                 # the block-granular graph module
    blocks: dict[str, list[str]]           # per model: its block submodules' paths, in order
    left_flat: dict[str, str] = field(default_factory=dict)  # block path -> why it stays flat
    seconds: float = 0.0


def outline_blocks(gm: fx.GraphModule, blocks: dict[str, list[Block]]) -> OutlineReport:
    """A new GraphModule computing what `gm` computes, each block of each model (`blocks`: per model name,
    its block list) outlined. `gm` is left as it was; the new module shares its weights."""
    started = time.perf_counter()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))   # node meta is copied (shallowly) with each node
    outlined: dict[str, fx.GraphModule] = {}
    paths: dict[str, list[str]] = {}
    left_flat: dict[str, str] = {}
    for model, model_blocks in blocks.items():
        for block in model_blocks:
            path = f"{model}.{block.name}"
            region = _region(graph, model, block)
            if not region:                                   # pruned: an augment block nothing reads
                continue
            if all(n.op == "call_module" and n.target == path for n in region):
                for n in region:                             # already a call of the block (fx front end)
                    n.meta[BLOCK_KEY] = path
                paths.setdefault(model, []).append(path)
                continue
            why = _cycle(graph, region)
            if why:
                left_flat[path] = why
                continue
            outlined[path] = _outline(gm, graph, region, model, block, path)
            paths.setdefault(model, []).append(path)
    graph.lint()
    module = fx.GraphModule(_root(gm, graph, outlined), graph, class_name=type(gm).__name__)
    return OutlineReport(module, paths, left_flat, time.perf_counter() - started)


# -- which nodes a block is ---------------------------------------------------------------------------
def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _owned(node: fx.Node, model: str, block: Block) -> bool:
    if node.meta.get(MODEL_KEY) != model or node.op in ("placeholder", "output", "get_attr"):
        return False
    if node.op == "call_module" and _under(node.target, tuple(f"{model}.{m}" for m in block.members)):
        return True
    stack = node.meta.get("nn_module_stack") or {}
    members = tuple(f"{ENTRY}.{m}" for m in block.members)
    return any(_under(p, members) for p, _ in stack.values())


def _region(graph: fx.Graph, model: str, block: Block) -> list[fx.Node]:
    """The block's nodes in graph order: its own, the same model's nodes between them, and the weights
    under its members' names read by nothing else."""
    nodes = list(graph.nodes)
    owned = [i for i, n in enumerate(nodes) if _owned(n, model, block)]
    if not owned:
        return []
    span = [n for n in nodes[owned[0]:owned[-1] + 1]
            if n.meta.get(MODEL_KEY) == model and n.op not in ("placeholder", "output", "get_attr")]
    inside = set(span)
    prefixes = tuple(f"{model}.{m}" for m in block.members)
    weights = [n for n in nodes if n.op == "get_attr" and (_under(n.target, prefixes) or _lifted(n.target))
               and n.users and all(u in inside for u in n.users)]
    return weights + span


def _lifted(target: str) -> bool:
    """A constant or subgraph torch.export lifted out of the model's code (named by `trace._strip_entry`)."""
    return target.rpartition(".")[2].startswith(LIFTED)


def _cycle(graph: fx.Graph, region: list[fx.Node]) -> str | None:
    """Why the region cannot be one call (a node outside it both reads it and feeds it), or None."""
    inside = set(region)
    reads_region: set[fx.Node] = set()
    for node in graph.nodes:
        if node not in inside and any(a in inside or a in reads_region for a in node.all_input_nodes):
            reads_region.add(node)
    feeding = [a.name for n in region for a in n.all_input_nodes if a in reads_region]
    return f"{feeding[0]!r} reads the block and feeds it" if feeding else None


# -- turning a region into a call ---------------------------------------------------------------------
def _relative(target: str, model: str, block: Block) -> str:
    """A weight's or module's name inside the block: relative to its member. The block's own entry keeps
    its names; the other members of a multi-entry block (x-transformers' attention before its
    feed-forward) go under `member_<i>`."""
    for member in block.members:
        prefix = f"{model}.{member}"
        if _under(target, (prefix,)):
            rest = target[len(prefix) + 1:]
            if member == block.name:
                return rest
            head = f"member_{member.rpartition('.')[2]}"
            return f"{head}.{rest}" if rest else head
    if _lifted(target):                   # no name of the user's: kept at the block's top
        return target.rpartition(".")[2]
    raise AssertionError(f"{target!r} is not under block {block.name!r}")


def _outline(gm: fx.GraphModule, graph: fx.Graph, region: list[fx.Node], model: str, block: Block,
             path: str) -> fx.GraphModule:
    inside = set(region)
    inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in region if any(u not in inside for u in n.users)]

    sub, env = fx.Graph(), {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta = {k: a.meta[k] for k in CARRIED_META if k in a.meta}
    holder = nn.Module()
    for n in region:
        env[n] = sub.node_copy(n, env.__getitem__)
        if n.op in ("get_attr", "call_module"):
            env[n].target = _relative(n.target, model, block)
            _install(holder, env[n].target, _attr(gm, n.target))
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    sub.lint()
    module = fx.GraphModule(holder, sub, class_name="Block")

    last = region[-1]
    with graph.inserting_after(last):
        call = graph.call_module(path, tuple(inputs))
    call.meta = {MODEL_KEY: model, BLOCK_KEY: path}
    if len(outputs) == 1:
        call.meta.update({k: outputs[0].meta[k] for k in CARRIED_META if k in outputs[0].meta})
        results = [call]
    else:
        call.meta["val"] = tuple(o.meta.get("val") for o in outputs)
        results, at = [], call
        for i, o in enumerate(outputs):
            with graph.inserting_after(at):
                at = graph.call_function(operator.getitem, (call, i))
            at.meta = {k: o.meta[k] for k in CARRIED_META if k in o.meta}
            results.append(at)
    for o, r in zip(outputs, results):
        o.replace_all_uses_with(r, delete_user_cb=lambda user: user not in inside)
    _after(graph, call, results, inside)
    for n in reversed(region):
        graph.erase_node(n)
    return module


def _after(graph: fx.Graph, call: fx.Node, results: list[fx.Node], inside: set[fx.Node]) -> None:
    """Move the nodes among the region's that now read the call after its results, in order (they feed
    nothing the region reads: `_cycle` checked)."""
    late, seen, started = [], {call, *results}, False
    for node in graph.nodes:
        if node is call:
            break
        if node in inside:
            started = True
        elif started and any(a in seen for a in node.all_input_nodes):
            late.append(node)
            seen.add(node)
    at = results[-1]
    for node in late:
        at.append(node)
        at = node


def _attr(module: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _install(root: nn.Module, target: str, value) -> None:
    """Put `value` at `target` under `root`, creating plain containers on the way; keep what is there."""
    *path, name = target.split(".")
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    if hasattr(root, name) and getattr(root, name) is value:
        return
    if isinstance(value, nn.Module):
        root.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        root.register_parameter(name, value)
    elif hasattr(value, "is_floating_point"):  # a tensor that is not a parameter: a buffer
        root.register_buffer(name, value)
    else:
        setattr(root, name, value)


def _root(gm: fx.GraphModule, graph: fx.Graph, outlined: dict[str, fx.GraphModule]) -> nn.Module:
    """The modules and weights the new root graph names: the blocks first (a name under a block, read by
    the root, then resolves through it), then everything else from `gm`. What only the blocks read is
    not put back: no weight is held twice."""
    root = nn.Module()
    for path, module in outlined.items():
        _install(root, path, module)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in outlined:
            _install(root, node.target, _attr(gm, node.target))
    return root

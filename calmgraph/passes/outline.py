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
from ..plan import MODEL_KEY
from ..tracing.entry import ENTRY
from .base import CompileState, Pass, PassResult

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
    for model, block, region, span in _regions(graph, blocks):   # all found before the graph changes
        path = f"{model}.{block.name}"
        if all(n.op == "call_module" and n.target == path for n in region):
            for n in region:                                 # already a call of the block (fx front end)
                n.meta[BLOCK_KEY] = path
            paths.setdefault(model, []).append(path)
            continue
        why = _cycle(span, region) or _data_dependent(region)
        if why:
            left_flat[path] = why
            continue
        outlined[path] = _outline(gm, graph, region, model, block, path)
        paths.setdefault(model, []).append(path)
    graph.lint()
    module = fx.GraphModule(_root(gm, graph, outlined), graph, class_name=type(gm).__name__)
    return OutlineReport(module, paths, left_flat, time.perf_counter() - started)


def _data_dependent(region: list[fx.Node]) -> str | None:
    """A block whose sizes depend on its data (a mixture of experts routing with `.tolist()`: jetmoe) makes
    symbols inside it that its outputs do not carry; as a submodule, fake-tensor shape checks cannot follow
    them out of it. Such a block stays in the root graph."""
    if any(n.meta.get("unbacked_bindings") for n in region):
        return "its sizes depend on its data (unbacked symbols), which a submodule's outputs cannot carry"
    return None


# -- which nodes a block is ---------------------------------------------------------------------------
def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _prefixes(path: str):
    parts = path.split(".")
    return (".".join(parts[:k]) for k in range(1, len(parts) + 1))


def _lifted(target: str) -> bool:
    """A constant or subgraph torch.export lifted out of the model's code (named by `trace._strip_entry`)."""
    return target.rpartition(".")[2].startswith(LIFTED)


def _owner(node: fx.Node, members: dict[str, tuple[str, Block]]) -> tuple[str, Block] | None:
    """The (model, block) whose member module computes `node` (or whose member holds a weight), if any."""
    model = node.meta.get(MODEL_KEY)
    if node.op in ("get_attr", "call_module"):
        hit = next((members[p] for p in _prefixes(node.target) if p in members), None)
        if hit is not None or node.op == "get_attr":
            return hit
    if model is None or node.op in ("placeholder", "output"):
        return None
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if path.startswith(ENTRY + "."):
            hit = next((members[f"{model}.{p}"] for p in _prefixes(path[len(ENTRY) + 1:]) if f"{model}.{p}" in members), None)
            if hit is not None and hit[0] == model:
                return hit
    return None


def _regions(graph: fx.Graph, blocks: dict[str, list[Block]]):
    """Per block that still runs, in graph order: (model, block, region, span). The region: the weights
    under its members' names (and lifted constants) read by nothing else, then the nodes from its first to
    its last own node that belong to its model. The span: every node from the first to the last."""
    members = {f"{model}.{m}": (model, b) for model, bs in blocks.items() for b in bs for m in b.members}
    nodes = list(graph.nodes)
    own: dict[tuple[str, str], list[int]] = {}
    weights: dict[tuple[str, str], list[fx.Node]] = {}
    lifted = []
    for i, node in enumerate(nodes):
        hit = _owner(node, members)
        if hit is not None:
            key = (hit[0], hit[1].name)
            (weights if node.op == "get_attr" else own).setdefault(key, []).append(node if node.op == "get_attr" else i)
        elif node.op == "get_attr" and _lifted(node.target):
            lifted.append(node)
    claimed: set[fx.Node] = set()
    found = []
    for model, bs in blocks.items():
        for block in bs:
            at = own.get((model, block.name))
            if not at:                                       # pruned: an augment block nothing reads
                continue
            span = nodes[at[0]:at[-1] + 1]
            body = [n for n in span if n.meta.get(MODEL_KEY) == model and n.op not in ("placeholder", "output", "get_attr")
                    and n not in claimed]
            inside = set(body)
            extra = [n for n in (*weights.get((model, block.name), ()), *lifted)
                     if n.users and all(u in inside for u in n.users)]
            claimed |= inside
            found.append((model, block, extra + body, span))
    return found


def _cycle(span: list[fx.Node], region: list[fx.Node]) -> str | None:
    """Why the region cannot be one call (a node outside it both reads it and feeds it), or None. Only
    nodes within the region's span can: the graph is in topological order."""
    inside = set(region)
    reads_region: set[fx.Node] = set()
    for node in span:
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
    _after(region, call, results, inside)
    for n in reversed(region):
        graph.erase_node(n)
    return module


def _after(inside_order: list[fx.Node], call: fx.Node, results: list[fx.Node], inside: set[fx.Node]) -> None:
    """Move the nodes among the region's that now read the call after its results, in order (they feed
    nothing the region reads: `_cycle` checked)."""
    late, seen = [], {call, *results}
    node = next(n for n in inside_order if n.op != "get_attr")   # the region's first computed node
    while node is not call:
        if node not in inside and any(a in seen for a in node.all_input_nodes):
            late.append(node)
            seen.add(node)
        node = node.next
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


class Outline(Pass):
    """Each block of each model (the anchor's, and the augments' kept after pruning) becomes one submodule
    at `<model>.<block name>`, called once from the fused graph."""

    requires = ("module", "blocks", "pruned")
    ensures = ("outlined",)

    def call(self, state: CompileState) -> PassResult:
        report = outline_blocks(state.module, state.blocks)
        state.module, state.outlined = report.module, report
        return PassResult(state, bool(report.blocks))

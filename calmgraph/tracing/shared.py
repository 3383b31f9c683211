"""One trace for identical blocks: torch.export traces a model whose block list is cut to its first two
blocks, and the second block's nodes are copied for every later block, each copy reading its own weights.

torch.export costs about half a second a block (symbolic-shape bookkeeping); a copy costs microseconds. The
copies are what a full trace gives only when every block computes the same thing on its own weights, so
the shortcut is taken only when that is shown, and the full trace runs otherwise:

- the blocks are all the entries of one nn.ModuleList, more than two, none sharing a module or weight
  with another;
- every block is the same module tree: same classes, parameter and buffer names, shapes and dtypes, and
  equal attributes except its index (`layer_idx`, used by caches, which the traced forward has off);
- the model's config has no per-layer list whose entries differ (`layer_types`: sliding-window layers);
- in the two-block trace, the second block's graph is the first's, op for op: the same ops and constants,
  its own weights at the same relative names, the first block's output where the first read the
  embeddings, and the same shared values (masks, rotary tables); and nothing outside the blocks sits
  between them or reads the first block.

The decode graph of generation (`generation/decode.py`) is traced the same way around a KV cache: there
each block also reads and writes state of its own that is no weight of it (its cache layer's keys, values
and length, which torch.export lifts as constants on the same memory). The caller names that state per
block; block 1 must read layer 1's where block 0 reads layer 0's, and each copy reads its own layer's (the
node computed outside the blocks from it, as a counter written before them, or the tensor itself).

So a block whose forward branches on its index (GPT-2's `scale_attn_by_inverse_layer_idx`) is caught when
blocks 0 and 1 differ; so is a forward that treats its first layer apart, or its last by the list's length
(in the cut list block 1 is the last). Not seen: a branch on the index, in a block or in the model's loop
over them, that treats blocks 0 and 1 alike and a later one differently while no attribute or config list
says so. Any failure on the way (a forward that counts its layers from the config fails on the cut list)
falls back to the full trace.
"""
from __future__ import annotations

import functools
import logging
import types
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..blocks import Block
from .entry import ENTRY, Entry

log = logging.getLogger(__name__)
ENABLED = True          # tests compare against the full trace by turning it off
TRACED_BLOCKS = 2       # the second block is the template: it reads a block's output, as every later one
INDEX_ATTRIBUTES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx"})
_MODULE_STATE = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training",
                           "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                           "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                           "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
                           "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_is_full_backward_hook"})


class NotShared(Exception):
    """Why the blocks cannot share one trace (the full trace runs instead)."""


def trace_shared(entry: Entry, blocks: list[Block], trace: Callable[[], fx.GraphModule],
                 layer_state: list[dict[str, torch.Tensor]] | None = None) -> fx.GraphModule | None:
    """`trace()`'s graph module, traced with the block list cut to its first blocks and the rest copied in;
    None when the blocks cannot share a trace (then the caller traces in full).

    `layer_state`: per block, tensors it reads and writes that are not its own weights (a KV cache's keys
    and values, by kind). torch.export lifts them as constants sharing their storage; each copy reads its
    own block's through the node the trace made for it outside the blocks (none: the full trace runs)."""
    if not ENABLED:
        return None
    try:
        holder = _block_list(entry.model, blocks)
        _check_uniform(entry.model, holder, blocks)
        kept = holder._modules
        holder._modules = dict(list(kept.items())[:TRACED_BLOCKS])   # the list is the alias's, not the user's
        try:
            gm = trace()
        finally:
            holder._modules = kept
        _replicate(gm, entry, blocks, layer_state or [])
        return gm
    except Exception as e:  # noqa: BLE001 - the full trace is always right; its own error is the one to give
        # e.g. a forward that counts its layers from the config fails on the cut list
        log.debug("blocks of %s traced one by one: %s: %s", type(entry.model).__name__, type(e).__name__, e)
        return None


# -- when the blocks are alike ------------------------------------------------------------------------
def _block_list(model: nn.Module, blocks: list[Block]) -> nn.ModuleList:
    """The list that holds the blocks, each block one entry of it, all of them, in order."""
    if len(blocks) <= TRACED_BLOCKS:
        raise NotShared("no more blocks than the trace would hold")
    path = blocks[0].name.rpartition(".")[0]
    try:
        holder = model.get_submodule(path)
    except AttributeError:
        raise NotShared(f"no block list at {path!r}") from None
    names = [f"{path}.{k}" for k in holder._modules]
    if not isinstance(holder, nn.ModuleList) or [b.members for b in blocks] != [(n,) for n in names]:
        raise NotShared("the blocks are not the entries of one nn.ModuleList")
    return holder


def _check_uniform(model: nn.Module, holder: nn.ModuleList, blocks: list[Block]) -> None:
    owner: dict[int, int] = {}       # a weight (or module) in two blocks: the trace names it once, copies would not
    for i, block in enumerate(holder):
        for t in (*block.modules(), *block.parameters(), *block.buffers()):
            if owner.setdefault(id(t), i) != i:
                raise NotShared(f"blocks {owner[id(t)]} and {i} share a module or weight")
    first = _structure(holder[0])
    for i, block in enumerate(list(holder)[1:], 1):
        if _structure(block) != first:
            raise NotShared(f"block {i} differs from block 0 in its modules, weights or attributes")
    config = getattr(model, "config", None)
    configs = [config, *(v for v in vars(config).values() if hasattr(v, "to_dict"))] if config is not None else []
    for cfg in configs:          # a per-layer list (layer_types, sliding windows) whose entries differ
        for key, value in vars(cfg).items():
            if isinstance(value, (list, tuple)) and len(value) == len(blocks) and len(set(map(repr, value))) > 1:
                raise NotShared(f"config.{key} differs between layers")


def _structure(block: nn.Module) -> list:
    """What must be equal between two blocks for them to trace alike (weights by shape and dtype)."""
    out = []
    for name, m in block.named_modules(remove_duplicate=False):
        attrs = {k: _comparable(v, m) for k, v in vars(m).items() if k not in _MODULE_STATE and k not in INDEX_ATTRIBUTES}
        tensors = [(k, tuple(t.shape), t.dtype, t.requires_grad) if t is not None else (k, None)
                   for k, t in (*m._parameters.items(), *m._buffers.items())]
        out.append((name, type(m), sorted(attrs.items()), tensors))
    return out


def _comparable(value, module: nn.Module):
    """A value two blocks' attributes can be compared by: plain data as itself, a partial function or a
    method of the module itself by what it calls, anything else by identity (a shared config is the same
    object in every block)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value):
        return tuple(value)
    if isinstance(value, functools.partial):    # transformers' GELUTanh: partial(gelu, approximate="tanh")
        return ("partial", _comparable(value.func, module), tuple(_comparable(a, module) for a in value.args),
                tuple(sorted((k, _comparable(v, module)) for k, v in value.keywords.items())))
    if isinstance(value, types.MethodType) and value.__self__ is module:
        return ("method", value.__func__)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return ("dict", tuple(sorted((k, _comparable(v, module)) for k, v in value.items())))
    if isinstance(value, nn.Module) and not any(True for _ in (*value.parameters(), *value.buffers())):
        # transformers >= 5.25 keeps a stateless function module per layer (`_kernel_funcs`): by what it is
        return ("module", type(value), _structure(value))
    if isinstance(value, torch.Tensor):
        raise NotShared("a block holds a tensor that is neither a parameter nor a buffer")
    return ("object", id(value))


# -- copying the second block ------------------------------------------------------------------------
def _owners(graph: fx.Graph, prefixes: list[str]) -> dict[fx.Node, int]:
    """Node -> the traced block (0 or 1) whose module computes it."""
    owners = {}
    for node in graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            hit = next((i for i, p in enumerate(prefixes) if path == p or path.startswith(p + ".")), None)
            if hit is not None:
                owners[node] = hit
                break
    return owners


def _weight_of(node: fx.Node, prefix: str) -> str | None:
    """The name of a weight under a block (relative to it), for a get_attr node that reads one."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and node.target.startswith(prefix + "."):
        return node.target[len(prefix) + 1:]
    return None


def _state_of(gm: fx.GraphModule, layer_state: list[dict[str, torch.Tensor]]):
    """node -> (kind, block index) for the nodes that read `layer_state`'s tensors (by storage: export's
    lifted constants are other tensor objects on the same memory), write them or cast them to their own
    dtype; else None."""
    owner = {t.data_ptr(): (kind, i) for i, state in enumerate(layer_state) for kind, t in state.items()}
    if len(owner) != sum(map(len, layer_state)) or 0 in owner:   # meta tensors, or shared memory: unknowable
        raise NotShared("the blocks' state cannot be told apart by its memory")

    @functools.cache
    def state_of(node) -> tuple[str, int] | None:
        if not owner or not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            value = _attr(gm, node.target)
            return owner.get(value.data_ptr()) if isinstance(value, torch.Tensor) else None
        if node.op == "call_function" and node.target in _ALIASING and node.args:   # the state itself, written
            source = node.args[0]                                                      # or cast to its own dtype
            val, src = node.meta.get("val"), getattr(source, "meta", {}).get("val")
            if node.target is torch.ops.aten.copy_.default or (
                    isinstance(val, torch.Tensor) and isinstance(src, torch.Tensor) and val.dtype == src.dtype):
                return state_of(source)
        return None
    return state_of


_ALIASING = {torch.ops.aten.copy_.default, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout,
             torch.ops.aten.to.device}


def _state_key(node: fx.Node, state: tuple[str, int]) -> tuple:
    """What a node computed from a block's state is, whatever block: a read, a write (its source is the
    block's own), or a cast with its options."""
    if node.op == "get_attr":              # the block's own read of it, whatever export named it
        return state, node.op
    if node.op != "call_function" or node.target is torch.ops.aten.copy_.default:
        return state, node.op, node.target
    return state, node.op, node.target, repr(node.args[1:]), repr(sorted(node.kwargs.items()))


def _replicate(gm: fx.GraphModule, entry: Entry, blocks: list[Block], layer_state: list[dict]) -> None:
    graph = gm.graph
    state_of = _state_of(gm, layer_state)
    prefixes = [f"{ENTRY}.{b.name}" for b in blocks[:TRACED_BLOCKS]]
    owners = _owners(graph, prefixes)
    nodes = list(graph.nodes)
    body = [[n for n in nodes if owners.get(n) == i and n.op != "get_attr"] for i in range(TRACED_BLOCKS)]
    if not all(body):
        raise NotShared("a traced block has no nodes")
    start, end = nodes.index(body[0][0]), nodes.index(body[-1][-1])
    if nodes[start:end + 1] != [n for b in body for n in b]:
        raise NotShared("nodes outside the blocks run between or among them")
    if any(n.meta.get("unbacked_bindings") for b in body for n in b):
        raise NotShared("a block's sizes depend on its data (unbacked symbols)")
    first, template = body[0], body[-1]
    stream = _match(first, template, prefixes, state_of)  # block-0 nodes block 1 reads (the hidden states)
    inside = set(first) | set(template)
    for n in first:
        if any(u not in inside for u in n.users):
            raise NotShared("something outside the blocks reads the first block")

    position = {n: p for p, n in enumerate(first)}
    stream_at = {x: position[x] for x in stream}              # template arg -> position in the previous block
    weights = _template_weights(template, prefixes[-1], state_of)
    states = {a: state_of(a)[0] for n in template for a in n.all_input_nodes if state_of(a)}
    outside: dict[tuple, fx.Node] = {}  # per block and kind, the nodes outside the blocks that read its state
    for n in nodes:
        if owners.get(n) is None and state_of(n):
            key = _state_key(n, state_of(n))
            if key not in outside or not outside[key].users:   # export's lifted read, not an unused buffer's
                outside[key] = n
    previous = template                                         # the previous block's nodes, by position
    at = template[-1]
    copies: set[fx.Node] = set()
    for block in blocks[TRACED_BLOCKS:]:
        prefix = f"{ENTRY}.{block.name}"
        env: dict[fx.Node, fx.Node] = {}
        for rel, node in weights.items():      # read before the first block, as the traced blocks' weights are
            target = f"{prefix}.{rel}"
            _install(gm, target, _attr(entry, target))
            with graph.inserting_before(first[0]):
                env[node] = graph.get_attr(target)
            env[node].meta = dict(node.meta)
        for node, kind in states.items():      # its own state: as the template read it, if computed outside
            own_state = outside.get(_state_key(node, (kind, block.index)))
            if own_state is None:               # the blocks (a counter written before them, a buffer's read)
                raise NotShared(f"block {block.index} has no {node.format_node()!r} of its own")
            env[node] = own_state
        own: list[fx.Node] = []

        def arg(x: fx.Node, own_by_template=env) -> fx.Node:
            if x in own_by_template:
                return own_by_template[x]
            if x in stream_at:                    # block 0's output feeding block 1: the previous block's
                return previous[stream_at[x]]
            return x                              # shared: masks, rotary tables, sizes
        for node in template:
            with graph.inserting_after(at):
                new = graph.node_copy(node, arg)
            new.meta = _moved_meta(node.meta, prefixes[-1], prefix)
            env[node] = at = new
            own.append(new)
        copies |= set(own)
        previous = own
    last = dict(zip(template, previous))
    for node in template:                      # what read the last traced block now reads the last block
        node.replace_all_uses_with(last[node], delete_user_cb=lambda u: u not in inside and u not in copies)
    graph.lint()
    # gm's code is not regenerated (0.4 s at 22 blocks): the trace pass reads only its graph and attributes


def _match(first: list[fx.Node], template: list[fx.Node], prefixes: list[str],
           state_of=lambda node: None) -> dict[fx.Node, fx.Node]:
    """Check the template block computes what the first block does; return {node the template reads in
    block 0: the node block 0 read in its place} (the hidden states passed down the stack)."""
    if len(first) != len(template):
        raise NotShared("block 1's graph has a different number of nodes from block 0's")
    pair = dict(zip(first, template))
    stream: dict[fx.Node, fx.Node] = {}        # template's arg (a block-0 node) -> block 0's arg

    def same(a, b) -> bool:
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                return False
            if a in pair:
                return pair[a] is b
            sa, sb = state_of(a), state_of(b)
            if sa is not None or sb is not None:   # each block's own state, of one kind
                return sa is not None and sb is not None and sa == (sb[0], 0) and sb[1] == 1
            wa, wb = _weight_of(a, prefixes[0]), _weight_of(b, prefixes[1])
            if wa is not None or wb is not None:
                return wa == wb
            if b in pair:                          # block 1 reads block 0 where block 0 read from outside
                return stream.setdefault(b, a) is a
            return a is b                          # the same shared value
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) or isinstance(b, dict):
            return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return type(a) is type(b) and (a is b or a == b)

    for a, b in zip(first, template):
        if a.op != b.op or a.target != b.target or not same(a.args, b.args) or not same(a.kwargs, b.kwargs):
            raise NotShared(f"block 1 computes {b.format_node()!r} where block 0 computes {a.format_node()!r}")
    if not stream:
        raise NotShared("block 1 reads nothing block 0 computes")
    return stream


def _template_weights(template: list[fx.Node], prefix: str, state_of=lambda node: None) -> dict[str, fx.Node]:
    out = {}
    for node in template:
        for a in node.all_input_nodes:
            rel = _weight_of(a, prefix)
            if rel is not None and state_of(a) is None:
                out.setdefault(rel, a)
    return out


def _moved_meta(meta: dict, old: str, new: str) -> dict:
    """The template node's meta for its copy in another block: its module stack names that block."""
    meta = dict(meta)
    stack = meta.get("nn_module_stack")
    if stack:
        moved = {}
        for key, (path, cls) in stack.items():
            if path == old or path.startswith(old + "."):
                path2 = new + path[len(old):]
                key = key.replace(path, path2, 1)
                path = path2
            moved[key] = (path, cls)
        meta["nn_module_stack"] = moved
    return meta


def _attr(module: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _install(root: nn.Module, target: str, value) -> None:
    *path, name = target.split(".")
    for part in path:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root._modules[part]
    if isinstance(value, nn.Parameter):
        root.register_parameter(name, value)
    elif isinstance(value, torch.Tensor):
        root.register_buffer(name, value)
    else:
        setattr(root, name, value)

"""Purity: a composition must be a pure function of the models' weights. A forward that writes its own
parameters or buffers is found in the traced graph (`refuse_weight_writes`) or, failing that, by version
counters while compiling runs the graphs (`unchanged`)."""
from __future__ import annotations

import operator
from contextlib import contextmanager

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import TraceError
from .entry import ENTRY
from .frontends import get_attr


# fx front end: Tensor methods and attributes that give a view of their tensor (writes through them reach it)
VIEW_METHODS = frozenset({"view", "view_as", "reshape", "transpose", "permute", "t", "expand", "expand_as",
                          "narrow", "select", "squeeze", "unsqueeze", "flatten", "unflatten", "detach",
                          "__getitem__", "chunk", "split", "unbind", "as_strided", "diagonal"})
VIEW_ATTRIBUTES = frozenset({"data", "T", "mT", "H", "mH", "real", "imag"})


def mutated_weights(gm: fx.GraphModule) -> dict[str, str]:
    """{parameter or buffer: op} for every weight the traced forward writes in place (e.g. RWKV's
    `rescale_every`: `weight.div_(...)` in its first eval forward). Writes are followed through views and
    into the subgraphs of higher-order ops (torch.export puts a `torch.no_grad()` region in one)."""
    weights = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    weights |= {n for n, _ in gm.named_buffers(remove_duplicate=False)}
    found: dict[str, str] = {}

    def walk(module: nn.Module, graph: fx.Graph, roots: dict[fx.Node, str]) -> None:
        """roots: node -> the weight it is (a view of)."""
        def root(a):
            return roots.get(a) if isinstance(a, fx.Node) else None

        def subgraph(a):
            value = get_attr(module, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else None
            return value if isinstance(value, fx.GraphModule) else None

        for node in graph.nodes:
            first = root(node.args[0]) if node.args else None
            if node.op == "get_attr" and module is gm and node.target in weights:
                roots[node] = node.target
            elif node.op == "call_method" and first:                 # fx front end: x.div_(2), x.view(...)
                if node.target.endswith("_") and not node.target.endswith("__") and node.target != "requires_grad_":
                    found.setdefault(first, node.target)
                elif node.target in VIEW_METHODS:
                    roots[node] = first
            elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                schema = node.target._schema
                for i, arg in enumerate(schema.arguments):
                    if arg.alias_info is not None and arg.alias_info.is_write:
                        written = root(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
                        if written:
                            found.setdefault(written, node.target.overloadpacket.__name__)
                if first and not schema.is_mutable and schema.returns and schema.returns[0].alias_info is not None:
                    roots[node] = first                                # a view (select, slice, detach, ...)
            elif node.op == "call_function" and node.target is operator.getitem and first:
                roots[node] = first
            elif node.op == "call_function" and node.target is getattr and first and node.args[1] in VIEW_ATTRIBUTES:
                roots[node] = first
            elif node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
                flat = list(_flatten((node.args, node.kwargs)))
                for j, a in enumerate(flat):
                    if (sub := subgraph(a)) is not None:               # its placeholders: the operands after it
                        operands = [x for x in flat[j + 1:] if subgraph(x) is None]
                        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
                        walk(sub, sub.graph, {p: root(x) for p, x in zip(placeholders, operands) if root(x)})

    walk(gm, gm.graph, {})
    return found


def _flatten(args):
    if isinstance(args, (tuple, list)):
        for a in args:
            yield from _flatten(a)
    elif isinstance(args, dict):
        for a in args.values():
            yield from _flatten(a)
    else:
        yield args


def refuse_weight_writes(gm: fx.GraphModule, name: str, model: nn.Module) -> None:
    """A forward that writes its own weights is not a function of them: the composed model (which shares
    the weights) would write them again at every call. The fx front end sees writes outside the blocks only
    (blocks are opaque leaves there); torch.export sees all."""
    mutated = mutated_weights(gm)
    if not mutated:
        return
    config = getattr(model, "config", None)
    rwkv = isinstance(getattr(config, "rescale_every", None), int) and config.rescale_every > 0
    shown = [f"{w.removeprefix(ENTRY + '.')} ({op})" for w, op in mutated.items()]
    raise TraceError(
        f"model {name!r} ({type(model).__name__}) writes its own weights in place during its forward: "
        f"{', '.join(shown[:6])}{f' and {len(shown) - 6} more' if len(shown) > 6 else ''}. The composed model "
        "shares (does not copy) the model's weights and runs that forward at every call, so it would change "
        "them at every call and compute something else each time; turn off what rewrites them before compiling"
        + (" (RWKV rescales its weights in its first eval forward: set `model.config.rescale_every = 0`)"
           if rwkv else ""))


@contextmanager
def unchanged(models: dict[str, nn.Module]):
    """Compiling runs the traced graphs (shape checks, verification) on tensors that share the models'
    storage, so a forward that writes its own buffer (a call counter, a cache) would write the user's.
    Version counters, shared with those aliases, show any such write: buffers are put back from a copy
    taken here (buffers are small; weights are not copied) and the write is refused."""
    models = {name: m for name, m in models.items() if isinstance(m, nn.Module)}  # others: gather refuses them
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

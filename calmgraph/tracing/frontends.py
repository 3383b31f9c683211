"""Front ends: an entry wrapper -> a torch.fx graph. Tried in turn (`families.frontend_order`):

- fx: a `torch.fx.Tracer` that keeps each block's modules (and `families.FX_LEAF_CLASSES`, and the user's
  `leaf_modules`) as leaves: a readable, module-level graph; shapes from fake-tensor propagation.
- export: `torch.export` (non-strict, dynamic batch and sequence): an ATen-level graph; identical blocks
  share one trace (`tracing/shared.py`).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..blocks import Block
from ..errors import TraceError
from ..families import leaf_predicate
from .entry import ENTRY, Entry
from .shared import trace_shared


class _BlockLeafTracer(fx.Tracer):
    def __init__(self, block_modules: tuple[str, ...], leaf_modules=()):
        super().__init__()
        self.block_modules = block_modules
        self.is_family_leaf = leaf_predicate(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            return False
        if any(qualname == p or qualname.startswith(p + ".") for p in self.block_modules):
            return True
        own = qualname.removeprefix(ENTRY + ".")  # the user names modules of their model, not of the entry
        return self.is_family_leaf(m, own) or super().is_leaf_module(m, qualname)


def trace_fx(entry: Entry, blocks: list[Block], inputs: tuple, leaf_modules=()) -> fx.GraphModule:
    members = tuple(f"{ENTRY}.{m}" for b in blocks for m in b.members)
    graph = _BlockLeafTracer(members, leaf_modules).trace(entry)
    return fx.GraphModule(entry, graph)

def propagate_shapes(gm: fx.GraphModule, inputs: tuple) -> None:
    """Shapes of an fx graph's values (node.meta['val']), on fake inputs. The weights are real tensors here,
    so a graph that writes them in place must be refused before this runs (`refuse_weight_writes`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(t) for t in inputs])


def trace_export(entry: Entry, blocks: list[Block], inputs: tuple, leaf_modules=()) -> fx.GraphModule:
    """Identical blocks share one trace (`tracing/shared.py`); other models are traced block by block."""
    return trace_shared(entry, blocks, lambda: _export(entry, inputs)) or _export(entry, inputs)


def _export(entry: Entry, inputs: tuple) -> fx.GraphModule:
    # batch and sequence are dynamic; an image's channels and size are fixed by the model
    dims = tuple({0: torch.export.Dim.AUTO, **({1: torch.export.Dim.AUTO} if t.ndim == 2 else {})} for t in inputs)
    return exported_module(torch.export.export(entry, inputs, strict=False, dynamic_shapes=dims))


def exported_module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """An exported program as a graph to rewrite and to run under autocast, its nested graphs (export's no-grad
    regions) included:
    - export's input guards go: they check the original signature, which the passes change;
    - so do its dtype asserts (`drop_dtype_asserts`);
    - a product over a one-element axis becomes the multiply it is (exact). Rotary embeddings compute their
      angles that way with autocast turned off, a region transformers' `maybe_autocast` leaves out of a trace
      made without autocast; as a multiply, autocast leaves the angles in float32, as the model meant.
    """
    gm = program.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    for module in _graph_modules(gm):
        _drop_asserts(module.graph)
        for node in list(module.graph.nodes):
            if node.target in _PRODUCTS and _one_term(*node.args):
                with module.graph.inserting_after(node):
                    mul = module.graph.call_function(torch.ops.aten.mul.Tensor, node.args)
                mul.meta.update(node.meta)
                node.replace_all_uses_with(mul)
                module.graph.erase_node(node)
        module.recompile()
    return gm


def drop_dtype_asserts(gm: fx.GraphModule) -> None:
    """torch.export writes an `_assert_tensor_metadata` before each cast, pinning the dtype its input had in
    the trace. Autocast changes those dtypes by design (a float32 trace run under bf16 autocast), so they go,
    in nested graphs too."""
    for module in _graph_modules(gm):
        _drop_asserts(module.graph)
        module.recompile()


def _drop_asserts(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)


def _graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    return [m for m in gm.modules() if isinstance(m, fx.GraphModule)]


_PRODUCTS = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default, torch.ops.aten.mm.default}


def _one_term(a, b) -> bool:
    """Whether a @ b sums over one element: (..., n, 1) @ (..., 1, m), same dtype, so a * b is the same."""
    a, b = (x.meta.get("val") if isinstance(x, fx.Node) else None for x in (a, b))
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.ndim < 2 or b.ndim < 2:
        return False
    return a.dtype == b.dtype and is_concrete_int(a.shape[-1]) and a.shape[-1] == 1 and \
        is_concrete_int(b.shape[-2]) and b.shape[-2] == 1


def check_dynamic(gm: fx.GraphModule, inputs: tuple) -> None:
    """torch.export keeps a size static when the forward fixes it (a Python loop over the sequence, a cache):
    the graph would run at other sizes only by accident, or silently wrong (RWKV's CPU loop over 7 tokens)."""
    for node, t in zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs):
        val = node.meta.get("val")
        dynamic = [0] if t.ndim != 2 else [0, 1]
        # a specialised size may still be a SymInt whose expression is the example's size: is_concrete_int
        # sees through it
        fixed = [d for d in dynamic if isinstance(val, torch.Tensor) and is_concrete_int(val.shape[d])]
        if fixed:
            raise TraceError(f"torch.export specialised the model to its example input's "
                             f"{' and '.join(['batch size', 'sequence length'][d] for d in fixed)} "
                             f"{tuple(t.shape)}: something in its forward fixes that size (e.g. a loop over the "
                             "sequence, a cache or a shape-dependent branch), so its graph cannot run at other sizes")


FRONTENDS = {"fx": trace_fx, "export": trace_export}


def get_attr(module: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def has_attr(module: nn.Module, target: str) -> bool:
    try:
        get_attr(module, target)
        return True
    except AttributeError:
        return False


def strip_entry(gm: fx.GraphModule, alias: nn.Module) -> fx.Graph:
    """Make every attribute target relative to the model copy; export's own constants move onto it."""
    prefix = ENTRY + "."
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        if node.target.startswith(prefix) and has_attr(alias, node.target[len(prefix):]):
            node.target = node.target[len(prefix):]
        else:  # a constant torch.export lifted out of the code (a tensor literal), maybe inside a submodule
            value = get_attr(gm, node.target)
            name = "_calmgraph_" + node.target.replace(".", "_")
            if isinstance(value, torch.Tensor):
                alias.register_buffer(name, value, persistent=False)
            else:
                setattr(alias, name, value)
            node.target = name
    return gm.graph


def reason(e: Exception) -> str:
    first_line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first_line[:300]}"


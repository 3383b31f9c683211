"""Pass 1, trace: each model -> a torch.fx graph with its blocks' tap nodes and hidden size found.

Two front ends, tried in turn: a torch.fx `Tracer` that keeps each block's modules as leaves (a readable,
module-level graph) and `torch.export` (non-strict, dynamic batch and sequence; an ATen-level graph).
transformers models go to torch.export first (their mask builders defeat symbolic tracing).

The user's model is never traced itself: it is deep-copied with every parameter and buffer replaced by a
frozen alias of the same storage (no weight is copied, the user's `requires_grad` is not touched), without
the user's hooks, and the copy is put in eval mode.
"""
from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..blocks import Block, block_list_candidates, head_count
from ..errors import TraceError

ENTRY = "model"  # attribute under which the entry wrapper holds the model; stripped from node targets
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 7  # distinct sizes, so the tracer cannot mistake one for the other
# Modules that do shape arithmetic a symbolic tracer cannot follow; kept opaque by the fx front end.
FX_LEAF_CLASSES = ("AbsolutePositionalEmbedding", "ScaledSinusoidalEmbedding", "RotaryEmbedding", "BertEmbeddings")


@dataclass
class TracedModel:
    """One model as a graph: placeholders (input_ids[, attention_mask] or pixel_values) -> one tensor output."""

    name: str
    module: nn.Module          # the frozen alias copy; every get_attr/call_module target is relative to it
    graph: fx.Graph
    blocks: list[Block]
    taps: list[fx.Node]        # per block, the node holding the tapped hidden states (B, T, dim)
    dim: int
    heads: int | None
    frontend: str              # "fx" or "export"
    example: tuple             # the inputs it was traced with (input_ids[, attention_mask] or pixel_values)
    runs: list[int]            # per block, how many times it runs in one forward (more than 1: looped)

    def tap_runs(self, i: int, tap: str) -> tuple[int, int]:
        """(block, runs) behind tap i: block i itself, or with tap: input block i-1, whose output the tap
        reads (a looped predecessor leaves it unclear which of its runs feeds block i)."""
        if tap == "input" and i > 0 and self.runs[i - 1] > self.runs[i]:
            return i - 1, self.runs[i - 1]
        return i, self.runs[i]


HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def frozen_alias(model: nn.Module) -> nn.Module:
    """A structural copy of `model` sharing its weight storage; parameters frozen, user's flags untouched.
    The copy carries none of the user's forward/backward hooks: they would run (fx) or be baked in (export)
    inconsistently, and tracing would call them; the fused graph computes each model's plain forward."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.detach()
    alias = copy.deepcopy(model, memo)
    for module in alias.modules():  # the user's hooks stay on the user's model, not in the fused graph
        for attr in HOOK_DICTS:
            if isinstance(getattr(module, attr, None), dict):
                getattr(module, attr).clear()
    return alias.eval()


def model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def first_tensor(out):
    """The logits (or hidden states) in whatever a model returns: a tensor, an HF output, a tuple."""
    if isinstance(out, (torch.Tensor, fx.Proxy)):  # a Proxy while the fx front end traces
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, (torch.Tensor, fx.Proxy)):
            return value
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    raise TypeError(f"model returned {type(out).__name__}, in which no tensor was found")


def _call_kwargs(model: nn.Module) -> tuple[dict, str | None]:
    """Keyword arguments that turn a model's cache off, and the name under which it takes a padding mask."""
    params = inspect.signature(model.forward).parameters
    fixed = {"use_cache": False} if "use_cache" in params else {}
    mask_kw = next((k for k in ("attention_mask", "mask") if k in params), None)
    return fixed, mask_kw


class Entry(nn.Module):
    """forward(input_ids) -> one tensor, whatever the model returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        setattr(self, ENTRY, model)
        self.fixed_kwargs, _ = _call_kwargs(model)

    def forward(self, input_ids):
        return first_tensor(self.model(input_ids, **self.fixed_kwargs))


class PromptEntry(Entry):
    """forward(input_ids, attention_mask) -> one tensor; the padding mask reaches the model if it takes one."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        _, self.mask_kw = _call_kwargs(model)

    def forward(self, input_ids, attention_mask):
        kwargs = dict(self.fixed_kwargs)
        if self.mask_kw == "mask":  # x-transformers: boolean, True = attend
            kwargs["mask"] = attention_mask.bool()
        elif self.mask_kw is not None:
            kwargs[self.mask_kw] = attention_mask
        return first_tensor(self.model(input_ids, **kwargs))


class PixelEntry(Entry):
    """forward(pixel_values) -> one tensor: an image model (e.g. transformers' ViTModel) as a prompt augment."""

    def forward(self, pixel_values):
        return first_tensor(self.model(pixel_values=pixel_values, **self.fixed_kwargs))


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images a model reads, from its config or its own attributes."""
    for source in (getattr(model, "config", None), model):
        size = getattr(source, "image_size", None)
        channels = getattr(source, "num_channels", getattr(source, "channels", None))
        if isinstance(channels, int) and isinstance(size, int):
            return channels, size, size
        if isinstance(channels, int) and isinstance(size, (tuple, list)) and len(size) == 2:
            return channels, int(size[0]), int(size[1])
    raise TraceError(f"{type(model).__name__} reads pixel_values but says neither its image_size nor its "
                     "num_channels (config or attribute); set model.image_size and model.num_channels")


def example_inputs(model: nn.Module, prompt: bool, prompt_input: str = "input_ids") -> tuple[torch.Tensor, ...]:
    device = model_device(model)
    if prompt and prompt_input == "pixel_values":
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return (torch.zeros(EXAMPLE_BATCH, *image_shape(model), device=device, dtype=dtype),)
    ids = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ + prompt, dtype=torch.long, device=device)
    return (ids, torch.ones_like(ids)) if prompt else (ids,)


# -- front ends ---------------------------------------------------------------------------------------
class _BlockLeafTracer(fx.Tracer):
    def __init__(self, block_modules: tuple[str, ...]):
        super().__init__()
        self.block_modules = block_modules

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            return False
        if any(qualname == p or qualname.startswith(p + ".") for p in self.block_modules):
            return True
        return type(m).__name__ in FX_LEAF_CLASSES or super().is_leaf_module(m, qualname)


def trace_fx(entry: Entry, blocks: list[Block], inputs: tuple) -> fx.GraphModule:
    members = tuple(f"{ENTRY}.{m}" for b in blocks for m in b.members)
    graph = _BlockLeafTracer(members).trace(entry)
    return fx.GraphModule(entry, graph)


def propagate_shapes(gm: fx.GraphModule, inputs: tuple) -> None:
    """Shapes of an fx graph's values (node.meta['val']), on fake inputs. The weights are real tensors here,
    so a graph that writes them in place must be refused before this runs (`refuse_weight_writes`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(t) for t in inputs])


def trace_export(entry: Entry, blocks: list[Block], inputs: tuple) -> fx.GraphModule:
    # batch and sequence are dynamic; an image's channels and size are fixed by the model
    dims = tuple({0: torch.export.Dim.AUTO, **({1: torch.export.Dim.AUTO} if t.ndim == 2 else {})} for t in inputs)
    program = torch.export.export(entry, inputs, strict=False, dynamic_shapes=dims)
    gm = program.module()
    for node in list(gm.graph.nodes):  # export's input guards check the original signature; we change it
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    return gm


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


def frontend_order(model: nn.Module) -> list[str]:
    is_hf = type(model).__module__.startswith("transformers.")
    return ["export", "fx"] if is_hf else ["fx", "export"]


# -- taps ---------------------------------------------------------------------------------------------
def _in(node: fx.Node, members: tuple[str, ...]) -> bool:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if any(path == m or path.startswith(m + ".") for m in members):
            return True
    return False


def _hidden(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) and val.ndim == 3 and val.is_floating_point() else None


def _owners(graph: fx.Graph, blocks: list[Block]) -> dict[fx.Node, int]:
    """Node -> position of the block whose computation it is part of, for the nodes inside a block.
    One pass over the graph, so finding every block's output stays linear in the depth."""
    position = {f"{ENTRY}.{m}": i for i, b in enumerate(blocks) for m in b.members}
    owners = {}
    for node in graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            parts = path.split(".")
            hit = next((position[p] for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1)) if p in position), None)
            if hit is not None:
                owners[node] = hit
                break
    return owners


def block_outputs(graph: fx.Graph, blocks: list[Block]) -> list[fx.Node]:
    """For each block, the last node computed inside it that is read outside it: the block's output."""
    owners = _owners(graph, blocks)
    by_block: list[list[fx.Node]] = [[] for _ in blocks]
    for node, i in owners.items():
        by_block[i].append(node)
    outs = []
    for i, block in enumerate(blocks):
        inside = by_block[i]
        if not inside:
            raise TraceError(f"block {block.name!r} never runs in the model's forward, so its list is not the "
                             "model's transformer blocks")
        escaping = [n for n in inside if any(owners.get(u) != i for u in n.users)]
        # a block returning a tuple: its hidden states are element 0
        escaping = [next((u for u in n.users if getattr(u.target, "__name__", "") == "getitem" and u.args[1] == 0), n)
                    if _hidden(n) is None and n.op == "call_module" else n for n in escaping]
        hidden = [n for n in escaping if _hidden(n) is not None]
        if not hidden:
            shapes = [tuple(v.shape) if isinstance(v := n.meta.get("val"), torch.Tensor) else type(v).__name__
                      for n in escaping]
            raise TraceError(f"found no hidden states (batch, seq, dim) leaving block {block.name!r}; "
                             f"what leaves it: {shapes[:4]}")
        outs.append(hidden[-1])
    return outs


def block_runs(graph: fx.Graph, blocks: list[Block]) -> list[int]:
    """For each block, how many times it runs in one forward. A call of a module is one call_module node
    (fx front end: members are leaves) or one nn_module_stack key (torch.export keys each call apart:
    `...layers.1`, `...layers.1@1`). A member runs as often as the least-called module at or under it: a
    member that is a ModuleList (x-transformers' entries) is never called itself, and a submodule shared
    with later blocks (called more often) must not count as a rerun."""
    members = {f"{ENTRY}.{m}": i for i, b in enumerate(blocks) for m in b.members}

    def member_of(path: str) -> str | None:
        parts = path.split(".")
        return next((p for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1)) if p in members), None)

    calls: dict[str, dict[str, set]] = {m: {} for m in members}
    for node in graph.nodes:
        if node.op == "call_module" and (m := member_of(node.target)):
            calls[m].setdefault(node.target, set()).add(node.name)
            continue
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            if m := member_of(path):
                calls[m].setdefault(path, set()).add(key)
    runs = [0] * len(blocks)
    for m, i in members.items():
        if calls[m]:
            runs[i] = max(runs[i], min(len(c) for c in calls[m].values()))
    return runs


def block_inputs(graph: fx.Graph, blocks: list[Block], outputs: list[fx.Node]) -> list[fx.Node]:
    """For each block, the hidden states it reads: the previous block's output, or for the first block
    the value from outside it with the shape of its output (the embeddings)."""
    members = tuple(f"{ENTRY}.{m}" for m in blocks[0].members)
    dim = _hidden(outputs[0]).shape[-1]
    feeding = [a for n in graph.nodes if _in(n, members) for a in n.all_input_nodes
               if not _in(a, members) and _hidden(a) is not None and _hidden(a).shape[-1] == dim]
    if not feeding:
        raise TraceError(f"found no hidden states entering block {blocks[0].name!r}")
    order = {n: i for i, n in enumerate(graph.nodes)}
    return [max(feeding, key=order.__getitem__), *outputs[:-1]]


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
            value = _get_attr(module, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else None
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


def check_layout(graph: fx.Graph, blocks: list[Block], taps: list[fx.Node], tokens: bool) -> None:
    """A tap must hold one vector per input token, batch first: (batch, seq, dim) with the input's batch and
    (for token inputs) its length. Cross-attention masks (causal, padding) index the tap's positions as the
    input's tokens. An image model's sequence (its patches) is its own."""
    example = next(n for n in graph.nodes if n.op == "placeholder").meta["val"]
    want = tuple(example.shape[:2]) if tokens else (example.shape[0],)
    for block, tap in zip(blocks, taps):
        got = tuple(tap.meta["val"].shape)
        if not all(statically_known_true(g == w) for g, w in zip(got, want)):
            raise TraceError(
                f"block {block.name!r} passes on hidden states of shape {got}, not (batch, seq, dim) with the "
                f"input's {'batch and sequence length' if tokens else 'batch'} {want}: a tap must hold one vector "
                "per token, batch first (e.g. XLNet keeps (seq, batch, dim); ProphetNet concatenates its n-gram "
                "streams along the sequence), so cross-attention cannot line its positions up with the tokens")


def _get_attr(module: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _has_attr(module: nn.Module, target: str) -> bool:
    try:
        _get_attr(module, target)
        return True
    except AttributeError:
        return False


def _strip_entry(gm: fx.GraphModule, alias: nn.Module) -> fx.Graph:
    """Make every attribute target relative to the model copy; export's own constants move onto it."""
    prefix = ENTRY + "."
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        if node.target.startswith(prefix) and _has_attr(alias, node.target[len(prefix):]):
            node.target = node.target[len(prefix):]
        else:  # a constant torch.export lifted out of the code (a tensor literal), maybe inside a submodule
            value = _get_attr(gm, node.target)
            name = "_calmgraph_" + node.target.replace(".", "_")
            if isinstance(value, torch.Tensor):
                alias.register_buffer(name, value, persistent=False)
            else:
                setattr(alias, name, value)
            node.target = name
    return gm.graph


def _reason(e: Exception) -> str:
    first_line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first_line[:300]}"


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


def trace_model(name: str, model: nn.Module, blocks: list[Block], *, prompt: bool, tap: str,
                prompt_input: str = "input_ids") -> TracedModel:
    inputs = example_inputs(model, prompt, prompt_input)
    alias = frozen_alias(model)
    entry = (Entry if not prompt else PixelEntry if prompt_input == "pixel_values" else PromptEntry)(alias)
    reasons = {}
    for frontend in frontend_order(model):
        try:
            gm = FRONTENDS[frontend](entry, blocks, inputs)
        except Exception as e:  # noqa: BLE001 - every front end's reason goes into the final error
            reasons[frontend] = _reason(e)
            continue
        refuse_weight_writes(gm, name, model)  # the model's own doing: another front end would not undo it
        try:
            if frontend == "export":
                check_dynamic(gm, inputs)
            else:
                propagate_shapes(gm, inputs)
            outputs = block_outputs(gm.graph, blocks)
            taps = outputs if tap == "output" else block_inputs(gm.graph, blocks, outputs)
            check_layout(gm.graph, blocks, taps, tokens=not (prompt and prompt_input == "pixel_values"))
            runs = block_runs(gm.graph, blocks)  # before the targets lose their entry prefix
            break
        except Exception as e:  # noqa: BLE001
            reasons[frontend] = _reason(e)
    else:
        detail = "\n".join(f"  - {k}: {v}" for k, v in reasons.items())
        raise TraceError(
            f"could not trace model {name!r} ({type(model).__name__}) with any front end:\n{detail}\n"
            "hint: a model must run as model(input_ids) (prompt augments: also attention_mask=; image prompts: "
            "model(pixel_values=...)) and return a tensor, an HF output or a tuple, and each block must return "
            f"(batch, seq, dim) hidden states; name its block list with `blocks:` if the wrong one was picked "
            f"(blocks used: {blocks[0].name.rpartition('.')[0] or blocks[0].name}; lists found: "
            f"{', '.join(block_list_candidates(model)[:5]) or 'none'})")
    graph = _strip_entry(gm, alias)
    return TracedModel(name, alias, graph, blocks, taps, int(_hidden(taps[0]).shape[-1]),
                       head_count(alias, blocks), frontend, inputs, runs)

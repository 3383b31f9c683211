"""Pass 3, merge: every model's graph -> ONE graph, each model namespaced under its name.

Node names get the model's name as prefix (`kv_add_7`), attribute targets its submodule (`kv.transformer...`).
The fused inputs are the composition's `InputSignature` (signature.py): `input_ids`, each prompt's ids (or
pixel values), then the token prompts' optional masks.
The fused output: the anchor's output.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from ..errors import InputError
from ..graph import build_order
from ..plan import MODEL_KEY
from ..signature import InputSignature
from ..spec import CompositionSpec
from ..tracing.entry import ENTRY
from .base import CompileState, Merged, Pass, PassResult, TracedModel


ID_DTYPES = (torch.int64, torch.int32)  # what an embedding lookup takes


def check_token_ids(input_ids: torch.Tensor, name: str, vocab: int | None = None,
                    positions: int | None = None) -> torch.Tensor:
    """Call-time check of a token-id input (the graph's first node for each input): its shape and dtype, and
    that every id is in [0, vocab). Eager, the ids are checked on the host (a clear error, and on a GPU no
    device-side assert that would end the process's CUDA context); compiled or exported, by
    `torch._assert_async` inside the graph (torch ops only: the artifact runs without calmgraph)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype not in ID_DTYPES:
        got = (f"a {tuple(input_ids.shape)} {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise InputError(f"{name} must be a (batch, seq) tensor of int64 (or int32) token ids; got {got}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InputError(f"{name} is empty {tuple(input_ids.shape)}; give at least one sequence of at least one token")
    if positions is not None and input_ids.shape[1] > positions:
        raise InputError(f"{name} has {input_ids.shape[1]} tokens but the models reading it have {positions} "
                         f"positions; shorten or split the sequence")
    if vocab is not None:
        _check_range(input_ids, name, vocab)
    return input_ids


def _check_range(input_ids: torch.Tensor, name: str, vocab: int) -> None:
    inside = ((input_ids >= 0) & (input_ids < vocab)).all()
    if _symbolic(input_ids):
        torch._assert_async(inside, f"{name} holds token ids outside the vocabulary [0, {vocab})")
    elif not inside:
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab)]
        raise InputError(f"{name} holds token ids outside the vocabulary [0, {vocab}) of the models reading it "
                         f"(e.g. {int(bad[0])}, {int(bad.numel())} in all); map them into the vocabulary")


def _symbolic(t: torch.Tensor) -> bool:
    """Whether t's values cannot be read on the host now: compiling, exporting, or shapes only (fake, meta)."""
    return torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t)


def check_pixel_values(pixel_values: torch.Tensor, name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Call-time check of an image input: (batch, channels, height, width), floating point."""
    if (not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point()
            or tuple(pixel_values.shape[1:]) != shape):
        got = (f"a {tuple(pixel_values.shape)} {pixel_values.dtype} tensor" if isinstance(pixel_values, torch.Tensor)
               else type(pixel_values).__name__)
        raise InputError(f"{name} must be a floating (batch, {', '.join(map(str, shape))}) tensor of images; got {got}")
    if pixel_values.shape[0] == 0:
        raise InputError(f"{name} is an empty batch; give at least one image")
    return pixel_values


def prompt_mask(input_ids: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """The padding mask of a prompt (1 = token, 0 = padding); all ones when none is given."""
    if mask is None:
        return torch.ones_like(input_ids)
    return _binary(input_ids, mask, name, "its input ids", "", ("padding", "token"))


def write_mask(input_ids: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """Where the `writes: masked` blocks add their output (1) and where not (0), per token of input_ids."""
    return _binary(input_ids, mask, name, "input_ids", ": 1 where the masked blocks write, 0 where not",
                   ("no write", "write"))


def _binary(input_ids, mask, name: str, of: str, meaning: str, words: tuple[str, str]) -> torch.Tensor:
    """`mask`, checked: a real tensor of input_ids' shape holding only 0 and 1."""
    if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape or mask.is_complex():
        got = f"a {tuple(mask.shape)} {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"{name} must be a real tensor of the shape of {of} {tuple(input_ids.shape)}{meaning}; got {got}")
    binary = ((mask == 0) | (mask == 1)).all()
    if _symbolic(mask):
        torch._assert_async(binary, f"{name} must hold only 0 ({words[0]}) and 1 ({words[1]})")
    elif not binary:
        raise InputError(f"{name} must hold only 0 ({words[0]}) and 1 ({words[1]}); got other values such as "
                         f"{mask[(mask != 0) & (mask != 1)][0].item()}")
    return mask


EMBEDDINGS = (torch.ops.aten.embedding.default, torch.embedding)  # (weight, ids, ...)
LOOKS = 4  # how many ops (a view, a cast) may stand between a model's ids and its embedding lookup


def token_limits(spec: CompositionSpec, traced: dict[str, TracedModel]) -> dict[str | None, tuple]:
    """Per ids input (None: the shared sequence, else a token prompt's owner): the smallest vocabulary and the
    fewest positions of the models reading it; None where no model says."""
    limits: dict[str | None, tuple] = {}
    for m in spec.models:
        if m.reads == "pixels":
            continue
        key = m.name if m.is_prompt else None
        vocab, positions = limits.get(key, (None, None))
        limits[key] = (_least(vocab, vocabulary(traced[m.name])), _least(positions, max_positions(traced[m.name].module)))
    return limits


def _least(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def vocabulary(model: TracedModel) -> int | None:
    """The rows of the embedding the model looks its ids up in, found in its graph (near its ids input), else
    from `get_input_embeddings()` (transformers)."""
    ids = next(n for n in model.graph.nodes if n.op == "placeholder")
    frontier, seen = [ids], {ids}
    for _ in range(LOOKS):
        nxt = []
        for node in frontier:
            for user in node.users:
                rows = _embedding_rows(model.module, user, node)
                if rows is not None:
                    return rows
                if (user not in seen and user.op in ("call_function", "call_method") and user.args
                        and user.args[0] is node and user.target not in (getattr, torch.ops.aten.sym_size.int)):
                    seen.add(user)
                    nxt.append(user)
        frontier = nxt
    embed = getattr(model.module, "get_input_embeddings", None)
    table = embed() if callable(embed) else None
    return table.num_embeddings if isinstance(table, nn.Embedding) else None


def _embedding_rows(module: nn.Module, node: fx.Node, ids: fx.Node) -> int | None:
    if node.op == "call_module":
        sub = module.get_submodule(node.target)
        return sub.num_embeddings if isinstance(sub, nn.Embedding) and node.args[:1] == (ids,) else None
    if node.op != "call_function":
        return None
    if node.target in EMBEDDINGS and node.args[1:2] == (ids,):
        weight = node.args[0]
    elif node.target is F.embedding and node.args[:1] == (ids,):
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    else:
        return None
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return int(_attr(module, weight.target).shape[0])
    val = getattr(weight, "meta", {}).get("val")
    return int(val.shape[0]) if isinstance(val, torch.Tensor) else None


def _attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def max_positions(module: nn.Module) -> int | None:
    """The longest sequence a model says it takes: transformers' `config.max_position_embeddings`, nanoGPT's
    `config.block_size`, x-transformers' (and the demo's) `max_seq_len`."""
    config = getattr(module, "config", None)
    for value in (getattr(config, "max_position_embeddings", None), getattr(config, "block_size", None),
                  getattr(module, "max_seq_len", None)):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def inline(graph: fx.Graph, model_graph: fx.Graph, name: str, inputs) -> tuple[dict[fx.Node, fx.Node], fx.Node]:
    """Copy one model's graph into `graph`, namespaced under `name` (its node names and attribute targets);
    its placeholders read `inputs`, in order. Returns the node map and the node holding its output."""
    env: dict[fx.Node, fx.Node] = {}
    placeholders, out = iter(inputs), None
    for node in model_graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "output":
            out = node.args[0]
            while isinstance(out, (tuple, list)) and len(out) == 1:  # torch.export flattens outputs
                out = out[0]
            out = env[out]
        else:
            target = f"{name}.{node.target}" if node.op in ("get_attr", "call_module") else node.target
            new = graph.create_node(node.op, target, fx.node.map_arg(node.args, env.__getitem__),
                                    fx.node.map_arg(node.kwargs, env.__getitem__),
                                    name=f"{name}_{node.name.removeprefix(ENTRY + '_')}", type_expr=node.type)
            new.meta = {**node.meta, MODEL_KEY: name}
            env[node] = new
    return env, out


def merge(spec: CompositionSpec, traced: dict[str, TracedModel], order: list[str],
          signature: InputSignature) -> Merged:
    graph = fx.Graph()
    root = nn.Module()
    # Inputs in the signature's order: every required one, then the optional masks (Python's argument order).
    raw = {i.name: graph.placeholder(i.name, default_value=None) if not i.required else graph.placeholder(i.name)
           for i in signature.inputs}
    checked = {}
    for i in signature.inputs:
        if i.kind == "ids":
            checked[i.owner] = graph.call_function(check_token_ids, (raw[i.name], i.name, i.vocab, i.positions))
        elif i.kind == "pixels":
            checked[i.owner] = graph.call_function(check_pixel_values, (raw[i.name], i.name, i.image))
    merged = Merged(graph, root, {}, {})
    for i in signature.inputs:
        if i.kind == "mask" and i.owner is None:
            merged.write_mask = graph.call_function(write_mask, (checked[None], raw[i.name], i.name))
        elif i.kind == "mask":
            merged.masks[i.owner] = graph.call_function(prompt_mask, (checked[i.owner], raw[i.name], i.name))

    for name in order:
        model = traced[name]
        root.add_module(name, model.module)
        key = name if spec.model(name).is_prompt else None
        inputs = [checked[key], merged.masks[name]] if name in merged.masks else [checked[key]]
        env, merged.outputs[name] = inline(graph, model.graph, name, inputs)
        merged.taps[name] = [env[n] for n in model.taps]

    graph.output(merged.outputs[spec.anchor.name])
    return merged


class Merge(Pass):
    """Every model's graph -> one graph, namespaced per model; the fused inputs from the signature."""

    requires = ("traced",)
    ensures = ("merged", "order", "signature")

    def call(self, state: CompileState) -> PassResult:
        state.order = build_order(state.spec)
        images = {a.name: state.traced[a.name].example[0] for a in state.spec.prompts if a.reads == "pixels"}
        state.signature = InputSignature.of(state.spec, images, token_limits(state.spec, state.traced))
        state.merged = merge(state.spec, state.traced, state.order, state.signature)
        return PassResult(state, True)

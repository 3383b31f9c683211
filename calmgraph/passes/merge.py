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

from ..errors import InputError
from ..graph import build_order
from ..plan import MODEL_KEY
from ..signature import InputSignature
from ..spec import CompositionSpec
from ..tracing.entry import ENTRY
from .base import CompileState, Merged, Pass, PassResult, TracedModel


def check_token_ids(input_ids: torch.Tensor, name: str) -> torch.Tensor:
    """Call-time check of a token-id input (the graph's first node for each input)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        got = (f"a {tuple(input_ids.shape)} {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor)
               else type(input_ids).__name__)
        raise InputError(f"{name} must be a (batch, seq) tensor of integer token ids; got {got}")
    return input_ids


def check_pixel_values(pixel_values: torch.Tensor, name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """Call-time check of an image input: (batch, channels, height, width), floating point."""
    if (not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point()
            or tuple(pixel_values.shape[1:]) != shape):
        got = (f"a {tuple(pixel_values.shape)} {pixel_values.dtype} tensor" if isinstance(pixel_values, torch.Tensor)
               else type(pixel_values).__name__)
        raise InputError(f"{name} must be a floating (batch, {', '.join(map(str, shape))}) tensor of images; got {got}")
    return pixel_values


def prompt_mask(input_ids: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """The padding mask of a prompt (1 = real token); all ones when none is given."""
    if mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"{name} must have the shape of its input ids {tuple(input_ids.shape)}; got {got}")
    return mask


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
            checked[i.owner] = graph.call_function(check_token_ids, (raw[i.name], i.name))
        elif i.kind == "pixels":
            checked[i.owner] = graph.call_function(check_pixel_values, (raw[i.name], i.name, i.image))
    merged = Merged(graph, root, {}, {})
    for i in signature.inputs:
        if i.kind == "mask":
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
        state.signature = InputSignature.of(state.spec, images)
        state.merged = merge(state.spec, state.traced, state.order, state.signature)
        return PassResult(state, True)

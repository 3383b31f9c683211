"""Pass 3, merge: every model's graph -> ONE graph, each model namespaced under its name.

Node names get the model's name as prefix (`kv_add_7`), attribute targets its submodule (`kv.transformer...`).
The fused inputs: `input_ids` (the anchor and shared augments), then per prompt augment `<name>_input_ids`
(or `<name>_pixel_values` for an image prompt), then per token prompt an optional `<name>_mask`.
The fused output: the anchor's output.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import InputError
from ..spec import CompositionSpec
from .trace import ENTRY, TracedModel

MODEL_KEY = "calmgraph_model"  # node.meta key: which model a node came from


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


@dataclass
class Merged:
    graph: fx.Graph
    root: nn.Module                              # holds each model's frozen copy under its name
    taps: dict[str, list[fx.Node]]               # per model, per block: tap node in the fused graph
    outputs: dict[str, fx.Node]                  # per model: its output node (the anchor's is the result)
    masks: dict[str, fx.Node] = field(default_factory=dict)  # per prompt augment: its padding mask
    input_names: list[str] = field(default_factory=list)


def merge(spec: CompositionSpec, traced: dict[str, TracedModel], order: list[str]) -> Merged:
    graph = fx.Graph()
    root = nn.Module()
    prompts = [a.name for a in spec.augments if a.input == "prompt"]
    images = {a.name for a in spec.augments if a.input == "prompt" and a.prompt_input == "pixel_values"}
    tokens = [name for name in prompts if name not in images]

    # Inputs first: every required one, then the optional masks (Python's argument order).
    raw = {None: graph.placeholder("input_ids")}
    raw.update({name: graph.placeholder(f"{name}_{'pixel_values' if name in images else 'input_ids'}")
                for name in prompts})
    raw_masks = {name: graph.placeholder(f"{name}_mask", default_value=None) for name in tokens}
    ids = {key: (graph.call_function(check_pixel_values, (node, node.name, tuple(traced[key].example[0].shape[1:])))
                 if key in images else graph.call_function(check_token_ids, (node, node.name)))
           for key, node in raw.items()}
    merged = Merged(graph, root, {}, {}, input_names=[n.name for n in (*raw.values(), *raw_masks.values())])
    for name in tokens:
        merged.masks[name] = graph.call_function(prompt_mask, (ids[name], raw_masks[name], f"{name}_mask"))

    for name in order:
        model = traced[name]
        root.add_module(name, model.module)
        inputs = [ids[name], merged.masks[name]] if name in tokens else [ids[name if name in images else None]]
        env, merged.outputs[name] = inline(graph, model.graph, name, inputs)
        merged.taps[name] = [env[n] for n in model.taps]

    graph.output(merged.outputs[spec.anchor.name])
    return merged

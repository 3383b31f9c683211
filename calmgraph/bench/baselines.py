"""What the fused graph is measured against, on the same models and cross-attention blocks: the sum of its
parts, the seed's hook-based wiring, and the fused graph without its call-time input checks."""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ._internals import (ROOT, WRITE_MASK, ComposedModel, Entry, ModelError, PromptEntry, build_order,
                         check_token_ids, find_blocks, frozen_alias, masked, prompt_mask, write_mask)
from .inputs import forward_inputs


class _Stop(Exception):
    """Raised by a forward hook to end a model's forward after a given block."""


def _hook_module(model: nn.Module, member: str) -> nn.Module:
    """The module whose call produces a block's output. An x-transformers entry is a ModuleList that its
    owner iterates (never calls): its last child, the residual, returns the block's output."""
    module = model.get_submodule(member)
    while isinstance(module, nn.ModuleList):
        module = module[-1]
    return module


def _entry(model: nn.Module, prompt: bool) -> nn.Module:
    return PromptEntry(model) if prompt else Entry(model)


def _model_inputs(name: str, prompt: bool, inputs: dict[str, torch.Tensor]) -> tuple:
    if prompt:
        ids = inputs[f"{name}_input_ids"]
        mask = inputs.get(f"{name}_mask")
        return ids, torch.ones_like(ids) if mask is None else mask
    return (inputs["input_ids"],)


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_hidden(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


class HookComposition:
    """The composition wired with forward hooks on (aliases of) the user's models, as the seed did: every
    model runs in full, source states are recorded in a dict, target blocks add the cross-attention deltas
    of the fused model's own blocks. Computes what the fused graph computes (blocks with tap="output")."""

    def __init__(self, composed: ComposedModel, models: dict[str, nn.Module]):
        spec = composed.spec
        self.order = build_order(spec)
        self.prompts = {a.name for a in spec.augments if a.is_prompt}
        self.entries = {n: _entry(frozen_alias(models[n]), n in self.prompts) for n in self.order}
        self.states: dict[tuple[str, int], torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        sources = {(l.source, l.source_layer) for l in composed.links}
        for name in self.order:
            if spec.model(name).tap != "output":
                raise ModelError(f"the hook baseline taps block outputs only; {name!r} has tap: input")
            model = self.entries[name].model
            for block in find_blocks(model, spec.model(name).blocks):
                into = [(l, composed.get_submodule(".".join((ROOT, *l.module_path)))) for l in composed.links
                        if l.target == name and l.target_layer == block.index]
                if into or (name, block.index) in sources:
                    _hook_module(model, block.members[-1]).register_forward_hook(self._hook(name, block.index, into))

    def _hook(self, name: str, layer: int, into: list):
        def hook(module, args, out):
            h = _hidden(out)
            total = h
            for link, block in into:  # every delta reads the block's own output; summed in link order
                context = self.states[link.source, link.source_layer]
                extra = (self.masks[link.source],) if link.source in self.masks else ()
                delta = block(h, context, *extra)
                total = total + (masked(delta, self.write) if link.config.writes == "masked" else delta)
            self.states[name, layer] = total
            return _replace_hidden(out, total) if into else None
        return hook

    def __call__(self, **inputs):
        self.states.clear()
        self.write = inputs.get(WRITE_MASK)
        for name in self.prompts:
            self.masks[name] = _model_inputs(name, True, inputs)[1]
        for name in self.order:
            out = self.entries[name](*_model_inputs(name, name in self.prompts, inputs))
        self.states.clear()
        return out


class Parts:
    """The sum of the parts: each model alone (augments stopped after their deepest tapped block) and the
    cross-attention blocks alone on the very states they read in the fused graph."""

    def __init__(self, composed: ComposedModel, models: dict[str, nn.Module], inputs: dict[str, torch.Tensor]):
        spec = composed.spec
        self.prompts = {a.name for a in spec.augments if a.is_prompt}
        self.entries = {m.name: _entry(frozen_alias(models[m.name]), m.name in self.prompts) for m in spec.models}
        self.deepest = {a.name: max(l.source_layer for l in composed.links if l.source == a.name) for a in spec.augments}
        for name, layer in self.deepest.items():
            model = self.entries[name].model
            block = find_blocks(model, spec.model(name).blocks)[layer]
            _hook_module(model, block.members[-1]).register_forward_hook(_raise_stop)
        self.anchor = spec.anchor.name
        self.blocks = self._capture(composed, inputs)

    @staticmethod
    def _capture(composed: ComposedModel, inputs) -> list[tuple[nn.Module, tuple]]:
        captured, handles = [], []
        for link in composed.links:
            block = composed.get_submodule(".".join((ROOT, *link.module_path)))
            handles.append(block.register_forward_pre_hook(lambda m, args: captured.append((m, args))))
        with torch.no_grad():
            composed(**inputs)
        for h in handles:
            h.remove()
        return captured

    def model(self, name: str, inputs) -> None:
        try:
            self.entries[name](*_model_inputs(name, name in self.prompts, inputs))
        except _Stop:
            pass

    def cross_attention(self) -> None:
        for block, args in self.blocks:
            block(*args)

    def functions(self, inputs) -> dict[str, Callable[[], object]]:
        parts = {f"parts.{name}": (lambda n=name: self.model(n, inputs)) for name in self.entries}
        return {**parts, "parts.cross_attention": self.cross_attention}

    def __call__(self, **inputs) -> None:
        for name in self.entries:
            self.model(name, inputs)
        self.cross_attention()


def _raise_stop(module, args, out):
    raise _Stop


def without_checks(composed: ComposedModel) -> fx.GraphModule:
    """The fused graph with its call-time input checks removed: token ids pass straight through and a
    prompt mask is used as given (ones when none), a write mask as given. To measure what the checks cost."""
    graph = copy.deepcopy(composed.graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is check_token_ids:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is write_mask:
            node.replace_all_uses_with(node.args[1])
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is prompt_mask:
            node.target, node.args = _mask_unchecked, node.args[:2]
    graph.lint()
    return fx.GraphModule(composed, graph)


def _mask_unchecked(input_ids, mask):
    return torch.ones_like(input_ids) if mask is None else mask


def input_checks_us(composed: ComposedModel, inputs: dict[str, torch.Tensor], calls: int = 2000) -> float:
    """Host time (us) the fused graph's call-time input checks take per forward, timed alone: too small
    for the difference of two forward timings to resolve. Eager, each check reads its input's values on the
    host (ids in the vocabulary, masks binary): on a GPU, one device-to-host sync per checked input."""
    env = {n: inputs.get(n.target) for n in composed.graph.nodes if n.op == "placeholder"}
    checks = [n for n in composed.graph.nodes
              if n.op == "call_function" and n.target in (check_token_ids, prompt_mask, write_mask)]

    def run():
        for n in checks:
            env[n] = n.target(*fx.node.map_arg(n.args, env.__getitem__))
    run()
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return 1e6 * (time.perf_counter() - started) / calls


def train_step(model: Callable, inputs: dict[str, torch.Tensor], params: list[nn.Parameter]) -> None:
    """Forward, next-token loss, backward into the cross-attention parameters (no optimiser step)."""
    logits = model(**forward_inputs(inputs))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), inputs["input_ids"][:, 1:].flatten())
    loss.backward()
    for p in params:
        p.grad = None

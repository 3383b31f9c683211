"""The compiled composition: one torch.fx.GraphModule, plus what it was built from."""
from __future__ import annotations

from typing import Iterator

import torch.fx as fx
import torch.nn as nn

from .passes.device import retarget_module
from .passes.prune import PruneReport
from .passes.resolve import Link
from .passes.splice import ROOT
from .spec import CompositionSpec


class ComposedModel(fx.GraphModule):
    """`composed(input_ids, <augment>_input_ids=..., <augment>_mask=...) -> anchor logits (B, T, vocab)`;
    an image prompt augment takes `<augment>_pixel_values=` (B, C, H, W) instead.

    Each model lives under its spec name (`composed.base`, `composed.kv`), sharing the user's weight
    storage through frozen parameters; the new cross-attention blocks live under `composed.xattn`.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, *, spec: CompositionSpec, links: list[Link],
                 pruned: PruneReport, frontends: dict[str, str], input_names: list[str]):
        super().__init__(root, graph, class_name="ComposedModel")
        self.spec = spec
        self.links = links
        self.pruned = pruned
        self.frontends = frontends
        self.input_names = input_names
        self.taps: dict = {}                       # per model: its TapPoints (index, block name, hidden size)
        self.compile_seconds: float | None = None
        # The anchor as a module (the frozen alias of the user's), which generation traces again with a KV
        # cache (`passes/decode.py`). Held in a tuple so nn.Module does not adopt it: no weight counted twice.
        self._anchor_model: tuple[nn.Module | None] = (None,)

    @property
    def anchor_model(self) -> nn.Module | None:
        return self._anchor_model[0]

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.cpu()`...: the graph's device constants follow the parameters (`passes/device.py`)."""
        super()._apply(fn, recurse)
        device = next((t.device for t in (*self.parameters(), *self.buffers())), None)
        if device is not None:
            retarget_module(self, device)
        return self

    def new_parameters(self) -> Iterator[nn.Parameter]:
        """The only trainable parameters: those of the cross-attention blocks."""
        return self.get_submodule(ROOT).parameters()

    def named_new_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((f"{ROOT}.{n}", p) for n, p in self.get_submodule(ROOT).named_parameters())

    def train(self, mode: bool = True) -> "ComposedModel":
        """Only the new blocks change mode: the frozen models always run as in eval (no dropout)."""
        super().train(mode)
        for m in self.spec.models:
            if hasattr(self, m.name):
                getattr(self, m.name).eval()
        return self

    def loss(self, input_ids, label_mask=None, ignore_index: int = -100, **inputs):
        """Next-token cross-entropy of the anchor's logits; `label_mask` (B, T) picks the tokens scored."""
        from .train import next_token_loss
        return next_token_loss(self(input_ids, **inputs), input_ids, label_mask, ignore_index)

    def __deepcopy__(self, memo) -> "ComposedModel":
        copied = super().__deepcopy__(memo)  # a plain GraphModule: restore what makes it a composition
        composed = ComposedModel(copied, copied.graph, spec=self.spec, links=self.links, pruned=self.pruned,
                                 frontends=self.frontends, input_names=self.input_names)
        composed.taps, composed.compile_seconds = self.taps, self.compile_seconds
        composed._anchor_model = self._anchor_model  # shared: the decode graph takes the copy's own weights
        return composed

    def generate(self, input_ids, max_new_tokens: int, **kwargs):
        """Prompt followed by up to `max_new_tokens` new tokens; see `calmgraph.generate.generate`."""
        from .generate import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def export(self, path, format: str = "pt2", *, overwrite: bool = False):
        """Write a torch.export `.pt2` (or `format="onnx"`) with `<stem>.py` and `<stem>.spec.json` beside it;
        an existing file is replaced only with `overwrite=True`."""
        from .export import export
        return export(self, path, format, overwrite=overwrite)

    def save_new(self, path, *, overwrite: bool = False):
        """Save only the new parameters (safetensors) and the spec; load them with `cg.load_new`. An
        existing file is replaced only with `overwrite=True`."""
        from .checkpoint import save_new
        return save_new(self, path, overwrite=overwrite)

    def summary(self) -> str:
        from .report import summary
        return summary(self)

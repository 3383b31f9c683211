"""The compiled composition: one torch.fx.GraphModule, plus what it was built from."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn

from .device import dtype_constants, retarget_module
from .errors import CalmGraphError, InternalError, ModelError
from .passes.base import CompileState, PruneReport, TapPoint
from .plan import ROOT, Link
from .signature import InputSignature
from .sources import absolute_sources, cast_sources
from .spec import CompositionSpec
from .tracing.entry import frozen_alias


class ComposedModel(fx.GraphModule):
    """`composed(input_ids, <augment>_input_ids=..., <augment>_mask=...) -> anchor logits (B, T, vocab)`;
    an image prompt augment takes `<augment>_pixel_values=` (B, C, H, W) instead.

    Each model lives under its spec name (`composed.base`, `composed.kv`), sharing the user's weight
    storage through frozen parameters; the new cross-attention blocks live under `composed.xattn`.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, *, spec: CompositionSpec, links: list[Link],
                 pruned: PruneReport, frontends: dict[str, str], signature: InputSignature,
                 taps: dict[str, list[TapPoint]], models: dict[str, nn.Module] | None = None,
                 compile_seconds: float | None = None, compile_log: list[dict] | None = None,
                 source_dir: Path | None = None, recompile: Callable[..., "ComposedModel"] | None = None):
        super().__init__(root, graph, class_name="ComposedModel")
        self.spec = spec
        self.links = links                         # the cross-attention blocks that survived pruning
        self.pruned = pruned
        self.frontends = frontends                 # per model: "fx" or "export"
        self.signature = signature                 # the inputs, in order (signature.py)
        self.taps = taps                           # per model: its TapPoints (index, block name, hidden size)
        self.compile_seconds = compile_seconds
        self.compile_log = list(compile_log or [])  # per pass: its name, whether it changed the graph, seconds
        self.source_dir = source_dir               # where the spec's relative source paths start
        # (spec, models) -> the composition compiled again with this one's options: what a cast does (`_apply`)
        self._recompile = recompile
        # Each model as a module (the frozen alias of the user's), which generation traces again with a KV
        # cache (`generation/decode.py`). Held in a tuple so nn.Module does not adopt them: no weight counted twice.
        self._models: tuple[dict[str, nn.Module]] = (dict(models or {}),)

    @classmethod
    def from_state(cls, state: CompileState, compile_seconds: float | None = None,
                   recompile: Callable[..., "ComposedModel"] | None = None) -> "ComposedModel":
        """The composition a finished compile state describes (`compiler.PIPELINE`)."""
        return cls(state.module, state.module.graph, spec=state.spec, links=state.links, pruned=state.pruned,
                   frontends={n: t.frontend for n, t in state.traced.items()}, signature=state.signature,
                   taps={n: t.tap_points() for n, t in state.traced.items()},
                   models={n: t.module for n, t in state.traced.items()}, compile_seconds=compile_seconds,
                   compile_log=state.log, source_dir=state.source_dir, recompile=recompile)

    def __call__(self, *args, **kwargs):
        # Inputs by name before the generated forward sees them: an unknown, missing or doubled one is an
        # InputError naming what the composition takes (Python's TypeError would name only one). Plain Python
        # on names: torch.compile traces through it, and export keeps it out of the program.
        self.signature.check_call(args, kwargs)
        return super().__call__(*args, **kwargs)

    @property
    def input_names(self) -> list[str]:
        return self.signature.names

    @property
    def anchor_model(self) -> nn.Module | None:
        return self.traced_model(self.spec.anchor.name)

    def traced_model(self, name: str) -> nn.Module | None:
        """Model `name` as a module: the frozen alias of the user's that was traced (generation's decode
        graph traces it again with a KV cache)."""
        return self._models[0].get(name)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.cpu()`, `.half()`...: the graph's device constants follow the parameters
        (`device.py`). A cast of the models' weights to another floating dtype, where the graph holds the
        traced dtypes as constants (torch.export's), compiles the composition again from cast copies of its
        models (`_recompiled`): the cast graph would break at its first product."""
        to = self._cast_to(fn)
        if to is not None and dtype_constants(self):
            self._recompiled(fn, to)
        super()._apply(fn, recurse)
        device = next((t.device for t in (*self.parameters(), *self.buffers())), None)
        if device is not None:
            retarget_module(self, device)
        return self

    def _cast_to(self, fn) -> torch.dtype | None:
        """The floating dtype `fn` casts the models' weights to, where it changes theirs."""
        frozen = next((t for name, t in self.named_parameters()
                       if t.is_floating_point() and not name.startswith(f"{ROOT}.")), None)
        if frozen is None:
            return None
        try:   # what the call would cast to, on an empty tensor
            to = fn(torch.empty(0, dtype=frozen.dtype, device=frozen.device)).dtype
        except Exception:  # noqa: BLE001 - a function for other tensors (a wrapper's): let the call itself say
            return None
        return to if to != frozen.dtype else None

    def _recompiled(self, fn, to: torch.dtype) -> None:
        """Becomes the composition compiled, with the same options, from copies of its models with `fn`
        applied (their weights cast; the user's models keep theirs), its new blocks cast in place (the same
        parameter objects: an optimizer over them stays valid). Hooks, training mode and attributes of its
        own are kept; its spec names the dtype for its transformers sources (`cast_sources`), so that what it
        saves loads in that dtype. If the compile fails, it is a ModelError and nothing has changed."""
        # FSDP2's DTensors, DeepSpeed ZeRO-3's partitioned parameters: no whole weight to compile from
        if type(self).__name__.startswith("FSDP") or any(hasattr(p, "device_mesh") or hasattr(p, "ds_id")
                                                         for p in self.parameters()):
            raise ModelError(f"cannot cast a sharded composition to {to}: cast it before sharding it "
                             "(`parallel.shard`, DeepSpeed ZeRO-3), since a cast compiles it again from its models")
        if self._recompile is None:
            raise ModelError(f"cannot cast this composition to {to}: it was not made by `calmgraph.compile`, so "
                             "there is nothing to compile it again with; compile it from models in that dtype")
        models = {name: frozen_alias(model, fn) for name, model in self._models[0].items()}
        try:
            new = self._recompile(cast_sources(self.recorded_spec(), to), models)
        except CalmGraphError as e:
            raise ModelError(f"could not compile this composition again from its models cast to {to} (its graph "
                             f"holds the traced dtypes, so a cast compiles it again); nothing was cast: {e}") from e
        blocks = self.get_submodule(ROOT)
        if set(new.get_submodule(ROOT).state_dict()) != set(blocks.state_dict()):
            raise InternalError("a composition compiled again in another dtype has other new blocks")
        blocks._apply(fn)
        setattr(new, ROOT, blocks)
        own = {k: v for k, v in self.__dict__.items() if k not in new.__dict__ or "hook" in k}
        training = self.training
        self.__dict__.clear()
        self.__dict__.update({**new.__dict__, **own})
        self.__class__ = new.__class__   # fx gives each GraphModule a class of its own, holding its forward
        self.graph = new.graph           # the graph's owner is this module
        self.train(training)

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

    def __deepcopy__(self, memo) -> "ComposedModel":
        copied = super().__deepcopy__(memo)  # a plain GraphModule: restore what makes it a composition
        # the traced models are shared: the decode graph takes the copy's own weights (`generation/decode.py`)
        return ComposedModel(copied, copied.graph, spec=self.spec, links=self.links, pruned=self.pruned,
                             frontends=self.frontends, signature=self.signature, taps=self.taps,
                             models=self._models[0], compile_seconds=self.compile_seconds,
                             compile_log=self.compile_log, source_dir=self.source_dir,
                             recompile=self._recompile)

    def recorded_spec(self) -> CompositionSpec:
        """The spec with its relative source paths made absolute (where `compile` read them from): what
        `save_new`, FineTuner and `export` write, so that `cg.load` finds the models from any directory."""
        spec = self.spec if self.source_dir is None else absolute_sources(self.spec, self.source_dir)
        return self._named_blocks(spec)

    def _named_blocks(self, spec: CompositionSpec) -> CompositionSpec:
        """A `blocks:` callable has no written form: the spec records the blocks it chose, by name."""
        def named(m):
            return m.model_copy(update={"blocks": tuple(t.name for t in self.taps[m.name])}) if callable(m.blocks) else m
        if not any(callable(m.blocks) for m in spec.models):
            return spec
        return spec.model_copy(update={"anchor": named(spec.anchor), "augments": [named(a) for a in spec.augments]})

    # -- conveniences: each calls a module that does not import this one ------------------------------
    def loss(self, input_ids, label_mask=None, ignore_index: int = -100, **inputs):
        """Next-token cross-entropy of the anchor's logits; `label_mask` (B, T) picks the tokens scored."""
        from .train import next_token_loss
        return next_token_loss(self(input_ids, **inputs), input_ids, label_mask, ignore_index)

    def generate(self, input_ids, max_new_tokens: int | None = None, **kwargs):
        """Prompt followed by up to `max_new_tokens` new tokens; see `calmgraph.generation.generate.generate`."""
        from .generation.generate import generate
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

    def print_trainable_parameters(self) -> None:
        """Print new (trainable) over all parameters, as PEFT's `print_trainable_parameters` does."""
        from .report import trainable_parameters
        print(trainable_parameters(self))


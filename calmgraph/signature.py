"""The composed model's inputs, described once: name, kind, owner, and which dimensions are dynamic.

    input_ids              (batch, seq)          token ids of the anchor and of every shared augment
    <aug>_input_ids        (batch, prompt_seq)   a token prompt augment's own tokens
    <aug>_pixel_values     (batch, C, H, W)      an image prompt augment's images
    write_mask             (batch, seq)          where `writes: masked` blocks add (1) or not (0); only then
    <aug>_mask             (batch, prompt_seq)   a token prompt's padding mask (1 = token); optional

Required inputs come first, then the optional masks (Python's argument order). `merge` makes the fused
graph's placeholders from it; tracing, `verify`, `export`, `bench` and `generate` build their example
inputs and check a call's keywords with it, so they cannot disagree on the order or the shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch

from .errors import InputError

Kind = Literal["ids", "mask", "pixels"]
WRITE_MASK = "write_mask"
PROMPT_EXTRA = 2  # example prompts are this much longer than the anchor's sequence: no two sizes coincide


@dataclass(frozen=True)
class Input:
    name: str
    kind: Kind
    owner: str | None = None                    # the prompt augment it belongs to; None: the shared sequence
    required: bool = True
    image: tuple[int, int, int] | None = None    # (channels, height, width) of pixel values
    dtype: torch.dtype | None = None             # of pixel values: the image model's
    vocab: int | None = None                     # of token ids: the smallest vocabulary of the models reading them
    positions: int | None = None                 # of token ids: the fewest positions of those models, where known

    def example(self, batch: int, seq: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor of the input's shape: `seq` is the anchor's length (a prompt's is longer)."""
        if self.kind == "pixels":
            return torch.zeros(batch, *self.image, device=device, dtype=self.dtype or dtype)
        length = seq if self.owner is None else seq + PROMPT_EXTRA
        fill = torch.ones if self.kind == "mask" else torch.zeros
        return fill(batch, length, dtype=torch.long, device=device)

    @property
    def dynamic_dims(self) -> tuple[int, ...]:
        """Batch always; the sequence too for tokens (an image's size is the model's)."""
        return (0,) if self.kind == "pixels" else (0, 1)


@dataclass(frozen=True)
class InputSignature:
    inputs: tuple[Input, ...]

    @classmethod
    def of(cls, spec, images: dict[str, torch.Tensor] | None = None,
           limits: dict[str | None, tuple[int | None, int | None]] | None = None) -> "InputSignature":
        """The fused graph's inputs for `spec`; `images`: an example image batch of each image prompt;
        `limits`: (vocabulary, positions) of the ids each owner reads (None: the shared sequence)."""
        images, limits = images or {}, limits or {}
        first = [Input("input_ids", "ids", **_limits(limits, None))]
        for a in spec.prompts:
            if a.reads == "pixels":
                image = images[a.name]
                first.append(Input(f"{a.name}_pixel_values", "pixels", a.name, image=tuple(image.shape[1:]), dtype=image.dtype))
            else:
                first.append(Input(f"{a.name}_input_ids", "ids", a.name, **_limits(limits, a.name)))
        if writes_masked(spec):
            first.append(Input(WRITE_MASK, "mask"))
        masks = [Input(f"{a.name}_mask", "mask", a.name, required=False) for a in spec.prompts if a.reads == "prompt"]
        return cls((*first, *masks))

    @classmethod
    def of_model(cls, reads: str, image: tuple[int, int, int] | None = None,
                 dtype: torch.dtype | None = None) -> "InputSignature":
        """One model's own inputs when traced alone (`ModelSpec.reads`): `input_ids`, plus
        `attention_mask` for a token prompt; or `pixel_values`."""
        if reads == "pixels":
            return cls((Input("pixel_values", "pixels", "self", image=image, dtype=dtype),))
        if reads == "prompt":
            return cls((Input("input_ids", "ids", "self"), Input("attention_mask", "mask", "self")))
        return cls((Input("input_ids", "ids"),))

    def check_call(self, args: tuple, kwargs: dict) -> None:
        """Refuse a call with too many positional inputs, one given twice, an unknown or a missing one."""
        names = self.names
        if len(args) > len(names):
            raise InputError(f"{len(args)} positional inputs given; this composition takes at most {len(names)}: "
                             f"{', '.join(names)}")
        twice = [k for k in kwargs if k in names[:len(args)]]
        if twice:
            raise InputError(f"inputs {twice} given both by position and by keyword; give each once")
        self.check_keywords([*names[:len(args)], *kwargs], skip=())

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def __getitem__(self, name: str) -> Input:
        return next(i for i in self.inputs if i.name == name)

    def examples(self, batch: int, seq: int, device="cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        """Every input, in order (masks included, all ones): what export and the checks run on."""
        return tuple(i.example(batch, seq, device, dtype) for i in self.inputs)

    def dynamic_shapes(self, dim) -> tuple[dict, ...]:
        """torch.export's `dynamic_shapes`, with `dim` (e.g. `Dim.AUTO(min=1)`) for every dynamic size."""
        return tuple({d: dim for d in i.dynamic_dims} for i in self.inputs)

    def check_keywords(self, given: Iterable[str], *, skip: Iterable[str] = ("input_ids",)) -> None:
        """Refuse an unknown or a missing keyword input, naming the ones this composition takes."""
        given, skip = list(given), set(skip)
        accepted = [i.name for i in self.inputs if i.name not in skip]
        unknown = [k for k in given if k not in accepted]
        missing = [i.name for i in self.inputs if i.required and i.name not in skip and i.name not in given]
        if unknown or missing:
            parts = ([f"unknown inputs {unknown}"] if unknown else []) + ([f"missing inputs {missing}"] if missing else [])
            takes = ", ".join(f"{i.name}{'' if i.required else ' (optional)'}" for i in self.inputs)
            raise InputError(f"{'; '.join(parts)}; this composition takes {takes}")


def writes_masked(spec) -> bool:
    """Whether a block of `spec` writes only where the call's `write_mask` says (`writes: masked`)."""
    return any(spec.cross_attention_for(e).writes == "masked" for e in spec.edges)


def _limits(limits: dict, owner: str | None) -> dict:
    vocab, positions = limits.get(owner, (None, None))
    return {"vocab": vocab, "positions": positions}

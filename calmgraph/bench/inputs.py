"""Random inputs for every input of a fused graph, valid for every model that reads them."""
from __future__ import annotations

import torch
import torch.nn as nn

from ._internals import ComposedModel, ModelError, model_device


def vocab_size(model: nn.Module) -> int:
    """The size of the model's first token embedding (inputs are drawn below it)."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    raise ModelError(f"{type(model).__name__} has no nn.Embedding; cannot draw token ids for it")


def make_inputs(composed: ComposedModel, models: dict[str, nn.Module], *, batch: int, seq: int,
                prompt_len: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids for every input of the fused graph, valid for every model that reads them; the
    last prompt is padded past half its length so the masks matter."""
    spec, device = composed.spec, model_device(models[composed.spec.anchor.name])
    g = torch.Generator().manual_seed(seed)
    shared = [spec.anchor.name, *[a.name for a in spec.augments if a.input == "shared"]]
    inputs = {"input_ids": torch.randint(0, min(vocab_size(models[n]) for n in shared), (batch, seq + 1), generator=g)}
    for aug in spec.augments:
        if aug.input == "prompt":
            length = prompt_len or seq
            inputs[f"{aug.name}_input_ids"] = torch.randint(0, vocab_size(models[aug.name]), (batch, length), generator=g)
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[-1, length // 2:] = 0
            inputs[f"{aug.name}_mask"] = mask
    return {k: v.to(device) for k, v in inputs.items()}


def forward_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`make_inputs` holds seq + 1 tokens (for the training step's labels); a forward reads the first seq."""
    return {**inputs, "input_ids": inputs["input_ids"][:, :-1]}

"""Random inputs for every input of a fused graph, valid for every model that reads them."""
from __future__ import annotations

import torch
import torch.nn as nn

from ._internals import WRITE_MASK, ComposedModel, ModelError, model_device


def vocab_size(model: nn.Module) -> int:
    """The size of the model's first token embedding (inputs are drawn below it)."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    raise ModelError(f"{type(model).__name__} has no nn.Embedding; cannot draw token ids for it")


def make_inputs(composed: ComposedModel, models: dict[str, nn.Module], *, batch: int, seq: int,
                prompt_len: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every input of the fused graph (its `signature`), valid for every model that reads
    them; the last prompt is padded past half its length so the masks matter."""
    spec, device = composed.spec, model_device(models[composed.spec.anchor.name])
    g = torch.Generator().manual_seed(seed)
    shared = [m.name for m in spec.models if not m.is_prompt]
    length = prompt_len or seq
    inputs = {}
    for i in composed.signature.inputs:
        if i.kind == "pixels":
            inputs[i.name] = torch.randn(batch, *i.image, generator=g).to(i.dtype or torch.float32)
        elif i.kind == "mask" and i.owner is None:  # write_mask: the first half of each row written to
            inputs[i.name] = (torch.arange(seq + 1) < (seq + 1) // 2).long().expand(batch, -1).clone()
        elif i.kind == "mask":
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[-1, length // 2:] = 0
            inputs[i.name] = mask
        elif i.owner is None:  # the shared sequence, one token more for the training step's labels
            inputs[i.name] = torch.randint(0, min(vocab_size(models[n]) for n in shared), (batch, seq + 1), generator=g)
        else:
            inputs[i.name] = torch.randint(0, vocab_size(models[i.owner]), (batch, length), generator=g)
    return {k: v.to(device) for k, v in inputs.items()}


def forward_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`make_inputs` holds seq + 1 tokens (for the training step's labels); a forward reads the first seq."""
    return {**inputs, **{k: inputs[k][:, :-1] for k in ("input_ids", WRITE_MASK) if k in inputs}}

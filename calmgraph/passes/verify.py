"""Pass 6, verify: the fused graph is well formed and runs shape-correctly, checked on fake tensors
(no real compute, works for models on the `meta` device)."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import CalmGraphError
from .trace import EXAMPLE_BATCH, EXAMPLE_SEQ


def example_args(prompts: list[tuple], device: torch.device) -> list[torch.Tensor]:
    """The fused graph's inputs: anchor ids, each prompt's first input, then the token prompts' masks.
    prompts: per prompt augment (in spec order), the inputs its model was traced with. Token prompts are
    made 2 longer than the anchor's sequence, so that no shape can be mistaken for another."""
    ids = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.long, device=device)
    firsts, masks = [], []
    for example in prompts:
        if len(example) == 2:  # input_ids, attention_mask
            prompt = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ + 2, dtype=torch.long, device=device)
            firsts.append(prompt)
            masks.append(torch.ones_like(prompt))
        else:                  # pixel_values
            firsts.append(example[0])
    return [ids, *firsts, *masks]


def verify(gm: fx.GraphModule, args: list[torch.Tensor], expected_out: torch.Size) -> None:
    gm.graph.lint()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        out = FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(a) for a in args])
    except Exception as e:  # a bug in calmgraph, not the user's: say so plainly
        raise CalmGraphError(f"the fused graph failed its shape check: {type(e).__name__}: {e}") from e
    if tuple(out.shape[:-1]) != (EXAMPLE_BATCH, EXAMPLE_SEQ) or out.shape[-1] != expected_out[-1]:
        raise CalmGraphError(f"the fused graph returns shape {tuple(out.shape)}; the anchor returns {tuple(expected_out)}")

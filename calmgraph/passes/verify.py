"""Pass 6, verify: the fused graph is well formed and runs shape-correctly, checked on fake tensors
(no real compute, works for models on the `meta` device)."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import CalmGraphError
from .trace import EXAMPLE_BATCH, EXAMPLE_SEQ


def verify(gm: fx.GraphModule, n_prompts: int, device: torch.device, expected_out: torch.Size) -> None:
    gm.graph.lint()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    ids = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.long, device=device)
    prompt = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ + 2, dtype=torch.long, device=device)
    args = [ids, *[prompt] * n_prompts, *[torch.ones_like(prompt)] * n_prompts]
    try:
        out = FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(a) for a in args])
    except Exception as e:  # a bug in calmgraph, not the user's: say so plainly
        raise CalmGraphError(f"the fused graph failed its shape check: {type(e).__name__}: {e}") from e
    if tuple(out.shape[:-1]) != (EXAMPLE_BATCH, EXAMPLE_SEQ) or out.shape[-1] != expected_out[-1]:
        raise CalmGraphError(f"the fused graph returns shape {tuple(out.shape)}; the anchor returns {tuple(expected_out)}")

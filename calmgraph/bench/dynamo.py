"""The fused graph under torch.compile: graph breaks and recompiles."""
from __future__ import annotations

import torch
import torch.nn as nn

from .inputs import forward_inputs


def dynamo_report(composed: nn.Module, inputs: dict[str, torch.Tensor], other_seq: int, backend: str = "inductor") -> dict:
    """Graph breaks (torch._dynamo.explain) and recompiles of the fused graph under torch.compile: across
    calls with the same shapes, and when the sequence length changes once. Recompiles are decided by
    dynamo's guards, before any backend runs: backend="eager" counts them without inductor's compile time."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    with torch.no_grad():
        explained = dynamo.explain(composed)(**forward_inputs(inputs))
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(composed, backend=backend)
    fwd = forward_inputs(inputs)
    with torch.no_grad():
        compiled(**fwd)
        first = counters["stats"]["unique_graphs"]
        for _ in range(3):
            compiled(**fwd)
        same = counters["stats"]["unique_graphs"] - first
        shorter = {k: (v[:, :other_seq] if k == "input_ids" else v) for k, v in fwd.items()}
        compiled(**shorter)
        new_seq = counters["stats"]["unique_graphs"] - first - same
    dynamo.reset()
    return {"backend": backend, "graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "break_reasons": [str(r.reason) for r in explained.break_reasons],
            "recompiles_same_shapes": same, "recompiles_new_seq_len": new_seq}

"""Generation on a composition sharded with FSDP2 (`calmgraph.parallel.shard`): every rank generates for its
own prompts, as in data-parallel evaluation, through the recomputing path.

FSDP gathers a block's weights from every rank when the block runs, so each rank must run as many forwards
as the others, whatever its prompts, its `max_new_tokens` and the step at which its rows finish. Before each
forward the ranks agree (an all-reduce of one flag) whether any of them still decodes; a rank with nothing
left to decode runs a forward of one position and discards it, until none decodes.

Each step runs the composition's own forward, whose FSDP hooks gather the root's weights (embeddings,
heads, the cross-attention blocks) as the blocks' hooks gather theirs; the prompt augments rerun with it.

The KV-cache decode graphs are traced from whole models, so a sharded composition recomputes the sequence
at each step (each forward gathers every weight once).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..signature import WRITE_MASK

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def forward_of(composed, prompts: dict, writes: bool):
    """The anchor stage's call, `(input_ids[, write_mask]) -> logits`, made through the composition's own
    forward, so that FSDP's hooks on its root gather the root's weights around it (and make it the root at
    the first call). The prompt augments rerun with it."""
    def run(input_ids, *write_mask):
        return composed(input_ids, **({WRITE_MASK: write_mask[0]} if writes else {}), **prompts)
    return run


class Lockstep:
    """A rank's steps (`RecomputedSteps`), each forward run in step with the other ranks of the `mesh` that
    shards the composition (its last dimension: the ranks whose gathers a forward joins). `drain` runs the
    forwards the other ranks still need once this rank's decoding is over."""

    def __init__(self, steps, mesh: DeviceMesh, device: torch.device):
        self.steps, self.group = steps, mesh.get_group(mesh.ndim - 1)
        # the flag goes where the mesh's collectives run: the CPU (gloo), else the rank's device, the ids'
        self.device = torch.device("cpu") if mesh.device_type == "cpu" else device

    def _any(self, decoding: bool) -> bool:
        """Whether any rank still decodes (every rank calls this once a round)."""
        flag = torch.tensor([int(decoding)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def first(self):
        self._any(True)
        return self.steps.first()

    def next(self, token, step):
        self._any(True)
        return self.steps.next(token, step)

    def drain(self) -> None:
        while self._any(False):
            self.steps.idle()

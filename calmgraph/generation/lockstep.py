"""Generation on a composition sharded with FSDP2 (`calmgraph.parallel.shard`): every rank generates for its
own prompts, as in data-parallel evaluation, through the recomputing path.

FSDP gathers a block's weights from every rank when the block runs, so each rank must run as many forwards
as the others, whatever its prompts, its `max_new_tokens` and the step at which its rows finish. Before each
forward the ranks agree (an all-reduce of one flag) whether any of them still decodes; a rank with nothing
left to decode runs a forward of one position and discards it, until none decodes. A rank whose call raises
(bad input, a streamer's error) says so in the same all-reduce, and the others' calls raise too.

Each step runs the composition's own forward, whose FSDP hooks gather the root's weights (embeddings,
heads, the cross-attention blocks) as the blocks' hooks gather theirs; the prompt augments rerun with it.

The KV-cache decode graphs are traced from whole models, so a sharded composition recomputes the sequence
at each step (each forward gathers every weight once).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..errors import ParallelError
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


DONE, DECODING, FAILED = 0, 1, 2   # a rank's state at a round: the round's MAX is what every rank reads


class Rounds:
    """The ranks of the `mesh` that shards a composition agreeing, one all-reduce a round, whether any of them
    still decodes (its last dimension: the ranks whose gathers a forward joins). Made before anything in a
    call can be refused: a rank whose call raises (`fail`) tells the others at their next round, where they
    raise a ParallelError, rather than leave them waiting for a forward it will not run."""

    def __init__(self, mesh: DeviceMesh, ids=None):
        self.group = mesh.get_group(mesh.ndim - 1)
        # the flag goes where the mesh's collectives run: the CPU (gloo), else the rank's device: the ids'
        # where they are on one of the mesh's type (they may not be a tensor yet: nothing is checked), else
        # the current one
        if mesh.device_type == "cpu":
            self.device = torch.device("cpu")
        elif isinstance(ids, torch.Tensor) and ids.device.type == mesh.device_type:
            self.device = ids.device
        else:
            self.device = torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
        self.over = False   # every rank has agreed that none decodes, or that one failed: no round is left

    def _max(self, state: int) -> int:
        flag = torch.tensor([state], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def any_decoding(self, decoding: bool) -> bool:
        """Whether any rank still decodes (every rank calls this once a round, or `fail`)."""
        state = self._max(DECODING if decoding else DONE)
        self.over = state != DECODING
        if state == FAILED:
            raise ParallelError("the generate call of another process sharing this sharded composition raised (its "
                                "own error says why); this process's call stops with it, as no process can run a "
                                "forward without the others")
        return state == DECODING

    def fail(self) -> None:
        """This rank's call raised: the others' next round says so (unless the rounds are over)."""
        if not self.over:
            self.over = True
            self._max(FAILED)


class Lockstep:
    """A rank's steps (`RecomputedSteps`), each forward run in step with the other ranks (`Rounds`). `drain`
    runs the forwards the other ranks still need once this rank's decoding is over."""

    def __init__(self, steps, rounds: Rounds):
        self.steps, self.rounds = steps, rounds

    def first(self):
        self.rounds.any_decoding(True)
        return self.steps.first()

    def next(self, token, step):
        self.rounds.any_decoding(True)
        return self.steps.next(token, step)

    def drain(self) -> None:
        while self.rounds.any_decoding(False):
            self.steps.idle()

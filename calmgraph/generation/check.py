"""A decode graph's first use checked against the recomputing path.

`decode.check_decodes` checks each model's cached trace alone. What generate runs is more: the traces
inlined into one graph, the cross-attention blocks spliced in, `fuse.py`'s rewrites, the dead-code pass,
padding masks for ragged rows, and the compiled step. A fault there gives other tokens, silently (the
dead-code pass once dropped writes MiniCPM3's keys went through; its steps read uninitialised memory). So
the first prefill and the first `STEPS_CHECKED` steps through each prefill and step callable are compared
with the anchor stage run over the whole sequence; once each agrees, it runs unchecked. On a difference the
call goes on recomputing (or, with `cache=True`, raises), and the composition recomputes from then on.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import InternalError
from .decode import off_by

UNSOUND = "unsound"  # the generate entry's key: why the composition's decode graphs are not used
# Steps compared in a call before a step callable counts as checked: a step compiled with CUDA graphs runs
# its first call as a warm-up, records its graph at the second and replays it from the third, and a fault
# may show in any of the three (an input the graph reads from a stale address shows only in a replay).
STEPS_CHECKED = 3


class Checked:
    """`cached` (a `CachedSteps`) whose unchecked prefills and first steps are compared with `recomputed`
    (a `RecomputedSteps` over the same rows); `entry`: the composition's generate entry."""

    def __init__(self, cached, recomputed, entry: dict, strict: bool):
        self.cached, self.recomputed, self.entry, self.strict = cached, recomputed, entry, strict
        self.failed = False

    def _agree(self, got: torch.Tensor, want: torch.Tensor, what: str) -> bool:
        loose = got.element_size() < 4 or torch.is_autocast_enabled(got.device.type)
        error = off_by(got, want, loose)
        if error is None:
            return True
        why = (f"the KV-cache decode graph's {what} gives logits {error:.2g} (relative) off the recomputing "
               "path's; this is a bug in calmgraph, please report it")
        if self.strict:
            raise InternalError(f"{why}. generate(..., cache=False) recomputes")
        warnings.warn(f"{why}. Generating without the KV cache (this composition recomputes from now on)",
                      stacklevel=6)   # the caller of composed.generate
        self.entry[UNSOUND] = why
        self.failed = True
        return False

    def first(self) -> torch.Tensor:
        if self.cached.checked("prefill"):
            return self.cached.first()
        got, want = self.cached.first(), self.recomputed.first()
        if not self._agree(got, want, "prefill"):
            return want
        self.cached.mark_checked("prefill")
        return got

    def next(self, token: torch.Tensor, step: int) -> torch.Tensor:
        if self.failed:
            return self.recomputed.next(token, step)
        if step >= STEPS_CHECKED or self.cached.checked("step"):
            return self.cached.next(token, step)
        got, want = self.cached.next(token, step), self.recomputed.next(token, step)
        if not self._agree(got, want, "step"):
            return want
        if step + 1 == STEPS_CHECKED:   # a call that ends sooner leaves the next call to check it again
            self.cached.mark_checked("step")
        return got

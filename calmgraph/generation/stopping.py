"""When generation stops: a row is finished by an eos token or a stopping criterion, and the loop ends once
every row is. Reading that verdict on the host waits for the device; a compiled step on a GPU reads each
verdict a few steps late instead (`Verdicts`), so that the GPU is never left without queued work.
"""
from __future__ import annotations

from collections import deque

import torch

from ..errors import InputError

# Steps a compiled step's loop may run ahead of its latest verdict on a GPU (`Verdicts`). Under CUDA graphs the
# host launches a step in less time than the GPU runs it, so two queued steps keep the GPU busy while the host
# waits for a third's verdict; at most this many steps are run past the finish and dropped.
FINISH_LAG = 3


def finish_lag(device: torch.device, compiled: bool) -> int:
    """How many steps late the loop reads its stop verdicts. 0 (each at once) unless the step is compiled and on
    a GPU: an eager step is bound by its launches, so the GPU waits on the host anyway, and a step run past the
    finish would cost the host a whole step."""
    return FINISH_LAG if compiled and device.type == "cuda" else 0


class Verdicts:
    """Whether every row has finished, step by step. Each step's verdict (`finished.all()`) is copied to the
    host behind that step's work (on CUDA: a non-blocking copy and an event) and read once it has landed, or
    `lag` steps later at the latest, when reading it waits only for that step's work, not for the steps
    queued after it. `add` and `last` return the first step at which every row had finished, once read: the
    caller drops what it made after that step. lag 0: each verdict is read as it is added."""

    def __init__(self, lag: int):
        self.lag, self.pending = lag, deque()

    def add(self, step: int, finished: torch.Tensor) -> int | None:
        done, event = finished.all(), None
        if done.is_cuda and self.lag:  # pinned host memory: the copy is queued behind the step, not waited for
            host, event = torch.empty((), dtype=torch.bool, pin_memory=True), torch.cuda.Event()
            done = host.copy_(done, non_blocking=True)
            event.record()
        self.pending.append((step, done, event))
        return self._read(wait=False)

    def last(self) -> int | None:
        """At the loop's end: read every verdict still queued."""
        return self._read(wait=True)

    def _read(self, wait: bool) -> int | None:
        while self.pending:
            step, done, event = self.pending[0]
            if not (wait or len(self.pending) > self.lag or (event is not None and event.query())):
                return None
            if event is not None:
                event.synchronize()
            self.pending.popleft()
            if bool(done):  # finished only grows: the first verdict that holds is the finish
                self.pending.clear()
                return step
        return None


def criteria(stopping_criteria):
    """A callable (ids, scores) -> (B,) bools from transformers' StoppingCriteriaList, one criterion or a list."""
    if stopping_criteria is None:
        return None
    if callable(stopping_criteria):
        return stopping_criteria
    if isinstance(stopping_criteria, (list, tuple)) and all(map(callable, stopping_criteria)):
        return lambda ids, scores: [c(ids, scores) for c in stopping_criteria]
    raise InputError("stopping_criteria must be a transformers StoppingCriteriaList, a callable (ids, scores) -> "
                     f"bools, or a list of them; got {type(stopping_criteria).__name__}")


def stopped(verdicts, batch: int, device) -> torch.Tensor:
    """A criterion's verdict (a bool or (B,) bools; a list of them: any) as (B,) bools."""
    verdicts = verdicts if isinstance(verdicts, list) else [verdicts]
    out = torch.zeros(batch, dtype=torch.bool, device=device)
    for v in verdicts:
        out |= torch.as_tensor(v, device=device).bool().expand(batch)
    return out

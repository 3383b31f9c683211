"""Round-robin timing after nanoGPT's bench.py: warm up, synchronise, time each call with CUDA events
(perf_counter on CPU), report medians. One call of each function per round, so that clock and thermal
drift hit them alike; ratios are taken round by round (`paired_ratio`)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Budget:
    """How long to measure. GPU clocks need a second or more of load before they settle."""

    warmup_s: float = 1.0
    rounds: int = 30
    max_s: float = 20.0          # stop early once this much time went into the timed rounds
    min_rounds: int = 5

    def describe(self) -> str:
        warmup = f"{self.warmup_s:g} s warm-up" if self.warmup_s else "no warm-up"
        return f"{warmup}, {self.rounds} rounds or {self.max_s:g} s, at least {self.min_rounds} rounds"


QUICK = Budget(warmup_s=0.0, rounds=3, max_s=2.0, min_rounds=2)

Observer = Callable[[str, float], None]  # called with (name, ms) after each timed call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict[str, Callable[[], object]], device: torch.device, budget: Budget,
                     observe: Observer | None = None) -> dict[str, dict]:
    """Median (and quartiles) of each function's time in ms; each round calls every function once.
    `observe(name, ms)` runs after each timed call, outside the timed span (a progress display)."""
    for fn in fns.values():  # first call: lazy allocation, cuDNN/kernel choice, compilation
        fn()
    _sync(device)
    started = time.perf_counter()
    while time.perf_counter() - started < budget.warmup_s:
        for fn in fns.values():
            fn()
        _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    for i in range(budget.rounds):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
            if observe is not None:
                observe(name, times[name][-1])
        if i + 1 >= budget.min_rounds and time.perf_counter() - started > budget.max_s:
            break
    return {name: _stats(ts) for name, ts in times.items()}


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - began)


def _stats(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return {"median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2], "rounds": len(ts),
            "ms": [round(t, 4) for t in ts]}  # per round, in round order: for ratios round by round


def paired_ratio(a: dict, b: dict) -> float:
    """The median over rounds of a's time / b's time in the same round (two entries of one
    `time_round_robin`): drift between rounds cancels, which a ratio of medians keeps."""
    return statistics.median(x / y for x, y in zip(a["ms"], b["ms"], strict=True))


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one call allocates beyond what was allocated before it (GPU only; None on CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20

"""Train for a time budget: time a few steps, then fix the run's length before the schedule depends on it.

The warm-up + cosine schedule needs the number of steps up front, but how many fit in a given number of
seconds depends on the device. `train_within` runs the first `probe` steps (all inside the warm-up,
where the learning rate does not depend on `max_steps`), times them, sets `max_steps`, and trains on:
the result is the same run as one started with that `max_steps`, because the trainer's schedule reads
`config.max_steps` at each step and its data order depends only on the step.
"""
from __future__ import annotations

import time

import torch

from calmgraph.train import FineTuner

PROBE_WARM, PROBE_TIMED = 30, 30  # untimed steps (CUDA start-up, data workers starting), then timed ones


def train_within(tuner: FineTuner, seconds: float | None) -> dict:
    """Train `tuner` to `config.max_steps`, or to fewer steps if `seconds` would not hold them all.

    Every process takes the same decision (the slowest process's step time), so data-parallel runs stay
    in step. Returns {"steps", "seconds", "step_ms", "final_loss", "loss_at_step"}.
    """
    c = tuner.config
    cap, step_ms = c.max_steps, None
    started = time.perf_counter()
    if seconds is not None and cap > PROBE_WARM + PROBE_TIMED:
        if c.warmup_steps < PROBE_WARM + PROBE_TIMED:
            raise ValueError(f"the timing probe ({PROBE_WARM + PROBE_TIMED} steps) must stay inside the warm-up "
                             f"({c.warmup_steps} steps), or the schedule would change under it")
        c.max_steps = PROBE_WARM
        tuner.train()
        _sync(tuner)
        t0 = time.perf_counter()
        c.max_steps = PROBE_WARM + PROBE_TIMED
        tuner.train()
        _sync(tuner)
        per_step = torch.tensor((time.perf_counter() - t0) / PROBE_TIMED, device=tuner.device)
        per_step = float(tuner.accelerator.reduce(per_step, reduction="max")) if tuner.accelerator.num_processes > 1 \
            else float(per_step)
        left = seconds - (time.perf_counter() - started)
        c.max_steps = max(PROBE_WARM + PROBE_TIMED, min(cap, int(left / per_step) + PROBE_WARM + PROBE_TIMED))
        step_ms = 1e3 * per_step
        if tuner.accelerator.is_main_process:
            print(f"  timed {step_ms:.1f} ms/step: {c.max_steps} steps fit {seconds:.0f} s (cap {cap})", flush=True)
    hist = tuner.train()
    marks = sorted({max(1, round(k * len(hist) / 10)) for k in range(1, 11)})  # the loss curve at 10 points
    return {"steps": c.max_steps, "seconds": round(time.perf_counter() - started, 1),
            "step_ms": None if step_ms is None else round(step_ms, 2), "final_loss": round(hist[-1]["loss"], 4),
            "loss_at_step": {hist[m - 1]["step"]: round(hist[m - 1]["loss"], 4) for m in marks}}


def _sync(tuner: FineTuner) -> None:
    if tuner.device.type == "cuda":
        torch.cuda.synchronize(tuner.device)

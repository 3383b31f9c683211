"""What the harness says while it runs. `Progress` says nothing (library use); `Console` prints a line per
step (each variant built or skipped) and, while variants are timed, a tqdm bar per variant (one line per
variant when tqdm is missing or the stream is not a terminal)."""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from typing import IO, Iterator

from .timing import Budget, Observer


class Progress:
    def skipped(self, variant: str, reason: str) -> None:
        pass

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def timing(self, section: str, names: list[str], budget: Budget) -> Iterator[Observer | None]:
        yield None


class Console(Progress):
    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream or sys.stderr

    def _say(self, text: str, end: str = "\n") -> None:
        print(text, end=end, file=self.stream, flush=True)

    def skipped(self, variant: str, reason: str) -> None:
        self._say(f"calmgraph bench: {variant} skipped: {reason}")

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self._say(f"calmgraph bench: {what} ...", end="")
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self._say(" failed")
            raise
        self._say(f" done ({time.perf_counter() - started:.1f} s)")

    @contextlib.contextmanager
    def timing(self, section: str, names: list[str], budget: Budget) -> Iterator[Observer]:
        self._say(f"calmgraph bench: timing the {section} step of {len(names)} variants round-robin: "
                  f"{budget.describe()}")
        times: dict[str, list[float]] = {name: [] for name in names}
        bars = self._bars(section, names, budget)

        def observe(name: str, ms: float) -> None:
            times[name].append(ms)
            if bars:
                bars[name].set_postfix_str(f"median {statistics.median(times[name]):.3f} ms", refresh=False)
                bars[name].update(1)
        try:
            yield observe
            for bar in (bars or {}).values():
                bar.total = bar.n  # the budget's time limit may end the rounds early: that is done too
        finally:
            for bar in (bars or {}).values():
                bar.close()
        if not bars:
            width = max(map(len, names))
            for name, ts in times.items():
                median = f"median {statistics.median(ts):.3f} ms of {len(ts)} rounds" if ts else "not timed"
                self._say(f"  {section} {name.ljust(width)}  {median}")

    def _bars(self, section: str, names: list[str], budget: Budget) -> dict | None:
        """A tqdm bar per variant on a terminal; None without tqdm or a terminal (lines instead)."""
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        if not getattr(self.stream, "isatty", lambda: False)():
            return None
        width = max(map(len, names))
        return {name: tqdm(total=budget.rounds, desc=f"{section} {name.ljust(width)}", unit="round", position=i,
                           leave=True, file=self.stream, dynamic_ncols=True)
                for i, name in enumerate(names)}

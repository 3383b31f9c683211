"""What a result says, as text, and what makes it reproducible."""
from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import torch

from ._internals import text_table


def environment(command: list[str] | None = None) -> dict:
    """Machine, date, versions and the exact command: what makes a result file reproducible."""
    from importlib.metadata import PackageNotFoundError, version
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "calmgraph", "x-transformers", "CALM-Pytorch", "transformers", "einops"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        machine.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    versions["calmgraph_commit"] = os.environ.get("CALMGRAPH_COMMIT") or _git_commit()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "versions": versions, "command": " ".join(command or sys.argv)}


def _git_commit() -> str | None:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def table(result: dict) -> str:
    """Median ms of every variant, and its ratio to the fused graph, per step (forward, train)."""
    rows = []
    for section, times in result["times"].items():
        fused = times["fused"]["median_ms"]
        for name, t in times.items():
            rows.append([section, name, f"{t['median_ms']:.3f}", f"{t['median_ms'] / fused:.3f}", t["rounds"]])
    return text_table(rows, ["step", "variant", "median ms", "x fused", "rounds"])

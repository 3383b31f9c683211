"""Test workers on several CPU processes (gloo): `launch` runs a worker script under torchrun and fails with
what its ranks printed; `finish` ends a worker's process group once every rank is done with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOWN = 6000  # characters kept of each end of the ranks' output on failure


def launch(worker: str, *args, env: dict | None = None, nproc: int = 2, timeout: int = 600) -> None:
    """`torchrun --standalone` on `tests/<worker>`; on failure the message holds the head of the output (the
    first rank's traceback) and its tail (torchrun's summary of which rank failed, and how)."""
    # PYTHONFAULTHANDLER: a rank that aborts prints where each of its threads was
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / worker), *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank
        out, _ = proc.communicate()
    if proc.returncode != 0:
        shown = out if len(out) <= 2 * SHOWN else f"{out[:SHOWN]}\n[...]\n{out[-SHOWN:]}"
        raise AssertionError(f"{worker} exited with {proc.returncode}:\n{shown}")


def finish() -> None:
    """The worker's end: a barrier, the group's end, then the process's, without the interpreter's teardown.
    In CI a rank sometimes aborted with "terminate called without an active exception", the mark of a C++
    thread still joinable when its owner is destroyed, as happens when a process's static objects are torn
    down; `os._exit` skips that teardown (and PYTHONFAULTHANDLER shows where a rank was if it recurs)."""
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

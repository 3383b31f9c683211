"""examples/train_transformers runs end to end, briefly: compile, train, save, reload, generate."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("transformers")


def test_the_example_trains_saves_reloads_and_generates(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "train_transformers" / "train.py"), "--steps", "8",
                          "--batch", "8", "--device", "cpu", "--out", str(tmp_path / "run")],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "traced llama: 4 blocks, export front end" in run.stderr  # calmgraph's log, shown by the example
    before, after = map(float, re.search(r"trained 8 steps .*: held-out copy loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before  # the new blocks learnt something of the task
    assert f"held-out copy loss {after:.3f}" in re.search(r"reloaded from .*", out).group()  # the release is complete
    copy = re.search(r"copy: +\[(.*)\]", out).group(1).split(", ")
    assert len(copy) == 12 and all(0 <= int(t) < 64 for t in copy)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final", "step-00000004", "step-00000008",
                                                                    "train_log.jsonl"]

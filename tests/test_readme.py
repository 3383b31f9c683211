"""The README's example runs, and CI runs the README's test command."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_example_runs():
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "parameters:" in result.stdout and "TapPoint(index=0" in result.stdout


def test_ci_runs_the_readme_test_command():
    lines = README.splitlines()
    command = lines[lines.index("# run the tests") + 1]
    assert command.endswith("python -m pytest -q") and "torch==2.13.0" in command
    assert "grep -A1 '^# run the tests$' README.md" in (ROOT / ".ci" / "run").read_text()


def test_demo_command_succeeds():
    result = subprocess.run([sys.executable, "-m", "calmgraph.cli", "demo"], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "identity at init: fused output == anchor output" in result.stdout
    assert "arith -> base  1->2 3->5" in result.stdout

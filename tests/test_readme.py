"""Every code block of the README runs as written, and CI runs the README's test command."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import calmgraph as cg

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's calmgraph, whatever is installed


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def python_blocks() -> list[tuple[str, str]]:
    """(the section's heading, the code) of every ```python block, in order."""
    found, heading, code = [], "", None
    for line in README.splitlines(keepends=True):
        if code is not None:
            if line.startswith("```"):
                found.append((heading, "".join(code)))
                code = None
            else:
                code.append(line)
        elif line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("```python"):
            code = []
    return found


def test_every_python_block_runs_in_order(tmp_path):
    """In one process and a fresh folder, as a reader pasting them would. Each block starts afresh, except one
    whose first line says `# continuing "<section>" above`: it runs after that section's block, on its
    variables. The `.pt2` block loads what the README's `calmgraph` commands wrote, so those run first."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    commands = next(b for b in blocks("bash") if "calmgraph compile" in b)
    shell = f'calmgraph() {{ "{sys.executable}" -m calmgraph.cli "$@"; }}\nset -e\n{commands}'
    ran = subprocess.run(["bash", "-c", shell], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "out" / "demo" / "composed.pt2").is_file() and (tmp_path / "demo.svg").is_file()

    found = python_blocks()
    assert len(found) == len(blocks("python")) >= 3
    script = ["spaces = {}"]
    for i, (heading, code) in enumerate(found):
        continued = re.match(r'# continuing "([^"]+)" above', code)
        space = f"spaces[{continued.group(1)!r}]" if continued else f"spaces.setdefault({heading!r}, {{}})"
        script.append(f"exec(compile({code!r}, 'README python block {i + 1}', 'exec'), {space})\n"
                      f"print('block {i + 1} ran')")
    ran = subprocess.run([sys.executable, "-c", "\n".join(script)], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    assert [line for line in ran.stdout.splitlines() if line.endswith(" ran")] == [
        f"block {i + 1} ran" for i in range(len(found))]
    assert "trainable params: " in ran.stdout and "TapPoint(index=0" in ran.stdout
    assert (tmp_path / "runs" / "demo" / "train_log.jsonl").is_file()


def test_the_yaml_blocks_are_valid_specs():
    first, reference = (cg.CompositionSpec.from_yaml(b) for b in blocks("yaml"))
    assert first == cg.load_spec(ROOT / "examples" / "specs" / "demo.yaml")  # "the demo's composition written this way"
    assert reference.anchor.blocks == "model.layers" and reference.edges[0].cross_attention.heads == 4


def install_lines() -> dict[str, str]:
    lines = README.splitlines()
    return {"demo": next(line for line in lines if line.endswith("&& calmgraph demo")),
            "tests": lines[lines.index("# run the tests") + 1]}


def run_with_stand_ins(tmp_path, line: str, torch_present: bool, torch_installs: bool = True) -> list[str]:
    """Run an install line with pip, python and calmgraph replaced by scripts that log their arguments;
    `python -c "import torch"` answers as on a machine with or without torch."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(exist_ok=True)
    log.write_text("")
    stand_in = textwrap.dedent(f"""\
        #!/bin/bash
        if [ "$1" = "-c" ] && [ "$2" = "import torch" ]; then exit {0 if torch_present else 1}; fi
        echo "$(basename "$0") $*" >> {log}
        if [ "$*" = "install torch==2.13.0" ]; then exit {0 if torch_installs else 1}; fi
    """)
    for name in ("pip", "python", "calmgraph"):
        (bin_dir / name).write_text(stand_in)
        (bin_dir / name).chmod(0o755)
    subprocess.run(["bash", "-c", line], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, timeout=60)
    return log.read_text().splitlines()


def test_the_install_lines_keep_an_installed_torch_and_pin_a_new_one(tmp_path):
    for what, line in install_lines().items():
        rest = ["pip install -e .", "calmgraph demo"] if what == "demo" else [
            'pip install -e .[test]', "python -m pytest -q -n 2 --dist loadfile"]
        assert run_with_stand_ins(tmp_path, line, torch_present=True) == rest
        assert run_with_stand_ins(tmp_path, line, torch_present=False) == ["pip install torch==2.13.0", *rest]
        assert run_with_stand_ins(tmp_path, line, torch_present=False, torch_installs=False) == [
            "pip install torch==2.13.0"]  # a failed torch install stops the line


def test_ci_runs_the_readme_test_command():
    assert install_lines()["tests"].endswith("python -m pytest -q -n 2 --dist loadfile")
    assert "grep -A1 '^# run the tests$' README.md" in (ROOT / ".ci" / "run").read_text()


def test_demo_command_succeeds():
    result = subprocess.run([sys.executable, "-m", "calmgraph.cli", "demo"], capture_output=True, text=True,
                            cwd=ROOT, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "identity at init: fused output == anchor output" in result.stdout
    assert "arith -> base  1->2 3->5" in result.stdout

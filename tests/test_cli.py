"""The `calmgraph` command line, run as a subprocess: output, exit codes, files written, error lines."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = 'source: {python: "calmgraph.demo.models:TinyLM", kwargs: {vocab: 64, dim: %d, depth: %d, heads: 2}, seed: %d}'


def calmgraph(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's calmgraph, whatever is installed
    return subprocess.run([sys.executable, "-m", "calmgraph.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def write_spec(tmp_path, layers="[[1, 2], [-1, 3]]", name="spec.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""
        anchor: {{name: base, {TINY % (32, 4, 0)}}}
        augments:
          - {{name: helper, {TINY % (24, 3, 1)}}}
        edges:
          - {{source: helper, target: base, layers: {layers}}}
    """))
    return path


@pytest.mark.parametrize("command", [[], ["validate"], ["inspect"], ["compile"], ["demo"]])
def test_every_command_has_help(command):
    run = calmgraph(*command, "--help")
    assert run.returncode == 0 and run.stdout.startswith(f"usage: calmgraph {' '.join(command)}".rstrip())
    if not command:
        assert all(c in run.stdout for c in ("validate", "inspect", "compile", "demo"))


def test_python_dash_m_calmgraph_is_the_command():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "calmgraph", "validate", "--help"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout == calmgraph("validate", "--help").stdout


def test_usage_errors_exit_2():
    run = calmgraph("compile", "spec.yaml")  # --out is required
    assert run.returncode == 2 and "the following arguments are required: --out" in run.stderr


def test_validate_a_good_spec(tmp_path):
    run = calmgraph("validate", write_spec(tmp_path))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{tmp_path / 'spec.yaml'}: valid (2 models, 1 edge, 2 layer pairs)"
    assert "checking the layer references" in run.stderr  # progress goes to stderr


def test_validate_lists_every_problem_with_its_location(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        anchor: {name: base}
        augments:
          - {name: helper, inptu: shared}
          - {name: 2nd}
        edges:
          - {source: helpr, target: base, layers: [[0, 1]]}
    """))
    run = calmgraph("validate", bad)
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert lines[0] == f"{bad}: 2 problems"
    assert lines[1].startswith("  augments[0].inptu: unknown key")
    assert lines[2].startswith("  augments[1].name: String should match pattern")
    assert "Traceback" not in run.stdout + run.stderr


def test_validate_checks_layer_references_against_the_models(tmp_path):
    run = calmgraph("validate", write_spec(tmp_path, layers="[[7, 0], [1, layers.9]]"))
    assert run.returncode == 1
    assert "edges[0].layers[0][0]: layer 7 is out of range for 'helper', which has 3 blocks" in run.stdout
    assert "edges[0].layers[1][1]: 'layers.9' is not a block of 'base'" in run.stdout


def test_validate_reports_the_problems_of_every_stage_in_one_run(tmp_path):
    spec = write_spec(tmp_path, layers="[[7, 0]], cross_attention: {heeds: 2}")
    spec.write_text(spec.read_text().replace("edges:", "cross_attention: {norm: rmss}\nedges:") +
                    "  - {source: helpr, target: base, layers: [[0, 1]]}\n")
    run = calmgraph("validate", spec)
    assert run.returncode == 1
    assert run.stdout.splitlines() == [
        f"{spec}: 4 problems",
        "  edges[0].cross_attention.heeds: unknown key (check its spelling; unknown keys are not ignored) (got 2)",
        "  cross_attention.norm: Input should be 'rms', 'layer' or 'none' (got 'rmss')",
        "  edges[1].source: unknown model 'helpr' (models: base, helper)",
        "  edges[0].layers[0][0]: layer 7 is out of range for 'helper', which has 3 blocks (0..2, or -3..-1 from the end)"]


def test_validate_a_missing_file(tmp_path):
    run = calmgraph("validate", tmp_path / "nope.yaml")
    assert run.returncode == 1 and f"no spec file at '{tmp_path / 'nope.yaml'}'" in run.stdout


def test_inspect_lists_blocks_and_pairs_and_draws(tmp_path):
    run = calmgraph("inspect", write_spec(tmp_path), "--mermaid", "--draw", tmp_path / "c.svg")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "base: anchor, 4 blocks, fx front end" in out and "helper: augment (shared), 3 blocks" in out
    assert "2      layers.2  32      <- helper[1]" in out and "2      layers.2  24      -> base[3]" in out
    assert "edges[0]  helper -> base  [[1, 2], [-1, 3]]  1->2, 2->3" in out
    assert "```mermaid" in out and 'helper -->|"1→2, 2→3"| base' in out
    assert "<svg" in (tmp_path / "c.svg").read_text()


def test_compile_writes_every_artifact(tmp_path):
    run = calmgraph("compile", write_spec(tmp_path), "--out", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "composed.pt2", "composed.py", "composition.png", "composition.svg", "spec.json", "summary.txt"]
    assert "trainable params: " in run.stdout and "wrote " in run.stdout
    for step in ("building 2 models", "compiling", "exporting", "drawing"):
        assert f"calmgraph: {step}" in run.stderr
    # a line per traced model (INFO of the "calmgraph" logger), each below the step it belongs to
    lines = run.stderr.splitlines()
    at = lines.index("calmgraph: compiling ...")
    assert lines[at + 1].startswith("calmgraph:   traced base: 4 blocks, fx front end, ")
    assert lines[at + 2].startswith("calmgraph:   traced helper: 3 blocks, fx front end, ")
    assert lines[at + 3].startswith("calmgraph: compiling: done (")
    assert (tmp_path / "out" / "composition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "resolved pairs" in (tmp_path / "out" / "summary.txt").read_text()


def test_an_error_is_one_line_and_verbose_shows_the_traceback(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(write_spec(tmp_path).read_text().replace("calmgraph.demo.models:TinyLM", "no_such_pkg:Model", 1))
    run = calmgraph("compile", spec, "--out", tmp_path / "out", "--trust-code")
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("calmgraph: error")]
    assert errors == ["calmgraph: error: model 'base' (source python: no_such_pkg:Model): cannot import "
                      "'no_such_pkg': ModuleNotFoundError: No module named 'no_such_pkg'"]
    assert "Traceback" not in run.stderr and not (tmp_path / "out").exists()
    verbose = calmgraph("compile", spec, "--out", tmp_path / "out", "--verbose", "--trust-code")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "ModelError" in verbose.stderr


def test_demo_checks_identity_and_writes_artifacts(tmp_path):
    run = calmgraph("demo", "--out", tmp_path / "demo")
    assert run.returncode == 0, run.stderr
    assert "identity at init: fused output == anchor output" in run.stdout
    assert {"composed.pt2", "composed.py", "spec.json", "composition.png", "summary.txt"} <= {
        p.name for p in (tmp_path / "demo").iterdir()}


def test_compile_to_onnx_checks_its_dependencies_before_compiling(tmp_path, monkeypatch, capsys):
    from calmgraph import cli
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    monkeypatch.setattr(cli, "_compile", lambda *a, **k: pytest.fail("compiled before checking"))
    code = cli.main(["compile", str(write_spec(tmp_path)), "--out", str(tmp_path / "out"), "--format", "onnx"])
    err = capsys.readouterr().err
    assert code == 1 and not (tmp_path / "out").exists()
    assert err.startswith('calmgraph: error: ONNX export needs onnxscript; install the [onnx] extra: pip install -e ".[onnx]"')


def test_warnings_are_shown_except_known_torch_noise(tmp_path):
    (tmp_path / "warns.py").write_text(textwrap.dedent("""
        import warnings
        from calmgraph.demo.models import TinyLM

        class Warns(TinyLM):
            def forward(self, input_ids):
                warnings.warn("this model's own FutureWarning", FutureWarning)
                return super().forward(input_ids)

        def make(**kwargs):
            return Warns(**kwargs)
    """))
    spec = write_spec(tmp_path)
    spec.write_text(spec.read_text().replace("calmgraph.demo.models:TinyLM", "warns.py:make", 1))
    run = calmgraph("inspect", spec, "--trust-code")  # a python: file source runs only with consent
    assert run.returncode == 0, run.stderr
    assert "FutureWarning: this model's own FutureWarning" in run.stderr


def test_known_noise_is_filtered_and_nothing_else():
    import warnings

    from calmgraph import cli
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with cli._shown_logs_and_warnings(verbose=False):
            warnings.warn("'has_cuda' is deprecated, please use 'torch.backends.cuda.is_built()'", UserWarning)
            warnings.warn("something the user should see", UserWarning)
    assert [str(w.message) for w in seen] == ["something the user should see"]


def test_validate_and_inspect_read_an_hf_folder_on_the_meta_device(tmp_path):
    # Structure only: the folder's config builds the model on the meta device (transformers refuses
    # from_pretrained there); compile still loads the saved weights.
    import torch
    import transformers
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(f"""
        anchor: {{name: base, source: {{hf: llama}}}}
        augments:
          - {{name: helper, {TINY % (24, 3, 1)}}}
        edges:
          - {{source: helper, target: base, layers: [[0, 0], [-1, 2]]}}
    """))
    run = calmgraph("validate", spec)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{spec}: valid (2 models, 1 edge, 2 layer pairs)"
    run = calmgraph("inspect", spec)
    assert run.returncode == 0, run.stderr
    assert "model.layers.2" in run.stdout
    run = calmgraph("compile", spec, "--out", tmp_path / "out")
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("option, message", [
    (["--seq", "129"], "--seq 129 is longer than the 128 positions of the models reading input_ids; use --seq 128"),
    (["--seq", "8", "--prompt-len", "200"], "--prompt-len 200 is longer than the 128 positions"),
])
def test_bench_refuses_lengths_past_the_models_positions_before_running(option, message):
    run = calmgraph("bench", ROOT / "examples" / "specs" / "demo.yaml", "--models", "calmgraph.demo.models:demo_models",
                    "--quick", "--no-compile", "--batch", "1", *option)
    assert run.returncode == 1 and f"calmgraph: error: {message}" in run.stderr
    assert "timing" not in run.stderr and "building parts" not in run.stderr  # refused before any timing

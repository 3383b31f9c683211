"""calmgraph.bench: the baselines compute what the fused graph computes, and the measurements measure what
they say. (Speed itself is never asserted: see benchmarks/.)"""
import ast
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import calmgraph as cg
from calmgraph.bench import (Budget, HookComposition, Parts, dynamo_report, forward_inputs, make_inputs,
                             time_round_robin, without_checks)
from calmgraph.demo.models import demo_models
from calmgraph.demo.run import demo_spec_path
from calmgraph.errors import InputError, ModelError
from calmgraph.passes.merge import check_token_ids


@pytest.fixture(scope="module")
def demo():
    """The demo composition (shared and prompt augment, pruned blocks) with random cross-attention weights."""
    models = demo_models(seed=0)
    composed = cg.compile(str(demo_spec_path()), models=models)
    torch.manual_seed(0)
    for p in composed.new_parameters():
        nn.init.normal_(p, std=0.05)
    inputs = forward_inputs(make_inputs(composed, models, batch=2, seq=12, prompt_len=9))
    return composed, models, inputs


def test_make_inputs_fit_every_model(demo):
    composed, models, _ = demo
    inputs = make_inputs(composed, models, batch=3, seq=10, prompt_len=7)
    assert set(inputs) == {"input_ids", "notes_input_ids", "notes_mask"}
    assert inputs["input_ids"].shape == (3, 11)  # one more token: the training step's labels
    assert inputs["notes_input_ids"].shape == inputs["notes_mask"].shape == (3, 7)
    assert int(inputs["input_ids"].max()) < 96 and int(inputs["notes_input_ids"].max()) < 96
    assert inputs["notes_mask"][-1].tolist() == [1, 1, 1, 0, 0, 0, 0]  # the last prompt is padded


def test_hook_composition_computes_the_fused_graph(demo):
    composed, models, inputs = demo
    with torch.no_grad():
        fused = composed(**inputs)
        hooked = HookComposition(composed, models)(**inputs)
        anchor = models["base"](inputs["input_ids"])
    assert not torch.allclose(fused, anchor, atol=1e-3)  # the cross-attention deltas are not zero...
    torch.testing.assert_close(hooked, fused, rtol=0, atol=1e-6)  # ...and the hooks add the same ones


def test_hook_composition_leaves_user_models_alone(demo):
    composed, models, inputs = demo
    HookComposition(composed, models)
    assert all(not m._forward_hooks for model in models.values() for m in model.modules())


def test_parts_stop_augments_after_their_deepest_tapped_block(demo):
    composed, models, inputs = demo
    parts = Parts(composed, models, inputs)
    ran = []
    for name, entry in parts.entries.items():
        for i, layer in enumerate(entry.model.layers):
            layer.register_forward_pre_hook(lambda m, a, name=name, i=i: ran.append((name, i)))
    with torch.no_grad():
        parts(**inputs)
    deepest = {name: max(i for n, i in ran if n == name) for name in parts.entries}
    # demo.yaml: arith taps blocks 1 and 3 of 5; notes its last (1 of 2); the anchor runs in full
    assert deepest == {"base": 5, "arith": 3, "notes": 1}
    link_of = {composed.get_submodule(".".join(("xattn", *l.module_path))): l for l in composed.links}
    assert sorted(map(id, (b for b, _ in parts.blocks))) == sorted(map(id, link_of))  # each block once
    for block, args in parts.blocks:
        assert args[0].shape[-1] == link_of[block].target_dim and args[1].shape[-1] == link_of[block].source_dim


def test_without_checks_same_output_no_check_nodes(demo):
    composed, _, inputs = demo
    bare = without_checks(composed)
    with torch.no_grad():
        assert torch.equal(bare(**inputs), composed(**inputs))
        assert torch.equal(bare(**{**inputs, "notes_mask": None}), composed(**{**inputs, "notes_mask": None}))
    assert not [n for n in bare.graph.nodes if n.target is check_token_ids]
    assert [n for n in composed.graph.nodes if n.target is check_token_ids]  # the original keeps them
    float_ids = {**inputs, "input_ids": inputs["input_ids"].float()}
    with pytest.raises(InputError, match="input_ids must be a"):
        composed(**float_ids)


def test_round_robin_calls_each_function_once_per_round():
    calls = {"a": 0, "b": 0}
    fns = {k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}
    out = time_round_robin(fns, torch.device("cpu"), Budget(warmup_s=0.0, rounds=4, max_s=60.0, min_rounds=2))
    assert calls == {"a": 5, "b": 5}  # one untimed first call, then 4 timed rounds
    assert all(out[k]["rounds"] == 4 and out[k]["q1_ms"] <= out[k]["median_ms"] <= out[k]["q3_ms"] for k in out)


def test_ratios_are_taken_round_by_round():
    """A slow round slows both functions of that round: the paired ratio sees 2.0 in every round, while
    the ratio of medians does not."""
    from calmgraph.bench.timing import paired_ratio
    a, b = {"ms": [2.0, 20.0, 2.0, 200.0, 4.0]}, {"ms": [1.0, 10.0, 1.0, 100.0, 2.0]}
    assert paired_ratio(a, b) == 2.0
    assert paired_ratio({"ms": [3.0, 1.0, 2.0]}, {"ms": [1.0, 1.0, 1.0]}) == 2.0  # the median, not the mean
    with pytest.raises(ValueError):
        paired_ratio({"ms": [1.0]}, {"ms": [1.0, 2.0]})  # rounds of another run


def test_dynamo_report_counts_graph_breaks_and_recompiles():
    class Broken(nn.Module):
        def forward(self, input_ids):
            x = input_ids.float() * 2
            torch._dynamo.graph_break()
            return x + 1
    ids = torch.zeros(2, 9, dtype=torch.long)
    report = dynamo_report(Broken(), {"input_ids": ids}, other_seq=4, backend="eager")
    assert report["graph_breaks"] == 1 and report["graphs"] == 2
    assert report["recompiles_same_shapes"] == 0
    assert report["recompiles_new_seq_len"] >= 1  # a new length: dynamo specialised on the first one


def test_bench_command_on_the_demo(tmp_path, capsys):
    from calmgraph.cli import main
    out = tmp_path / "bench.json"
    assert main(["bench", str(demo_spec_path()), "--models", "calmgraph.demo.models:demo_models", "--quick", "--no-compile",
                 "--batch", "2", "--seq", "16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    forward = report["times"]["forward"]
    assert {"fused", "parts", "parts.base", "parts.arith", "parts.notes", "parts.cross_attention", "hooks",
            "fused_no_checks", "fused_unpruned"} <= set(forward)
    assert "calm_pytorch" not in forward  # demo models are not x-transformers: CALM-pytorch cannot run them
    assert "x-transformers" in report["notes"]["calm_pytorch"] or "CALM-pytorch" in report["notes"]["calm_pytorch"]
    assert {"date", "machine", "versions", "command"} <= set(report)
    assert "fused/parts" in capsys.readouterr().out


def test_bench_command_without_models_says_how_to_give_them(tmp_path):
    from calmgraph.bench import main
    try:
        import calmgraph.sources  # noqa: F401 - with model sources, a spec without any names what is missing
        expected = "source"
    except ImportError:
        expected = "--models package.module:function"
    with pytest.raises(ModelError, match=expected):
        main([str(demo_spec_path()), "--quick"])
    with pytest.raises(ModelError, match="no_such_module"):
        main([str(demo_spec_path()), "--models", "no_such_module:f", "--quick"])


def test_input_checks_timing_runs_the_real_checks_on_the_inputs(demo):
    from calmgraph.bench import input_checks_us
    composed, _, inputs = demo
    assert input_checks_us(composed, inputs, calls=3) > 0
    with pytest.raises(InputError, match="notes_mask must be a real tensor of the shape of its input ids"):
        input_checks_us(composed, {**inputs, "notes_mask": inputs["notes_mask"][:, :2]}, calls=3)


# -- the command's output: settings first, progress per variant, why a variant was skipped -------------------
def _bench_parser():
    from calmgraph.cli import parser
    sub = next(a for a in parser()._actions if a.dest == "command")
    return sub.choices["bench"]


def test_bench_takes_verbose_and_every_option_has_help():
    bench = _bench_parser()
    args = bench.parse_args(["-v", "spec.yaml", "--device", "cpu", "--batch", "2", "--seq", "8"])
    assert (args.verbose, args.spec, args.device, args.batch, args.seq) == (True, "spec.yaml", "cpu", 2, 8)
    assert bench.parse_args(["--verbose", "spec.yaml"]).verbose is True
    for action in bench._actions:
        assert action.help and action.help.strip(), f"{action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("option", [["--batch", "0"], ["--seq", "-3"], ["--prompt-len", "x"], ["--device", "nonsense"],
                                    ["--json", "no/such/folder/out.json"]])
def test_bench_refuses_bad_options_as_usage_errors(option, capsys):
    from calmgraph.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "spec.yaml", *option])
    assert exit_.value.code == 2
    assert option[0] in capsys.readouterr().err


def test_bench_prints_its_settings_first_and_why_variants_were_skipped(capsys):
    from calmgraph.cli import main
    assert main(["bench", "-v", str(demo_spec_path()), "--models", "calmgraph.demo.models:demo_models", "--quick",
                 "--no-compile", "--batch", "1", "--seq", "8"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    settings = out[:out.index("fused/parts")]  # everything printed before the results
    for line in ("device    cpu", "batch     1", "seq       8", "budget    no warm-up, 3 rounds",
                 "variants  fused, parts, part_detail, hooks, no_checks, unpruned, calm_pytorch;",
                 "compiled off (--no-compile)", "steps     forward and training step"):
        assert line in settings
    assert out.index("device") < out.index("median ms")
    # the demo models are not x-transformers: CALM-pytorch is skipped, and the normal output says why
    assert "skipped calm_pytorch: " in out and ("x-transformers" in out or "not installed" in out)
    for name in ("parts", "hooks", "no_checks", "unpruned"):  # progress on stderr, one line per variant built
        assert f"building {name}: " in captured.err
    assert "calm_pytorch skipped: " in captured.err


def test_bench_says_when_calm_pytorch_is_not_installed(demo, monkeypatch):
    from calmgraph.bench import QUICK, bench_composition
    composed, models, _ = demo
    monkeypatch.setitem(sys.modules, "CALM_pytorch", None)  # import CALM_pytorch now raises ImportError
    result = bench_composition(composed, models, batch=1, seq=8, budget=QUICK, variants=("calm_pytorch",))
    assert "not installed" in result["notes"]["calm_pytorch"]
    assert set(result["times"]["forward"]) == {"fused"}
    with pytest.raises(ValueError, match="unknown benchmark variants \\['calm'\\]"):
        bench_composition(composed, models, batch=1, seq=8, budget=QUICK, variants=("calm",))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _timed_with(console):
    calls = {"fused": 0, "hooks": 0}
    fns = {k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}
    budget = Budget(warmup_s=0.0, rounds=3, max_s=60.0, min_rounds=3)
    with console.timing("forward", list(fns), budget) as observe:
        return time_round_robin(fns, torch.device("cpu"), budget, observe)


def test_console_draws_a_tqdm_bar_per_variant_on_a_terminal():
    pytest.importorskip("tqdm")
    from calmgraph.bench import Console
    stream = _Terminal()
    _timed_with(Console(stream))
    text = stream.getvalue()
    for name in ("fused", "hooks"):  # each variant's own bar, run to its 3 rounds
        assert re.search(rf"forward {name}\s*: 100%.*3/3", text), text


@pytest.mark.parametrize("why", ["no tqdm", "no terminal"])
def test_console_prints_one_line_per_variant_without_tqdm_or_terminal(why, monkeypatch):
    from calmgraph.bench import Console
    if why == "no tqdm":
        monkeypatch.setitem(sys.modules, "tqdm", None)
    stream = _Terminal() if why == "no tqdm" else io.StringIO()
    result = _timed_with(Console(stream))
    lines = [l.split() for l in stream.getvalue().splitlines() if l.startswith("  forward ")]
    assert [l[1] for l in lines] == ["fused", "hooks"]
    for line in lines:  # the median each line shows is the one the result holds
        assert float(line[3]) == pytest.approx(result[line[1]]["median_ms"], abs=5e-4)
    assert "%" not in stream.getvalue()  # no bar


def test_nothing_in_calmgraph_imports_the_harness_but_the_command_line():
    root = Path(cg.__file__).parent
    importers = []
    for path in root.rglob("*.py"):
        if "bench" in path.relative_to(root).parts[:1] or path.name == "cli.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{'.' * node.level}{node.module or ''}"] + [a.name for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if any("bench" in n.split(".") for n in names):
                importers.append(str(path.relative_to(root)))
    assert importers == []
    # and the command line reads the bench options without loading the harness
    code = "import sys, calmgraph.cli as c; c.parser(); print(sorted(m for m in sys.modules if m.startswith('calmgraph.bench')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(root.parent)}).stdout
    assert loaded.strip() == "['calmgraph.bench', 'calmgraph.bench.cli']"

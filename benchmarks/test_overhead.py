"""The variants `overhead.py` compares, as pytest-benchmark cases on one small composition; each also checks
that it computes what the fused graph computes, so a benchmark cannot silently time the wrong thing."""
import json

import pytest
import torch

from calmgraph.bench import (HookComposition, Parts, calm_pytorch_call, calm_pytorch_composition, train_step,
                             without_checks)


@pytest.fixture(scope="module")
def fused_out(composition):
    composed, _, _, fwd = composition
    with torch.no_grad():
        return composed(**fwd)


@pytest.mark.benchmark(group="forward")
def test_fused_forward(benchmark, composition):
    composed, _, _, fwd = composition
    with torch.no_grad():
        out = benchmark(lambda: composed(**fwd))
    assert out.shape == (*fwd["input_ids"].shape, 128)


@pytest.mark.benchmark(group="forward")
def test_parts_forward(benchmark, composition):
    composed, models, _, fwd = composition
    parts = Parts(composed, models, fwd)
    assert len(parts.blocks) == len(composed.links)  # every cross-attention block, captured once
    with torch.no_grad():
        benchmark(lambda: parts(**fwd))


@pytest.mark.benchmark(group="forward")
def test_hooks_forward(benchmark, composition, fused_out):
    composed, models, _, fwd = composition
    hooks = HookComposition(composed, models)
    with torch.no_grad():
        out = benchmark(lambda: hooks(**fwd))
    torch.testing.assert_close(out, fused_out, rtol=0, atol=1e-5)


@pytest.mark.benchmark(group="forward")
def test_fused_without_checks_forward(benchmark, composition, fused_out):
    composed, _, _, fwd = composition
    bare = without_checks(composed)
    with torch.no_grad():
        out = benchmark(lambda: bare(**fwd))
    assert torch.equal(out, fused_out)


@pytest.mark.benchmark(group="forward")
def test_calm_pytorch_forward(benchmark, composition):
    pytest.importorskip("CALM_pytorch")
    composed, models, inputs, fwd = composition
    calm = calm_pytorch_composition(composed, models)
    with torch.no_grad():
        out = benchmark(lambda: calm_pytorch_call(calm, composed.spec, inputs, train=False))
    # its output projections start at zero: it computes the anchor alone
    torch.testing.assert_close(out, models["anchor"](fwd["input_ids"]), rtol=0, atol=1e-5)


@pytest.mark.benchmark(group="train step")
def test_fused_train_step(benchmark, composition):
    composed, _, inputs, _ = composition
    params = list(composed.new_parameters())
    benchmark(lambda: train_step(composed, inputs, params))


@pytest.mark.benchmark(group="train step")
def test_hooks_train_step(benchmark, composition):
    composed, models, inputs, _ = composition
    hooks = HookComposition(composed, models)
    benchmark(lambda: train_step(hooks, inputs, list(composed.new_parameters())))


@pytest.mark.benchmark(group="train step")
def test_calm_pytorch_train_step(benchmark, composition):
    pytest.importorskip("CALM_pytorch")
    composed, models, inputs, _ = composition
    calm = calm_pytorch_composition(composed, models)
    benchmark(lambda: calm_pytorch_call(calm, composed.spec, inputs, train=True).backward())


def test_overhead_script_quick(tmp_path):
    """overhead.py end to end on tiny shapes: every section runs and lands in the JSON."""
    from benchmarks import overhead
    out = tmp_path / "quick.json"
    assert overhead.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"date", "machine", "versions", "command", "main", "dynamo", "scaling", "pruning", "compile_time",
            "targets"} <= set(report)
    assert {"fused", "parts", "hooks", "fused_no_checks", "fused_unpruned"} <= set(report["main"]["times"]["forward"])
    assert [row["augments"] for row in report["scaling"]["augments"]] == [1, 2]

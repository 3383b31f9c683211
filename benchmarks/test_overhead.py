"""The variants `overhead.py` compares, as pytest-benchmark cases on one small composition; each also checks
that it computes what the fused graph computes, so a benchmark cannot silently time the wrong thing."""
import json

import pytest
import torch
import torch.nn.functional as F

from calmgraph.bench import (HookComposition, Parts, calm_pytorch_call, calm_pytorch_composition, forward_inputs,
                             train_step, without_checks)


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


def reference_loss(composed, models, inputs):
    """The train step's loss computed by the eager reference: hooks on the user's own models, explicit
    softmax cross-attention (no autograd)."""
    from tests.support import eager_reference
    fwd = forward_inputs(inputs)
    prompts = {a.name: (fwd[f"{a.name}_input_ids"], fwd.get(f"{a.name}_mask")) for a in composed.spec.prompts}
    return next_token_loss(eager_reference(composed, models, fwd["input_ids"], prompts), inputs)


def reference_slope(composed, models, inputs, direction, eps=2e-3):
    """d loss / d t at t = 0 along `direction` (per new parameter), by central differences of the reference
    loss: what <gradient, direction> must be (to the differences' error, about 1%)."""
    params = dict(composed.named_new_parameters())
    losses = []
    for sign in (1, -1):
        with torch.no_grad():
            for n, p in params.items():
                p.add_(direction[n], alpha=sign * eps)
        losses.append(reference_loss(composed, models, inputs).double())
        with torch.no_grad():
            for n, p in params.items():
                p.sub_(direction[n], alpha=sign * eps)
    return float((losses[0] - losses[1]) / (2 * eps))


def next_token_loss(logits, inputs):
    return F.cross_entropy(logits.flatten(0, 1).float(), inputs["input_ids"][:, 1:].flatten())  # as train_step


def measured_step(benchmark, model, composed, inputs):
    """Benchmark `train_step` on `model`, recording the logits and the new parameters' gradients it made."""
    seen, params = {}, dict(composed.named_new_parameters())

    def recording(**kw):
        seen["logits"] = model(**kw)
        return seen["logits"]

    hooks = [p.register_hook(lambda g, n=n: seen.__setitem__(n, g.detach().clone())) for n, p in params.items()]
    try:
        benchmark(lambda: train_step(recording, inputs, list(params.values())))
    finally:
        for h in hooks:
            h.remove()
    return next_token_loss(seen["logits"].detach(), inputs), {n: seen.get(n) for n in params}


def check_step(got, want, models, composed):
    (loss, grads), (want_loss, direction, slope) = got, want
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert all(g is not None for g in grads.values())  # every new parameter learns
    along = sum(float((g.double() * direction[n].double()).sum()) for n, g in grads.items())
    assert abs(slope) > 1e-3 and along == pytest.approx(slope, rel=2e-2)
    frozen = [n for n, p in composed.named_parameters() if not n.startswith("xattn.")]
    assert frozen and all(composed.get_parameter(n).grad is None for n in frozen)  # only new parameters learn
    assert all(p.grad is None for m in models.values() for p in m.parameters())  # the user's models untouched


@pytest.fixture(scope="module")
def reference(composition):
    composed, models, inputs, _ = composition
    g = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(p.shape, generator=g) for n, p in composed.named_new_parameters()}
    return reference_loss(composed, models, inputs), direction, reference_slope(composed, models, inputs, direction)


@pytest.mark.benchmark(group="train step")
def test_fused_train_step(benchmark, composition, reference):
    composed, models, inputs, _ = composition
    check_step(measured_step(benchmark, composed, composed, inputs), reference, models, composed)


@pytest.mark.benchmark(group="train step")
def test_hooks_train_step(benchmark, composition, reference):
    composed, models, inputs, _ = composition
    hooks = HookComposition(composed, models)
    check_step(measured_step(benchmark, hooks, composed, inputs), reference, models, composed)


@pytest.mark.benchmark(group="train step")
def test_calm_pytorch_train_step(benchmark, composition):
    pytest.importorskip("CALM_pytorch")
    composed, models, inputs, fwd = composition
    calm = calm_pytorch_composition(composed, models)
    losses = []
    benchmark(lambda: losses.append(calm_pytorch_call(calm, composed.spec, inputs, train=True)) or losses[-1].backward())
    # its output projections start at zero: its loss is the anchor's alone, and only its new blocks learn
    with torch.no_grad():
        want = next_token_loss(models["anchor"](fwd["input_ids"]), inputs)
    assert torch.isfinite(losses[-1])
    torch.testing.assert_close(losses[-1].detach(), want, rtol=1e-5, atol=1e-6)
    learned = {n for n, p in calm.named_parameters() if p.grad is not None}
    llms = {n for n, _ in calm.named_parameters() if n.startswith(("anchor_llm.", "augment_llms."))}
    assert learned and llms and not learned & llms


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

"""Compiling never changes the user's models and never copies their weights.

For every family: the state of each model (parameters' values, storage, dtype, device, requires_grad and
grad; buffers; every module's training flag and hooks) is the same before and after `compile`, the user's
hooks are not called by compiling nor by the composed model, and every tensor the composed model holds
either shares storage with the user's models or is one of its new cross-attention parameters.
Determinism: the same spec compiled twice gives the same graph code and, under the same seed, the same
new parameters.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import calmgraph as cg
from families import Unbuildable, causal_lm_families, family_models, family_spec, small_model
from test_families import EXPECTED_ERRORS, FAST, handwritten_gpt, small_encoder, small_vit, prompt_spec, xtransformers

FAMILIES = causal_lm_families() if os.environ.get("CALMGRAPH_FULL_SWEEP") == "1" else FAST


def snapshot(model: nn.Module) -> dict:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {
        "params": {n: (p.data_ptr(), p.dtype, p.device, p.requires_grad, p.grad is None, p.detach().clone())
                   for n, p in model.named_parameters()},
        "buffers": {n: (b.data_ptr(), b.dtype, b.clone()) for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: [list(getattr(m, h).items()) for h in hooks] for n, m in model.named_modules()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
    }


def assert_same(before: dict, after: dict):
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["params"].keys() == before["params"].keys()
    for name, (ptr, dtype, device, grad_flag, no_grad, value) in before["params"].items():
        ptr2, dtype2, device2, grad_flag2, no_grad2, value2 = after["params"][name]
        assert (ptr2, dtype2, device2, grad_flag2, no_grad2) == (ptr, dtype, device, grad_flag, no_grad), name
        assert torch.equal(value2, value), name
    assert after["buffers"].keys() == before["buffers"].keys()
    for name, (ptr, dtype, value) in before["buffers"].items():
        assert after["buffers"][name][:2] == (ptr, dtype) and torch.equal(after["buffers"][name][2], value), name


def dress(model: nn.Module, calls: list) -> nn.Module:
    """Give the model user state compiling must keep: train mode with one module in eval, a frozen first
    parameter, and forward, pre-forward and backward hooks that record when they run."""
    model.train()
    children = list(model.modules())
    children[-1].eval()
    next(model.parameters()).requires_grad_(False)
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList)][0]
    blocks[0].register_forward_hook(lambda m, a, o: calls.append("forward"))
    blocks[0].register_forward_pre_hook(lambda m, a: calls.append("pre"))
    model.register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    return model


def storages(module: nn.Module) -> dict[int, int]:
    """{storage pointer: bytes} of every parameter and buffer."""
    tensors = [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def check_nothing_lost(spec, models: dict[str, nn.Module], call):
    calls: list = []
    for m in models.values():
        dress(m, calls)
    before = {n: snapshot(m) for n, m in models.items()}
    composed = cg.compile(spec, models)
    for n, m in models.items():
        assert_same(before[n], snapshot(m))
    assert calls == [], "compiling must not run the user's hooks"
    # no weight copied: every storage the composed model holds is the user's or a new parameter's
    user = {}
    for m in models.values():
        user.update(storages(m))
    new = storages(composed.get_submodule("xattn"))
    held = storages(composed)
    extra = {p: b for p, b in held.items() if p not in user and p not in new}
    assert sum(extra.values()) <= 4096, f"composed model holds {sum(extra.values())} bytes of copies"
    # the composed model runs without touching the user's state or calling their hooks
    with torch.no_grad():
        call(composed)
    assert calls == []
    for n, m in models.items():
        assert_same(before[n], snapshot(m))
    return composed


IDS = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("role", ["anchor", "augment"])
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_leaves_family_untouched(family, role):
    try:
        model = small_model(family)
    except Unbuildable as e:
        pytest.skip(f"{family}: {e}")
    models = family_models(model, role)
    expected = EXPECTED_ERRORS.get((family, role), EXPECTED_ERRORS.get(family))
    if expected is not None:  # refusing must leave the models untouched too
        calls: list = []
        before = {n: snapshot(dress(m, calls)) for n, m in models.items()}
        with pytest.raises(cg.CalmGraphError, match=expected):
            cg.compile(family_spec(), models)
        assert calls == [] and all(assert_same(before[n], snapshot(m)) is None for n, m in models.items())
        return
    check_nothing_lost(family_spec(), models, lambda c: c(IDS))


@pytest.mark.parametrize("build", [handwritten_gpt, xtransformers], ids=["handwritten_gpt", "x-transformers"])
def test_compile_leaves_non_hf_decoder_untouched(build):
    check_nothing_lost(family_spec(), family_models(build(), "anchor"), lambda c: c(IDS))


def test_compile_leaves_encoder_and_vit_untouched():
    docs = torch.randint(3, 96, (2, 6))
    check_nothing_lost(prompt_spec(), {"base": small_model("llama"), "docs": small_encoder("bert")},
                       lambda c: c(IDS, docs_input_ids=docs))
    check_nothing_lost(prompt_spec("pixel_values"), {"base": small_model("llama"), "docs": small_vit()},
                       lambda c: c(IDS, docs_pixel_values=torch.randn(2, 3, 16, 16)))


def test_training_the_composition_leaves_the_models_untouched():
    """A backward pass and an optimiser step reach only the new parameters."""
    models = family_models(small_model("gpt2"), "anchor")
    before = {n: snapshot(m) for n, m in models.items()}
    composed = cg.compile(family_spec(), models)
    composed.train()
    opt = torch.optim.SGD(composed.new_parameters(), lr=0.1)
    composed(IDS).logsumexp(-1).mean().backward()
    opt.step()
    assert all(p.grad is not None for p in composed.new_parameters())
    assert not any(p.requires_grad for n, p in composed.named_parameters() if not n.startswith("xattn."))
    for n, m in models.items():
        assert_same(before[n], snapshot(m))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compile_is_deterministic(family):
    models = family_models(small_model(family), "augment")
    spec = family_spec()
    spec["edges"][0]["layers"] = [[0, 0], [1, 2], [-1, 1]]
    torch.manual_seed(7)
    first = cg.compile(spec, models)
    torch.manual_seed(7)
    second = cg.compile(spec, models)
    assert first.code == second.code
    a, b = dict(first.named_new_parameters()), dict(second.named_new_parameters())
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(8)
    third = cg.compile(spec, models)
    assert third.code == first.code
    assert not all(torch.equal(a[k], v) for k, v in third.named_new_parameters())

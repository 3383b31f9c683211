"""Checkpoints of the new parameters: a bit-exact round trip, only new parameters in the file, and every
checkpoint that does not fit refused with a clear error and nothing changed."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import calmgraph as cg
from calmgraph.demo.models import demo_models
from calmgraph.demo.run import demo_spec_path

SPEC = cg.load_spec(str(demo_spec_path()))
MODELS = demo_models(0)


def compose(spec=SPEC, seed=None):
    composed = cg.compile(spec, models=MODELS)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in composed.new_parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return composed


def snapshot(composed):
    return {k: v.clone() for k, v in composed.state_dict().items()}


def unchanged(composed, before):
    after = composed.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    trained = compose(seed=1)
    folder = tmp_path_factory.mktemp("ckpt")
    trained.save_new(folder)
    return trained, folder


def test_round_trip_is_bit_exact_and_leaves_frozen_weights_alone(saved):
    trained, folder = saved
    fresh = compose()
    frozen_before = {k: v.clone() for k, v in fresh.state_dict().items() if not k.startswith("xattn.")}
    assert cg.load_new(fresh, folder) is fresh
    for (name, p), (_, q) in zip(trained.named_new_parameters(), fresh.named_new_parameters()):
        assert torch.equal(p, q), name
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in frozen_before.items())
    ids, notes = torch.randint(0, 96, (2, 7)), torch.randint(0, 96, (2, 4))
    with torch.no_grad():
        assert torch.equal(fresh(ids, notes), trained(ids, notes))


def test_the_file_holds_only_the_new_parameters_and_the_spec(saved):
    trained, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["new_params.safetensors", "spec.json"]
    tensors = load_file(folder / "new_params.safetensors")
    assert set(tensors) == {n for n, _ in trained.named_new_parameters()}
    assert all(name.startswith("xattn.") for name in tensors)
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in trained.new_parameters())
    with safe_open(folder / "new_params.safetensors", framework="pt") as f:
        assert cg.CompositionSpec.from_json(f.metadata()["calmgraph_spec"]) == SPEC
    assert cg.CompositionSpec.from_json((folder / "spec.json").read_text()) == SPEC


def test_a_safetensors_file_path_works_too(tmp_path):
    trained = compose(seed=2)
    file = trained.save_new(tmp_path / "step_100.safetensors")
    assert file == tmp_path / "step_100.safetensors" and (tmp_path / "step_100.spec.json").is_file()
    assert not (tmp_path / "spec.json").exists()  # a folder's spec.json may belong to another checkpoint
    fresh = cg.load_new(compose(), file)
    assert all(torch.equal(p, q) for p, q in zip(trained.new_parameters(), fresh.new_parameters()))


def test_where_models_come_from_does_not_matter():
    # the same composition, its models now named by a source: the checkpoint still fits
    data = SPEC.to_dict()
    data["anchor"]["source"] = {"python": "calmgraph.demo.models:TinyLM"}
    assert cg.checkpoint._spec_problems(SPEC.to_json(), type("C", (), {"spec": cg.load_spec(data)})()) == []


def rewrite(folder, tmp_path, edit, metadata_edit=None):
    """A copy of the checkpoint with its tensors (and metadata) edited."""
    with safe_open(folder / "new_params.safetensors", framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(folder / "new_params.safetensors")
    edit(tensors)
    if metadata_edit:
        metadata_edit(metadata)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, out, metadata=metadata)
    return out


KEY = "xattn.arith_to_base.l1_to_l2.to_q.weight"


def spec_with(**changes):
    data = SPEC.to_dict()
    for path, value in changes.items():
        *keys, last = path.split("__")
        node = data
        for k in keys:
            node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
        node[last] = value
    return data


@pytest.mark.parametrize("case, message", [
    ("missing", f"missing 1 tensor(s): {KEY}"),
    ("extra", "1 tensor(s) the composition does not have: xattn.extra.weight"),
    ("shape", f"{KEY}: shape (64, 32) in the checkpoint, (64, 64) in the composition"),
    ("dtype", f"{KEY}: dtype torch.int64 in the checkpoint, torch.float32 in the composition"),
    ("spec", 'it was saved from a different spec (edges[1].layers[0][1]: checkpoint 4, composition 3)'),
])
def test_a_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(saved, tmp_path, case, message):
    _, folder = saved
    edits = {
        "missing": lambda t: t.pop(KEY),
        "extra": lambda t: t.update({"xattn.extra.weight": torch.zeros(2)}),
        "shape": lambda t: t.update({KEY: torch.zeros(64, 32)}),
        "dtype": lambda t: t.update({KEY: torch.zeros(64, 64, dtype=torch.long)}),
        "spec": lambda t: None,
    }
    other = spec_with(edges__1__layers=[[-1, 4]])
    metadata_edit = (lambda m: m.update({"calmgraph_spec": json.dumps(other)})) if case == "spec" else None
    file = rewrite(folder, tmp_path, edits[case], metadata_edit)
    target = compose(seed=3)
    before = snapshot(target)
    with pytest.raises(cg.CheckpointError) as e:
        cg.load_new(target, file)
    assert "does not fit this composition; nothing was loaded" in str(e.value) and message in str(e.value), str(e.value)
    assert unchanged(target, before)


def test_a_composition_from_another_spec_refuses_with_every_reason(saved):
    _, folder = saved
    other = compose(cg.load_spec(spec_with(edges__1__cross_attention={"heads": 4}, cross_attention__norm="layer")))
    before = snapshot(other)
    with pytest.raises(cg.CheckpointError) as e:
        cg.load_new(other, folder)
    text = str(e.value)
    assert 'cross_attention.norm: checkpoint "rms", composition "layer"' in text
    assert 'edges[1].cross_attention.heads: checkpoint 2, composition 4' in text
    assert "missing 3 tensor(s): xattn.arith_to_base.l1_to_l2.norm.bias" in text  # LayerNorm has biases, RMSNorm none
    assert unchanged(other, before)


def test_missing_or_unreadable_files_are_refused_and_pickles_never_loaded(tmp_path):
    target = compose()
    with pytest.raises(cg.CheckpointError, match="no checkpoint at .*expected a file written by composed.save_new"):
        cg.load_new(target, tmp_path / "nowhere")
    pickled = tmp_path / "new_params.safetensors"
    torch.save({KEY: torch.zeros(64, 64)}, pickled)  # a pickle under the expected name
    with pytest.raises(cg.CheckpointError, match="is not a readable safetensors file"):
        cg.load_new(target, tmp_path)

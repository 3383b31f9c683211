"""FineTuner's checkpoints: one format with `save_new` (spec included), old ones still load, and a bad
TrainConfig or checkpoint is refused before anything changes."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import calmgraph as cg
from calmgraph.demo.models import TinyLM
from calmgraph.train import FineTuner, TrainConfig, list_checkpoints

PLAIN = {"anchor": {"name": "base"}, "augments": [{"name": "aug"}],
         "edges": [{"source": "aug", "target": "base", "layers": [[-1, 0]]}]}
torch.manual_seed(0)
MODELS = {"base": TinyLM(vocab=64, dim=24, depth=2, heads=2), "aug": TinyLM(vocab=64, dim=16, depth=2, heads=2)}


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"input_ids": torch.randint(0, 64, (6,), generator=torch.Generator().manual_seed(i))}


def config(tmp_path, **kw):
    return TrainConfig(**{**dict(max_steps=2, batch_size=4, lr=1e-2, progress=False, shuffle=False, cpu=True,
                                 save_every=2, output_dir=str(tmp_path)), **kw})


def new_params(composed):
    return {n: p.detach().clone() for n, p in composed.named_new_parameters()}


def test_a_finetuner_checkpoint_is_a_save_new_checkpoint_with_its_spec(tmp_path):
    composed = cg.compile(PLAIN, models=MODELS)
    FineTuner(composed, Tokens(), config(tmp_path)).train()
    step = list_checkpoints(tmp_path)[-1]
    assert cg.CompositionSpec.from_json((step / "spec.json").read_text()) == composed.spec
    fresh = cg.compile(PLAIN, models=MODELS)
    cg.load_new(fresh, step)  # the library's loader reads a training checkpoint: same files, same checks
    trained = new_params(composed)
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_new_parameters())
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in trained.items() if "to_out" in n)
    other = cg.compile({**PLAIN, "cross_attention": {"norm": "layer"}}, models=MODELS)
    with pytest.raises(cg.CheckpointError, match="saved from a different spec"):
        cg.load_new(other, step)


def test_an_old_checkpoint_without_a_spec_still_resumes(tmp_path):
    composed = cg.compile(PLAIN, models=MODELS)
    FineTuner(composed, Tokens(), config(tmp_path)).train()
    step = list_checkpoints(tmp_path)[-1]
    (step / "spec.json").unlink()  # as the FineTuner of before wrote it: tensors only, no metadata
    save_file(load_file(step / "new_params.safetensors"), step / "new_params.safetensors")
    fresh = cg.compile(PLAIN, models=MODELS)
    tuner = FineTuner(fresh, Tokens(), config(tmp_path))
    tuner.load_checkpoint(step)
    trained = new_params(composed)
    assert tuner.step == 2 and all(torch.equal(p, trained[n]) for n, p in fresh.named_new_parameters())
    assert json.loads((step / "state.json").read_text())["step"] == 2

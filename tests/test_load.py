"""`cg.load`: a saved composition rebuilt from its own folder, from any working directory."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import calmgraph as cg
from calmgraph.train import FineTuner, TrainConfig, list_checkpoints

FACTORIES = """
import torch
from calmgraph.demo.models import TinyLM

def lm(dim, seed):
    torch.manual_seed(seed)
    return TinyLM(vocab=64, dim=dim, depth=2, heads=2)
"""
SPEC = """
anchor: {name: base, source: {python: "models.py:lm", kwargs: {dim: 24, seed: 0}}}
augments:
  - {name: aug, source: {python: "models.py:lm", kwargs: {dim: 16, seed: 1}}}
edges: [{source: aug, target: base, layers: [[-1, 0]]}]
"""
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def project(tmp_path):
    """A spec beside its factory file, compiled from the file, with trained-looking new parameters."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "models.py").write_text(FACTORIES)
    (folder / "spec.yaml").write_text(SPEC)
    composed = cg.compile(folder / "spec.yaml", trust_code=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in composed.new_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return folder, composed


def load_elsewhere(path: Path, cwd: Path) -> torch.Tensor:
    """cg.load in a fresh process whose working directory is `cwd`; its logits on IDS."""
    cwd.mkdir(exist_ok=True)
    code = textwrap.dedent(f"""
        import sys, torch, calmgraph as cg
        composed = cg.load({str(path)!r}, trust_code=True)
        assert not composed.training
        torch.save(composed(torch.tensor({IDS.tolist()})).detach(), "logits.pt")
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(cg.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(cwd / "logits.pt")


def test_load_rebuilds_a_save_new_folder_from_another_directory(project, tmp_path):
    folder, composed = project
    composed.save_new(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "spec.json").read_text())
    assert saved["anchor"]["source"]["python"] == f"{folder.resolve() / 'models.py'}:lm"  # recorded absolute
    with torch.no_grad():
        expected = composed.eval()(IDS)
    assert torch.equal(load_elsewhere(tmp_path / "ckpt", tmp_path / "elsewhere"), expected)
    assert not torch.equal(expected, composed.anchor_model(IDS))  # the new parameters matter


def test_load_rebuilds_a_finetuner_step_folder(project, tmp_path):
    _, composed = project
    data = [{"input_ids": IDS[0]}, {"input_ids": IDS[1]}] * 2
    FineTuner(composed, data, TrainConfig(max_steps=1, batch_size=2, lr=1e-2, progress=False, cpu=True,
                                          save_every=1, output_dir=str(tmp_path / "run"))).train()
    step = list_checkpoints(tmp_path / "run")[-1]
    with torch.no_grad():
        expected = composed.eval()(IDS)
    assert torch.equal(load_elsewhere(step, tmp_path / "other"), expected)


def test_a_relative_source_left_in_a_saved_spec_starts_at_the_checkpoint_folder(project, tmp_path):
    folder, composed = project
    file = composed.save_new(tmp_path / "ckpt" / "x.safetensors")
    # a spec written by hand (or by an older calmgraph): relative paths, the factory copied beside it
    (tmp_path / "ckpt" / "models.py").write_text(FACTORIES)
    from safetensors.torch import load_file, save_file
    relative = cg.CompositionSpec.from_yaml(SPEC)
    save_file(load_file(file), file, metadata={"calmgraph_spec": relative.to_json()})
    with torch.no_grad():
        expected = composed.eval()(IDS)
    assert torch.equal(cg.load(file, trust_code=True)(IDS), expected)


def test_models_passed_in_win_and_python_sources_need_consent(project, tmp_path):
    folder, composed = project
    composed.save_new(tmp_path / "ckpt")
    with pytest.raises(cg.SpecError, match="trust_code=True"):
        cg.load(tmp_path / "ckpt")
    namespace = {}
    exec(FACTORIES, namespace)  # the same models, built here: no source runs
    given = {"base": namespace["lm"](24, 0), "aug": namespace["lm"](16, 1)}
    assert torch.equal(cg.load(tmp_path / "ckpt", models=given)(IDS), composed.eval()(IDS))


def test_load_of_a_missing_or_spec_less_checkpoint_is_a_clear_error(project, tmp_path):
    _, composed = project
    with pytest.raises(cg.CheckpointError, match="no checkpoint at"):
        cg.load(tmp_path / "nothing")
    file = composed.save_new(tmp_path / "x.safetensors")
    from safetensors.torch import load_file, save_file
    save_file(load_file(file), file)  # no metadata
    (tmp_path / "x.spec.json").unlink()
    with pytest.raises(cg.CheckpointError, match="records no spec"):
        cg.load(file)

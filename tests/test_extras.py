"""Optional dependencies: each error for a missing one names the pyproject extra that installs it."""
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import calmgraph as cg
from calmgraph.demo.models import TinyLM
from calmgraph.errors import DependencyError, ExportError, ModelError
from calmgraph.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]


def composed():
    spec = cg.CompositionSpec(anchor={"name": "base"}, augments=[{"name": "kv"}],
                              edges=[{"source": "kv", "target": "base", "layers": {"every": 2}}])
    torch.manual_seed(0)
    return cg.compile(spec, models={"base": TinyLM(dim=32, depth=2, heads=2), "kv": TinyLM(dim=24, depth=2, heads=2)})


def test_the_extras_install_what_the_errors_name():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert sorted(m.split(">")[0] for m in extras[extra] if m.split(">")[0] in modules) == sorted(modules)


def test_a_transformers_source_without_transformers_names_the_hf_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    spec = cg.CompositionSpec(anchor={"name": "base", "source": {"hf_config": {"model_type": "llama"}}},
                              augments=[{"name": "kv"}], edges=[{"source": "kv", "target": "base", "layers": {"every": 1}}])
    with pytest.raises(ModelError, match=r'needs transformers; install the \[hf\] extra: pip install -e "\.\[hf\]"'):
        cg.load_models(spec, {"kv": TinyLM()})


def test_onnx_export_without_onnxscript_names_the_onnx_extra_and_writes_nothing(monkeypatch, tmp_path):
    model = composed()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ExportError, match=r"ONNX export needs onnxscript; install the \[onnx\] extra"):
        model.export(tmp_path / "out" / "composed.onnx", format="onnx")
    assert not (tmp_path / "out" / "composed.onnx").exists()


def test_finetuner_without_accelerate_names_the_train_extra(monkeypatch):
    model = composed()
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(DependencyError, match=r"FineTuner needs accelerate; install the \[train\] extra"):
        cg.FineTuner(model, [], cg.TrainConfig(max_steps=1))


def test_print_trainable_parameters_is_peft_s_count(capsys):
    model = composed()
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    # PEFT's definition: parameters with requires_grad over all parameters, each tensor once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert line == f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    assert trainable == sum(p.numel() for p in model.new_parameters()) > 0
    assert line in model.summary().splitlines()

"""Every spec shipped in examples/ validates, builds from its sources, compiles, and computes exactly its
anchor at initialisation (the zero-initialised cross-attention adds nothing yet)."""
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import calmgraph as cg
from calmgraph.tracing.entry import Entry

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPECS = sorted(p for suffix in ("*.yaml", "*.yml", "*.json") for p in EXAMPLES.rglob(suffix)
               if "results" not in p.relative_to(EXAMPLES).parts)  # measured results, not specs


def test_there_are_examples_with_every_source_kind():
    kinds = {type(m.source).__name__ for p in SPECS for m in cg.load_spec(p).models}
    assert {"HfConfigSource", "PythonSource"} <= kinds


def vocab(model: nn.Module) -> int:
    return next(m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding))  # token embeddings first


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_spec_compiles_to_its_anchor_at_init(path):
    spec = cg.load_spec(path)
    models = cg.load_models(path, trust_code=True)  # the project's own examples
    composed = cg.compile(path, models=models)
    assert composed.spec == spec and len(composed.links) > 0

    g = torch.Generator().manual_seed(0)
    n = min(vocab(m) for m in models.values())
    ids = torch.randint(0, n, (2, 12), generator=g)
    prompts = [torch.randint(0, n, (2, 6), generator=g) for a in spec.augments if a.input == "prompt"]
    with torch.no_grad():
        fused = composed(ids, *prompts)
        anchor = Entry(models[spec.anchor.name])(ids)
    assert torch.allclose(fused, anchor, atol=1e-6, rtol=0), (fused - anchor).abs().max()


BENCH_SPECS = sorted((EXAMPLES.parent / "benchmarks" / "specs").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCH_SPECS, ids=lambda p: p.name)
def test_benchmark_specs_validate(path, capsys):
    """The benchmark's own specs (LLM-sized models: validated on the meta device, not compiled here)."""
    from calmgraph.cli import main
    assert main(["validate", str(path), "--trust-code"]) == 0
    assert "valid (2 models, 1 edge, 3 layer pairs)" in capsys.readouterr().out

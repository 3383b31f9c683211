"""pytest-benchmark suite. CI runs it quick (each benchmark once, small shapes):

    python -m pytest benchmarks --benchmark-disable

Timing it for real: `python -m pytest benchmarks --benchmark-only` (CPU; GPU numbers come from overhead.py,
which synchronises and uses CUDA events)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks.compositions` from any cwd

from benchmarks.compositions import calm_models, calm_spec  # noqa: E402


@pytest.fixture(scope="session")
def composition():
    """Anchor + 2 prompt augments (x-transformers, 4 blocks, dim 64), wired as CALM-pytorch wires them,
    with random cross-attention weights (zero-initialised ones would make every delta 0)."""
    import calmgraph as cg
    from calmgraph.bench import forward_inputs, make_inputs
    models = calm_models(2, dim=64, depth=4, heads=4, vocab=128)
    composed = cg.compile(calm_spec(2, 4, 4), models=models)
    torch.manual_seed(1)
    for p in composed.new_parameters():
        torch.nn.init.normal_(p, std=0.02)
    inputs = make_inputs(composed, models, batch=2, seq=32)
    return composed, models, inputs, forward_inputs(inputs)

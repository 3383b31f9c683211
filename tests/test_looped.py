"""A block that runs more than once in one forward (a looped middle) has no single output to tap: compile
must refuse a link that taps one, with a TraceError saying which block runs how many times, and must still
compose links that tap only the blocks that run once (checked against the eager hook reference)."""
from __future__ import annotations

import pytest
import torch

import calmgraph as cg
import calmgraph.passes.trace as trace
from calmgraph.demo.models import TinyLM
from families import VOCAB, family_models, partner, small_model
from reference import eager_reference, randomize_new_parameters


class LoopedLM(TinyLM):
    """Block 0 once, block 1 `loops` times, block 2 once: the shape of dory's looped middle."""

    def __init__(self, loops: int = 2):
        super().__init__(vocab=VOCAB, dim=32, depth=3, heads=4)
        self.loops = loops

    def forward(self, input_ids):
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        x = self.layers[0](x)
        for _ in range(self.loops):
            x = self.layers[1](x)
        x = self.layers[2](x)
        return self.head(self.norm(x))


def looped(loops: int = 2) -> LoopedLM:
    torch.manual_seed(0)
    return LoopedLM(loops).eval()


def spec(layers, anchor_tap="output") -> dict:
    return {"anchor": {"name": "base", "tap": anchor_tap}, "augments": [{"name": "other"}],
            "edges": [{"source": "other", "target": "base", "layers": layers}]}


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_runs_are_counted_by_both_front_ends(frontend, monkeypatch):
    monkeypatch.setattr(trace, "frontend_order", lambda model: [frontend])
    assert [p.runs for p in cg.tap_points(looped(3))] == [1, 3, 1]
    assert [p.runs for p in cg.tap_points(partner())] == [1, 1, 1]


def test_blocks_of_ordinary_models_run_once():
    from x_transformers import Decoder, TransformerWrapper
    xt = TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=Decoder(dim=32, depth=2, heads=4))
    assert [p.runs for p in cg.tap_points(xt.eval())] == [1, 1]  # attention + feed-forward entries: one block
    assert [p.runs for p in cg.tap_points(small_model("llama"))] == [1, 1]


@pytest.mark.parametrize("role", ["anchor", "augment"])
def test_tapping_a_looped_block_is_refused(role):
    name = "base" if role == "anchor" else "other"
    layers = [[0, 1]] if role == "anchor" else [[1, 0]]
    with pytest.raises(cg.TraceError) as info:
        cg.compile(spec(layers), family_models(looped(), role))
    message = str(info.value)
    assert f"{name!r}: block 'layers.1' runs 2 times in one forward" in message
    assert f"tapped by edges[0].layers ({'target' if role == 'anchor' else 'source'})" in message
    assert f"blocks of {name!r} that run once: layers.0, layers.2" in message
    assert "a tap holds one value per forward" in message and "Tap blocks that run once" in message
    assert isinstance(info.value, ValueError)


def test_tap_input_after_a_loop_is_refused():
    """tap: input of block 2 reads block 1's output, and block 1 runs twice: which run feeds block 2 is not
    something calmgraph checks, so it refuses."""
    with pytest.raises(cg.TraceError, match=r"tap: input of block 'layers.2' reads the output of block "
                                            r"'layers.1', which runs 2 times"):
        cg.compile(spec([[0, 2]], anchor_tap="input"), family_models(looped(), "anchor"))


@pytest.mark.parametrize("role", ["anchor", "augment"])
def test_blocks_that_run_once_still_compose(role, ids):
    """Links to the blocks outside the loop compose exactly: identity at init, parity after randomising."""
    models = family_models(looped(), role)
    layers = [[0, 0], [-1, 2]] if role == "anchor" else [[0, 0], [2, -1]]
    composed = cg.compile(spec(layers), models)
    with torch.no_grad():
        assert torch.equal(composed(ids), models["base"](ids))
        randomize_new_parameters(composed)
        out = composed(ids)
        expected = eager_reference(composed, models, None, ids)
    assert (out - models["base"](ids)).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_dory_looped_middle(ids):
    """transformers' dory (tests/families.py: 1 input block, 1 block looped twice, 1 output block)."""
    dory = small_model("dory")
    assert [p.runs for p in cg.tap_points(dory)] == [1, 2, 1]
    with pytest.raises(cg.TraceError, match=r"'base': block 'model.layers.1' runs 2 times in one forward"):
        cg.compile(spec([[0, 1]]), family_models(dory, "anchor"))
    models = family_models(dory, "anchor")
    composed = cg.compile(spec([[0, 0], [-1, 2]]), models)
    with torch.no_grad():
        randomize_new_parameters(composed)
        torch.testing.assert_close(composed(ids), eager_reference(composed, models, None, ids), atol=1e-5, rtol=0)

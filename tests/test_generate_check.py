"""Each decode graph's first prefill and first steps are checked against the recomputing path
(`generation/check.py`): a fault in the assembled graph gives a warning and full forwards' tokens, not other
tokens; a sound graph is checked once."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import calmgraph as cg
from calmgraph.generation import check, generate as generation
from tests.test_generate_cached import argmax_by_full_forwards, compose, tokens


def _llama_gpt2():
    return compose("llama", {"g": ("gpt2", 32, "shared")}, [("g", "anchor", {"every": 2})])


def _rolled(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A decode graph with a fault: its logits rolled by one along the vocabulary."""
    graph = copy.deepcopy(graph, {id(t): t for t in (*graph.parameters(), *graph.buffers())})  # same caches
    output = next(n for n in graph.graph.nodes if n.op == "output")
    with graph.graph.inserting_before(output):
        rolled = graph.graph.call_function(torch.roll, (output.args[0], 1, -1))
    output.args = (rolled,)
    graph.recompile()
    return graph


def _faulty(monkeypatch, role: str):
    """Decoders built from now on get a fault in their prefill (`module`) or step."""
    build = generation.build_decoder

    def faulty(*args, **kwargs):
        decoder = build(*args, **kwargs)
        setattr(decoder, role, _rolled(getattr(decoder, role)))
        return decoder
    monkeypatch.setattr(generation, "build_decoder", faulty)


@pytest.mark.parametrize("role", ["module", "step"])
def test_a_faulty_decode_graph_is_caught_at_its_first_use_and_the_call_recomputes(monkeypatch, role):
    """A prefill or step whose logits are off: a warning naming it, that call's tokens from recomputing."""
    composed = _llama_gpt2()
    _faulty(monkeypatch, role)
    ids = tokens((2, 5), 3)
    with pytest.warns(UserWarning, match=f"decode graph's {'prefill' if role == 'module' else 'step'} gives "
                                          r"logits .* off the recomputing path's; this is a bug"):
        got = composed.generate(ids, 4)
    for i in range(2):
        assert torch.equal(got[i], argmax_by_full_forwards(composed, ids[i:i + 1], 4, {})[0])
    # from then on the composition recomputes, saying why; cache=True is an InternalError
    with pytest.warns(UserWarning, match="generating without the KV cache: the KV-cache decode graph"):
        again = composed.generate(ids, 4)
    assert torch.equal(again, got)
    with pytest.raises(cg.errors.InternalError, match="off the recomputing path's.*cache=False"):
        composed.generate(ids, 4, cache=True)


def test_with_cache_true_a_faulty_decode_graph_raises(monkeypatch):
    composed = _llama_gpt2()
    _faulty(monkeypatch, "step")
    with pytest.raises(cg.errors.InternalError, match="decode graph's step gives logits"):
        composed.generate(tokens((2, 5), 3), 4, cache=True)


def test_a_sound_decode_graph_is_checked_once(monkeypatch):
    """The first call compares its prefill and first step with the recomputing path, silently; the next
    call with the same decoder runs no recomputing step at all."""
    composed = _llama_gpt2()
    ids = tokens((2, 5), 4)
    calls = []
    recompute = generation.RecomputedSteps

    class Counted(recompute):
        def _logits(self, n):
            calls.append(n)
            return super()._logits(n)
    monkeypatch.setattr(generation, "RecomputedSteps", Counted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = composed.generate(ids, 5, cache=True)
    assert calls == [5, 6, 7, 8]                 # the prompt, then prompt + 1, + 2, + 3: the prefill, 3 steps
    decoder = generation.decoder_for(composed, 2, 10)
    assert decoder.checked[decoder.module] >= {"prefill"} and decoder.checked[decoder.step] >= {"step"}
    assert torch.equal(composed.generate(ids, 5, cache=True), first) and calls == [5, 6, 7, 8]


class _WrongFrom(torch.nn.Module):
    """A step whose logits are rolled along the vocabulary from its `nth` run on (as a CUDA graph's replays
    could be, its warm-up and recording right)."""

    def __init__(self, step: torch.nn.Module, nth: int):
        super().__init__()
        self.inner, self.nth, self.runs = step, nth, 0

    def forward(self, *args):
        self.runs += 1
        out = self.inner(*args)
        return torch.roll(out, 1, -1) if self.runs >= self.nth else out


def test_a_step_that_goes_wrong_at_its_third_run_is_caught(monkeypatch):
    composed = _llama_gpt2()
    build = generation.build_decoder

    def faulty(*args, **kwargs):
        decoder = build(*args, **kwargs)
        decoder.step = _WrongFrom(decoder.step, check.STEPS_CHECKED)
        return decoder
    monkeypatch.setattr(generation, "build_decoder", faulty)
    ids = tokens((2, 5), 3)
    with pytest.warns(UserWarning, match="decode graph's step gives logits"):
        got = composed.generate(ids, 6)
    for i in range(2):
        assert torch.equal(got[i], argmax_by_full_forwards(composed, ids[i:i + 1], 6, {})[0])

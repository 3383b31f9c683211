"""A decode step cut at its links into segments (`generation/overlap.py`): the decoded shared augments' side
and the anchor's, which a GPU runs on two streams. On the CPU the segments run in order; they must give the
step's logits exactly, and generate's tokens."""
from __future__ import annotations

import warnings

import pytest
import torch

import calmgraph.generation.decode as decode
from calmgraph.generation import overlap
from calmgraph.generation.generate import decoder_for
from calmgraph.plan import LINK_KEY, MODEL_KEY
from tests import test_generate_cached as cached
from tests.test_generate_fuse import compiled_steps, compose, ids_and_prompts

warnings.filterwarnings("ignore", category=UserWarning)


def split_step(composed):
    decoder = decoder_for(composed, 2, 12)
    return decoder, overlap.split(decoder.to_compile, set(decoder.models[:-1]))


@pytest.mark.parametrize("anchor", ["llama", "qwen2", "mistral", "gpt2"])
def test_the_segments_in_order_give_the_steps_logits_exactly(anchor):
    composed = compose(anchor, "shared")
    decoder, parts = split_step(composed)
    ids, extra = ids_and_prompts("shared")
    want = compiled_steps(composed, ids, extra)
    step, decoder.to_compile = decoder.to_compile, overlap.Overlapped(parts)
    try:
        got = compiled_steps(composed, ids, extra)
    finally:
        decoder.to_compile = step
    assert torch.equal(got, want)


def test_the_side_holds_only_the_augments_nodes_and_each_anchor_segment_after_the_first_starts_at_a_link():
    composed = compose("llama", "shared")
    decoder, _ = split_step(composed)
    segment = overlap.segments(decoder.to_compile.graph, {"aug"})
    by = {}
    for node, i in segment.items():
        by.setdefault(i, []).append(node)
    sides = [i for i in by if i % 2 == 1]
    anchors = sorted(i for i in by if i and i % 2 == 0)
    assert len(sides) == 2 == len(anchors) - 1                      # two links from the augment, every 2 of 4 blocks
    assert all(n.meta[MODEL_KEY] == "aug" for i in sides for n in by[i])
    assert all(n.meta.get(MODEL_KEY) != "aug" for i in anchors for n in by[i])
    assert all(a.op == "placeholder" or segment.get(a) == overlap.PROLOGUE
               for n in by[overlap.PROLOGUE] for a in n.all_input_nodes)   # no weight, no model's output
    for i in anchors[1:]:
        first = by[i][0]
        assert first.op == "call_module" and LINK_KEY in first.meta
        assert any(segment.get(a) == i - 3 for a in first.all_input_nodes)   # the side segment made for it


def test_a_chain_of_augments_runs_on_the_side_and_gives_the_logits():
    composed = cached.COMPOSITIONS["qwen2<-llama<-gpt2 chain"]()
    decoder = decoder_for(composed, 2, 12)
    assert set(decoder.models[:-1]) == {"g", "l"}
    parts = overlap.split(decoder.to_compile, {"g", "l"})
    assert parts is not None
    ids = cached.tokens((2, 6), 60)
    position = torch.arange(6)
    with torch.inference_mode():
        kv = decoder.project(())
        want = decoder.to_compile(ids, position, *kv)
        got = overlap.Overlapped(parts)(ids, position, *kv)
    assert torch.equal(got, want)


def test_a_prompt_augments_step_has_no_side_to_split():
    composed = compose("llama", "prompt")
    assert split_step(composed)[1] is None


def test_generate_with_the_step_split_gives_the_tokens(monkeypatch):
    composed = compose("llama", "shared")
    ids, _ = ids_and_prompts("shared")
    eager = composed.generate(ids, 6, cache=True)
    monkeypatch.setattr(decode, "OVERLAP", True)
    assert torch.equal(composed.generate(ids, 6, cache=True, compile_step={"backend": "eager"}), eager)
    made = decoder_for(composed, 2, ids.shape[1] + 6)._compiled["step"][2]   # the decoder this call used
    assert isinstance(getattr(made, "step", made), overlap.Overlapped)         # under MathAttention


def test_inductor_compiles_each_segment_and_the_tokens_hold(monkeypatch):
    """Each segment through inductor (on the CPU): the weights and KV caches reach a segment as its inputs,
    the caches written in place, over two calls."""
    composed = compose("llama", "shared")
    ids, _ = ids_and_prompts("shared")
    eager = [composed.generate(x, 6, cache=True) for x in (ids, ids.flip(0))]
    monkeypatch.setattr(decode, "OVERLAP", True)
    assert all(torch.equal(composed.generate(x, 6, cache=True, compile_step={}), e)
               for x, e in zip((ids, ids.flip(0)), eager))


def test_segments_compile_without_cuda_graphs():
    assert overlap.uncaptured({"options": {"triton.cudagraphs": True, "combo_kernels": True}}) == {
        "options": {"triton.cudagraphs": False, "combo_kernels": True}}
    assert overlap.uncaptured({"mode": "reduce-overhead"}) == {"mode": "default"}
    assert overlap.uncaptured({"backend": "eager"}) == {"backend": "eager"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_two_streams_captured_as_one_graph_give_the_eager_tokens(monkeypatch):
    """The side's segments on a stream of their own, the step captured at its third call and replayed after,
    across two calls (the second replays the first call's graph with new inputs)."""
    composed = compose("llama", "shared").to("cuda")     # the tests' shared composition: moved back after
    try:
        ids, _ = ids_and_prompts("shared")
        ids, other = ids.cuda(), ids.flip(0).cuda()
        eager = [composed.generate(x, 8, cache=True) for x in (ids, other)]
        monkeypatch.setattr(decode, "OVERLAP", True)
        options = {"options": {"triton.cudagraphs": True}}
        got = [composed.generate(x, 8, cache=True, compile_step=options) for x in (ids, other)]
    finally:
        composed.to("cpu")
    assert all(torch.equal(g, e) for g, e in zip(got, eager))


def _graph(side_reads_anchor: bool):
    """x -> a1 (the anchor's), s1 (the augment's), link(a1, s1) into the anchor: the smallest step to split."""
    from types import SimpleNamespace
    graph = torch.fx.Graph()
    x, wa, ws = graph.placeholder("x"), graph.get_attr("wa"), graph.get_attr("ws")
    a1 = graph.call_function(torch.mul, (x, wa))
    s1 = graph.call_function(torch.mul, (a1 if side_reads_anchor else x, ws))
    link = graph.call_module("link", (a1, s1))
    graph.output(link)
    a1.meta[MODEL_KEY], s1.meta[MODEL_KEY] = "anchor", "aug"
    link.meta[LINK_KEY] = SimpleNamespace(target="anchor")
    return graph, a1, s1, link


def test_the_side_starts_with_the_step_or_the_step_is_not_split():
    graph, a1, s1, link = _graph(side_reads_anchor=False)
    assert overlap.segments(graph, {"aug"}) == {a1: 2, s1: 1, link: 4}
    graph, *_ = _graph(side_reads_anchor=True)     # the side would wait for the anchor: no overlap to gain
    assert overlap.segments(graph, {"aug"}) is None

"""compile_step: the decode step's shapes do not change with the length (every cache, the links' included,
is sized to a bucket), so torch.compile compiles it once: not again at later steps, nor for a later call
with the same batch size and bucket. Counted with dynamo's CompileCounter backend (eager: what calmgraph
controls is the shapes it hands to the compiler, not inductor's kernels)."""
from __future__ import annotations

import contextlib
import logging
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import calmgraph as cg
import calmgraph.generation.generate as generation
from calmgraph.generation.generate import CACHE_ROUND, cache_length, decoder_for
from tests.test_generate import hf, prompt, tokens

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def composed():
    """Llama <- GPT-2 (shared, cached) + BERT (prompt)."""
    return hf({"positions": "rotary", "window": 3})[0]


@pytest.fixture
def counter(monkeypatch):
    """Counts dynamo's compiles of the step; a changed shape would recompile (no automatic dynamic shapes)."""
    counter = CompileCounter()
    monkeypatch.setattr(generation, "STEP_COMPILE", {"backend": counter})
    torch._dynamo.reset()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield counter


def test_the_step_compiles_once_across_steps_and_calls(composed, counter):
    prompts = prompt("bert", batch=2)
    first, second = tokens((2, 5), 1), tokens((2, 9), 2)
    assert cache_length(5 + 12) == cache_length(9 + 14)                  # one bucket for both calls
    out = composed.generate(first, 12, compile_step=True, **prompts)
    compiled = counter.frame_count
    assert compiled == 1 and out.shape == (2, 17)                        # one graph, and it ran 11 steps
    assert decoder_for(composed, 2, 17).models == ("gpt2", "llama")      # the shared augment is in the step
    again = composed.generate(second, 14, compile_step=True, **prompts)
    assert counter.frame_count == compiled                               # 13 more steps, another length: none
    assert torch.equal(out, composed.generate(first, 12, **prompts))     # and the same tokens as eager
    assert torch.equal(again, composed.generate(second, 14, **prompts))


def test_cache_lengths_double_and_hold_each_call():
    for positions in (None, 48, 1000):
        for length in range(1, 600 if positions is None else positions + 1):
            bucket = cache_length(length, positions)
            assert bucket >= length and (positions is None or bucket <= max(positions, CACHE_ROUND))
            if positions is None or bucket < positions:   # a power of two times 32, under twice the need
                assert bucket % CACHE_ROUND == 0 and (bucket // CACHE_ROUND).bit_count() == 1
                assert bucket == CACHE_ROUND or bucket < 2 * length
    assert [cache_length(n) for n in (1, 32, 33, 64, 65, 129)] == [32, 32, 64, 64, 128, 256]


def test_a_new_bucket_compiles_its_own_step(composed, counter):
    composed.generate(tokens((2, 5), 3), 4, compile_step=True, **prompt("bert", batch=2))
    once = counter.frame_count
    composed.generate(tokens((2, 5), 3), CACHE_ROUND + 4, compile_step=True, **prompt("bert", batch=2))
    assert counter.frame_count > once                                    # a longer cache: new shapes


def test_a_shorter_call_decodes_in_a_longer_decoder_kept(composed, counter, monkeypatch):
    """A call whose bucket a kept decoder's cache exceeds by at most REUSE_LONGER times decodes in it: no
    trace, no compile (on a GPU, minutes saved), and the tokens of recomputing. Past that factor, or with
    no longer decoder kept, a call builds its own."""
    prompts = prompt("bert", batch=3)
    composed.generate(tokens((3, 5), 6), CACHE_ROUND + 4, compile_step=True, **prompts)   # a 64-slot cache
    compiled, kept = counter.frame_count, dict(generation._entry(composed)["decoders"])
    ids = tokens((3, 5), 7)
    short = composed.generate(ids, 6, compile_step=True, **prompts)                        # needs 32 slots
    assert counter.frame_count == compiled and generation._entry(composed)["decoders"].keys() == kept.keys()
    assert torch.equal(short, composed.generate(ids, 6, cache=False, **prompts))
    monkeypatch.setattr(generation, "REUSE_LONGER", 1)
    with logged() as records:
        assert torch.equal(composed.generate(ids, 6, compile_step=True, **prompts), short)
    assert counter.frame_count == compiled + 1                                # a 32-slot decoder of its own
    # and it says so, as a first compiled call is silent for minutes at LLM shapes
    assert "the step for 3 rows and 32 cache slots compiles at its first call" in [r.getMessage().removeprefix("generate: ") for r in records]


def test_fewer_rows_decode_in_a_compiled_decoder_kept_for_more(composed, counter, monkeypatch):
    """A compiled call with fewer rows than a kept decoder's (by at most PAD_ROWS times) decodes in it, the
    rows past its own filled with copies of its first: no trace, no compile (an evaluation's last, smaller
    batch), and the tokens of recomputing. With PAD_ROWS 1, it builds and compiles its own."""
    composed.generate(tokens((6, 5), 8), 6, compile_step=True, **prompt("bert", batch=6))
    compiled, kept = counter.frame_count, set(generation._entry(composed)["decoders"])
    for batch in (5, 4):
        ids, prompts = tokens((batch, 5), 9 + batch), prompt("bert", batch=batch)
        out = composed.generate(ids, 6, compile_step=True, **prompts)
        assert out.shape == (batch, 11) and torch.equal(out, composed.generate(ids, 6, cache=False, **prompts))
    assert counter.frame_count == compiled and set(generation._entry(composed)["decoders"]) == kept
    monkeypatch.setattr(generation, "PAD_ROWS", 1)
    composed.generate(tokens((5, 5), 14), 6, compile_step=True, **prompt("bert", batch=5))
    assert counter.frame_count == compiled + 1


@contextlib.contextmanager
def logged():
    """The records calmgraph logs at INFO meanwhile."""
    records, handler, logger = [], logging.Handler(), logging.getLogger("calmgraph")
    handler.emit = records.append
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_shared_augment_without_a_cache_makes_the_step_grow():
    """The counter does see a growing step: with a shared augment transformers does not cache (rerun over
    the sequence), every step's context is longer, and each step compiles again."""
    from tests import support
    torch.manual_seed(0)
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "h"}],
            "edges": [{"source": "h", "target": "anchor", "layers": {"every": 2}}]}
    hybrid = cg.compile(spec, models={"anchor": support.llama().eval(), "h": support.gpt(32).eval()})
    counter = CompileCounter()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False), \
            pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "STEP_COMPILE", {"backend": counter})
        hybrid.generate(tokens((2, 5), 5), 6, compile_step=True)
    assert counter.frame_count == 5                                      # steps 1..5, each a new length


def test_the_prefill_compiles_once_for_every_prompt_length(composed, counter):
    """compile_prefill (dynamic shapes): one compile reads prompts of 5, 9 and 7 tokens, and one the prompt
    augment's stage (BERT); the step compiles on its own, once. Rows of two lengths decode side by side, a
    decoder each (as their steps do, each compiles its prefill). The same tokens as eager."""
    prefill, prompts = CompileCounter(), prompt("bert", batch=2)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0                                                       # left padding: rows of 4 and 7 tokens
    calls = [(tokens((2, 5), 1), None), (tokens((2, 9), 2), None), (tokens((2, 7), 3), None)]

    def generate(ids, attention_mask, **compiled):
        return composed.generate(ids, 8, attention_mask=attention_mask, **compiled, **prompts)
    options = {"compile_step": True, "compile_prefill": {"backend": prefill, "dynamic": True}}
    got = [generate(*call, **options) for call in calls]
    assert prefill.frame_count == 2 and counter.frame_count == 1          # one bucket: one step graph
    calls.append((tokens((2, 7), 3), mask))
    got.append(generate(*calls[-1], **options))
    assert prefill.frame_count == 4 and counter.frame_count == 3          # two decoders of one row each
    for call, out in zip(calls, got):
        assert torch.equal(out, generate(*call))


def test_a_prefill_of_static_shapes_compiles_at_two_prompt_lengths_then_none(composed, monkeypatch):
    """compile_prefill without `dynamic` (what a CUDA-graphed prefill takes, docs/generation.md): compiled for
    the first prompt length, once more, with dynamic shapes, at the second (torch's automatic dynamic shapes),
    then not again; the prompt augment's stage, whose prompt keeps its length, once. The tokens are eager's."""
    prefill, step, prompts = CompileCounter(), CompileCounter(), prompt("bert", batch=2)
    monkeypatch.setattr(generation, "STEP_COMPILE", {"backend": step})
    torch._dynamo.reset()
    options = {"compile_step": True, "compile_prefill": {"backend": prefill}}
    counts = []
    for length, seed in ((5, 1), (9, 2), (7, 3), (6, 4)):
        ids = tokens((2, length), seed)
        got = composed.generate(ids, 8, **options, **prompts)
        counts.append(prefill.frame_count)
        assert torch.equal(got, composed.generate(ids, 8, **prompts))
    assert counts == [2, 3, 3, 3] and step.frame_count == 1              # the stage and the prefill; then dynamic


def test_the_prefill_compiled_through_aot_autograd_writes_the_caches_the_steps_read(composed):
    """Functionalized (aot_eager: AOTAutograd without inductor's code), the prefill still writes the KV
    caches in place, which the steps then read: the same tokens as eager, with and without a compiled step."""
    prompts = prompt("bert", batch=2)
    ids = tokens((2, 6), 4)
    want = composed.generate(ids, 6, **prompts)
    options = {"backend": "aot_eager", "dynamic": True}
    assert torch.equal(composed.generate(ids, 6, compile_prefill=options, **prompts), want)
    assert torch.equal(composed.generate(ids, 6, compile_prefill=options, compile_step={"backend": "aot_eager"},
                                         **prompts), want)


def test_more_decoders_than_dynamos_recompile_limit_each_compile_their_step(composed, counter, monkeypatch):
    """Each batch size has a decoder, and each decoder's step compiles: past dynamo's recompile limit (8
    compiled entries per code object) too, where a step sharing its wrapper's code with the others would
    run eager."""
    monkeypatch.setattr(generation, "PAD_ROWS", 1)                      # no call decodes in another's decoder
    sizes = range(1, torch._dynamo.config.recompile_limit + 2)
    for batch in sizes:
        composed.generate(tokens((batch, 4), batch), 3, compile_step=True, **prompt("bert", batch=batch))
    assert counter.frame_count == len(sizes)


def test_the_compiled_step_is_kept_in_aot_autograds_cache(composed):
    """The step reaches inductor with nothing AOTAutograd's cache refuses (the math-attention switch is made
    around the call), so that a new process loads the step rather than tracing it again."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache
    torch._dynamo.reset()
    counters.clear()
    with fresh_cache():
        composed.generate(tokens((1, 4), 7), 2, compile_step={"backend": "inductor"}, **prompt("bert", batch=1))
    assert counters["aot_autograd"]["autograd_cache_saved"] == 1
    assert counters["aot_autograd"]["autograd_cache_bypass"] == 0


def _linears(graph_module) -> int:
    return sum(1 for n in graph_module.graph.nodes if n.target == torch.ops.aten.linear.default)


def test_concat_projections_gives_the_same_tokens_over_one_copy_of_the_weights(counter, monkeypatch):
    """Llama anchor and augment, shared and prompt: the compiled step computes q/k/v and gate/up as one
    product each, and gives the tokens of the eager step; decoders of two batch sizes share one copy."""
    from tests.test_generate_fuse import compose, ids_and_prompts
    monkeypatch.setattr(generation, "PAD_ROWS", 1)                      # a decoder for each batch size
    for mode in ("shared", "prompt"):
        composed = compose("llama", mode)
        ids, extra = ids_and_prompts(mode, seed=43, length=6)
        eager = composed.generate(ids, 6, cache=True, **extra)
        assert torch.equal(composed.generate(ids, 6, compile_step=True, concat_projections=True, **extra), eager)
        one = {k: v for k, v in extra.items()} if mode == "shared" else {k: v[:1] for k, v in extra.items()}
        assert torch.equal(composed.generate(ids[:1], 6, compile_step=True, concat_projections=True, **one),
                           composed.generate(ids[:1], 6, cache=True, **one))
        compiled = [decoder_for(composed, b, 12)._compiled["step"][2] for b in (2, 1)]   # MathAttention(compiled)
        graphs = [c.step._orig_mod for c in compiled]                  # what torch.compile was given
        plain = _linears(decoder_for(composed, 2, 12).to_compile)
        blocks = 4 + 4 if mode == "shared" else 4                      # the decoded models' blocks
        assert _linears(graphs[0]) == plain - 3 * blocks               # 5 linears a block become 2
        joined = [{id(b) for n, b in g.named_buffers() if n.startswith("concat_projection")} for g in graphs]
        assert len(joined[0]) == 2 * blocks and joined[0] == joined[1]


def test_concat_projections_follow_weights_changed_in_place(counter):
    """A weight changed after a compiled call (trained further, loaded) is read by the next call: the
    concatenated copy is refreshed, and the tokens are those of the eager step on the new weights."""
    from tests.test_generate_fuse import compose, ids_and_prompts
    composed = compose("llama", "shared", fuse=True)
    ids, extra = ids_and_prompts("shared", seed=44, length=6)
    before = composed.generate(ids, 6, compile_step=True, concat_projections=True)
    layers = composed.traced_model("anchor").model.layers
    weights = [w for layer in layers for w in (layer.mlp.up_proj.weight, layer.self_attn.v_proj.weight)]
    saved = [w.detach().clone() for w in weights]
    try:
        with torch.no_grad():
            for i, w in enumerate(weights):
                w.normal_(0, 1.0, generator=torch.Generator().manual_seed(i))
        after = composed.generate(ids, 6, compile_step=True, concat_projections=True)
        assert torch.equal(after, composed.generate(ids, 6, cache=True))
        assert not torch.equal(after, before)                            # the change reaches the tokens
    finally:
        with torch.no_grad():
            for w, kept in zip(weights, saved):
                w.copy_(kept)


def test_concat_projections_needs_a_compiled_step():
    from tests.test_generate_fuse import compose
    composed = compose("llama", "shared")
    ids = tokens((1, 4), 5)
    with pytest.raises(cg.errors.InputError, match="compile_step=True"):
        composed.generate(ids, 2, concat_projections=True)
    with pytest.raises(cg.errors.InputError, match="True or False"):
        composed.generate(ids, 2, compile_step=True, concat_projections="yes")

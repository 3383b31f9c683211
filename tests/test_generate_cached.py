"""Shared augments decoded incrementally: every transformers causal LM of a composition keeps its own KV cache,
and every link from a shared augment keeps its projected keys and values (`generation/decode.py`).

References: the recomputing path (`cache=False`, the anchor stage over the whole sequence each step), and
each row alone, extended by the argmax of a full forward of the fused graph, one token at a time. The
cross-attention weights are random and nonzero, so every augment changes what the anchor predicts.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import calmgraph as cg
from calmgraph.generation import decode
from calmgraph.generation.generate import contexts_of, decoder_for, stages_of
from tests import support

warnings.filterwarnings("ignore", category=UserWarning)
VOCAB = support.VOCAB


def compose(anchor: str, augments: dict, edges: list, cross_attention: dict | None = None, seed: int = 0):
    """anchor: a family of support.DECODERS; augments: {name: (family, dim, input)}; edges: (source, target, layers)."""
    torch.manual_seed(seed)
    models = {"anchor": support.DECODERS[anchor]().eval()}
    for name, (family, dim, _) in augments.items():
        models[name] = (support.bert(dim) if family == "bert" else support.DECODERS[family](dim=dim)).eval()
    spec = {"anchor": {"name": "anchor"},
            "augments": [{"name": n, "input": how} for n, (_, _, how) in augments.items()],
            "edges": [{"source": s, "target": t, "layers": layers} for s, t, layers in edges]}
    if cross_attention:
        spec["cross_attention"] = cross_attention
    composed = cg.compile(spec, models=models)
    support.randomize_new_parameters(composed, seed=seed, std=0.3)
    return composed


COMPOSITIONS = {
    # several shared augments of two families and a prompt augment, into a Llama anchor
    "llama<-gpt2+qwen2+bert": lambda: compose(
        "llama", {"g": ("gpt2", 32, "shared"), "q": ("qwen2", 32, "shared"), "p": ("bert", 32, "prompt")},
        [("g", "anchor", {"every": 2}), ("q", "anchor", [[1, 0], [3, 3]]), ("p", "anchor", [[-1, 2]])]),
    # a GPT-2 anchor, rotary windowed blocks with a null key
    "gpt2<-llama rotary window null_kv": lambda: compose(
        "gpt2", {"l": ("llama", 32, "shared")}, [("l", "anchor", {"every": 1})],
        {"positions": "rotary", "window": 2, "null_kv": True}),
    # augment -> augment -> anchor, Qwen2 anchor; the middle augment is both a target and a source at layer 1
    "qwen2<-llama<-gpt2 chain": lambda: compose(
        "qwen2", {"g": ("gpt2", 32, "shared"), "l": ("llama", 32, "shared")},
        [("g", "l", [[1, 1], [2, 2]]), ("l", "anchor", [[1, 1], [3, 2]])], {"window": 3}),
}


@pytest.fixture(scope="module", params=list(COMPOSITIONS))
def composition(request):
    return request.param, COMPOSITIONS[request.param]()


def tokens(shape, seed):
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def prompts(composed, batch):
    """The prompt augments' own tokens (the second row's shorter), if the composition has any."""
    out = {}
    for a in composed.spec.prompts:
        ids, mask = tokens((batch, 6), 7), torch.ones(batch, 6, dtype=torch.long)
        mask[1:2, 4:] = 0
        out |= {f"{a.name}_input_ids": ids, f"{a.name}_mask": mask}
    return out


def argmax_by_full_forwards(composed, row, n, row_prompts):
    """One unpadded row extended n times by the argmax at the last position of a full fused forward."""
    with torch.no_grad():
        for _ in range(n):
            row = torch.cat([row, composed(row, **row_prompts)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return row


def padded(rows, width, left=True):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - row.shape[1], width) if left else slice(0, row.shape[1])
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def test_every_shared_augment_is_decoded_with_its_own_cache(composition):
    name, composed = composition
    decoder = decoder_for(composed, 2, 12)
    shared = {a.name for a in composed.spec.augments if not a.is_prompt}
    assert set(decoder.models) == shared | {"anchor"} and decoder.models[-1] == "anchor"
    assert not contexts_of(composed).reads_sequence       # nothing is recomputed over the sequence at a step
    cached_links = {n.target for n in decoder.module.graph.nodes if n.op == "call_module" and "link_cache" in n.target}
    assert len(cached_links) == sum(link.source in shared for link in composed.links)


@pytest.mark.parametrize("left", [True, False], ids=["left_padding", "right_padding"])
def test_cached_greedy_equals_recomputing_and_argmax_over_full_forwards(composition, left):
    name, composed = composition
    lengths, n = [5, 8, 6, 5], 7         # rows of one length together; groups of one size side by side
    rows = [tokens((1, L), 10 + i) for i, L in enumerate(lengths)]
    ids, mask = padded(rows, 8, left)
    extra = prompts(composed, 4)
    cached = composed.generate(ids, n, attention_mask=mask, cache=True, **extra)
    assert torch.equal(cached, composed.generate(ids, n, attention_mask=mask, cache=False, **extra))
    for i, row in enumerate(rows):
        reference = argmax_by_full_forwards(composed, row, n, {k: v[i:i + 1] for k, v in extra.items()})
        assert torch.equal(cached[i, 8:], reference[0, row.shape[1]:]), f"{name}: row {i}"


def test_compiled_step_and_prefill_give_the_eager_tokens(composition):
    """compile_step (dynamo) and compile_prefill through AOTAutograd (functionalized: the caches it writes in
    place are what the compilers must keep; its shapes dynamic), rows of three lengths in groups side by
    side: the eager cached path's tokens, in every composition of the table."""
    name, composed = composition
    rows = [tokens((1, L), 20 + i) for i, L in enumerate([5, 8, 6, 5])]
    ids, mask = padded(rows, 8)
    extra = prompts(composed, 4)
    compiled = composed.generate(ids, 6, attention_mask=mask, compile_step={"backend": "eager"},
                                 compile_prefill={"backend": "aot_eager", "dynamic": True}, **extra)
    assert torch.equal(compiled, composed.generate(ids, 6, attention_mask=mask, cache=True, **extra)), name


def test_decode_steps_give_the_logits_of_full_forwards(composition):
    """Prefill, then one token at a time through every model's cache and every link's cached keys and
    values: the logits of the fused graph over the whole sequence, position by position."""
    name, composed = composition
    ids, extra = tokens((2, 11), 40), prompts(composed, 2)
    decoder, contexts = decoder_for(composed, 2, 11), contexts_of(composed)
    with torch.inference_mode():                           # as generate runs it (the caches are inference tensors)
        full = composed(ids, **extra)
        ctx = contexts.module(ids[:, :4], *stages_of(composed).augment(**extra))
        kv = decoder.project(ctx)
        got = [decoder.module(ids[:, :4], torch.arange(4), *ctx, *kv)]
        for t in range(4, 11):
            got.append(decoder.module(ids[:, t:t + 1], torch.tensor([t]), *ctx, *kv))
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-4, atol=1e-4)


def test_a_second_call_reuses_the_caches_from_a_fresh_prefill(composition):
    """The caches (models' and links') hold the previous call's positions: a new prompt must not read them."""
    name, composed = composition
    first, second = tokens((2, 6), 50), tokens((2, 6), 51)
    extra = prompts(composed, 2)
    composed.generate(first, 6, cache=True, **extra)
    again = composed.generate(second, 6, cache=True, **extra)
    assert torch.equal(again, composed.generate(second, 6, cache=False, **extra))


def test_a_shared_augment_without_a_cache_is_recomputed_and_the_tokens_agree():
    """A shared augment transformers does not cache (here the handwritten GPT) cannot be decoded a token
    at a time: the anchor alone is, and the augments are run over the sequence at each step."""
    torch.manual_seed(0)
    models = {"anchor": support.llama().eval(), "h": support.gpt(32).eval(), "g": support.gpt2(32).eval()}
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "h"}, {"name": "g"}],
            "edges": [{"source": "h", "target": "anchor", "layers": {"every": 2}},
                      {"source": "g", "target": "anchor", "layers": [[1, 1]]}]}
    composed = cg.compile(spec, models=models)
    support.randomize_new_parameters(composed, std=0.3)
    assert decoder_for(composed, 2, 8).models == ("anchor",)
    assert contexts_of(composed).reads_sequence
    ids = tokens((2, 5), 60)
    cached = composed.generate(ids, 6, cache=True)
    assert torch.equal(cached, composed.generate(ids, 6, cache=False))
    for i in range(2):
        assert torch.equal(cached[i], argmax_by_full_forwards(composed, ids[i:i + 1], 6, {})[0])


def test_a_shared_augment_that_reads_ahead_is_recomputed_and_the_anchor_still_cached():
    """BERT takes a cache argument, yet its attention reads ahead (`is_causal` False): no cache decodes it a
    token at a time. The anchor is decoded alone and BERT is run over the sequence at each step (it used to
    make the whole call fall back to recomputing, after a failed trace)."""
    composed = compose("llama", {"b": ("bert", 32, "shared")}, [("b", "anchor", [[0, 1], [1, 2]])])
    assert decoder_for(composed, 2, 8).models == ("anchor",)
    assert contexts_of(composed).reads_sequence
    ids = tokens((2, 5), 61)
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # no fallback warning: the cached path runs
        cached = composed.generate(ids, 6, cache=True)
    for i in range(2):
        assert torch.equal(cached[i], argmax_by_full_forwards(composed, ids[i:i + 1], 6, {})[0])


def test_a_trace_that_does_not_decode_as_the_model_computes_is_refused_and_generate_recomputes():
    """BERT as a causal decoder (`is_decoder`) traces around a static cache, but its embeddings slice their
    positions from the cache's length, which the trace keeps as 0: its first step failed deep in torch.
    The decode trace is checked against the model's own forward when it is built: `cache=True` is a
    TraceError saying why, and by default generate warns and recomputes, with full forwards' tokens."""
    from tests.families import small_model
    torch.manual_seed(0)
    models = {"anchor": small_model("bert"), "aug": support.llama(dim=32).eval()}
    models["anchor"].config.use_cache = True
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "aug"}],
            "edges": [{"source": "aug", "target": "anchor", "layers": {"every": 1}}]}
    composed = cg.compile(spec, models=models)
    support.randomize_new_parameters(composed, std=0.3)
    ids = tokens((2, 5), 62) % 96
    with pytest.raises(cg.errors.TraceError, match="'anchor' traced with a static KV cache does not decode as it"):
        composed.generate(ids, 4, cache=True)
    with pytest.warns(UserWarning, match="generating without the anchor's KV cache"):
        out = composed.generate(ids, 4)
    assert torch.equal(out, argmax_by_full_forwards(composed, ids, 4, {}))


def test_the_decoders_used_last_are_kept(monkeypatch):
    """Past KEEP_DECODERS, the decoder used least recently goes: one used at every call stays, however old."""
    from calmgraph.generation import generate
    monkeypatch.setattr(generate, "KEEP_DECODERS", 2)
    composed = compose("llama", {"l": ("llama", 32, "shared")}, [("l", "anchor", {"every": 2})])
    often = decoder_for(composed, 1, 8)
    decoder_for(composed, 2, 8)
    assert decoder_for(composed, 1, 8) is often          # used again: now the newest
    decoder_for(composed, 3, 8)                          # one too many: batch 2's goes
    assert [key[0] for key in generate._entry(composed)["decoders"]] == [1, 3]
    assert decoder_for(composed, 1, 8) is often


def test_a_shared_augment_that_does_not_decode_leaves_the_anchor_decoded_alone():
    """BERT as a causal decoder in the augment's place: its trace fails the check, so the anchor is decoded
    alone with its cache and BERT reruns over the sequence at each step (it made the whole call recompute),
    with a warning; full forwards' tokens, and later calls keep to it without tracing BERT again."""
    from tests.families import small_model
    torch.manual_seed(0)
    models = {"anchor": support.llama(dim=32).eval(), "aug": small_model("bert")}
    models["aug"].config.use_cache = True
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "aug"}],
            "edges": [{"source": "aug", "target": "anchor", "layers": [[0, 1], [1, 3]]}]}
    composed = cg.compile(spec, models=models)
    support.randomize_new_parameters(composed, std=0.3)
    ids = tokens((2, 5), 63) % 96
    with pytest.warns(UserWarning, match="decoding the anchor alone with a KV cache.*'aug' traced with a static"):
        out = composed.generate(ids, 4, cache=True)
    assert torch.equal(out, argmax_by_full_forwards(composed, ids, 4, {}))
    assert decoder_for(composed, 2, 9).models == ("anchor",) and contexts_of(composed).reads_sequence
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(composed.generate(ids, 4), out)


def test_dead_code_elimination_keeps_writes_through_views_of_what_is_read():
    """A fresh tensor filled through slices of it (latent attention assembles its keys so) and read after:
    the writes stay; a write into a tensor nothing reads goes."""
    from calmgraph.generation.decode import keep_live
    aten = torch.ops.aten
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    fresh = graph.call_function(aten.new_empty.default, (x, [2, 4]))
    left = graph.call_function(aten.slice.Tensor, (fresh, 1, 0, 2))
    graph.call_function(aten.copy_.default, (left, x))
    right = graph.call_function(aten.slice.Tensor, (fresh, 1, 2, 4))
    graph.call_function(aten.fill_.Scalar, (right, 7.0))
    unread = graph.call_function(aten.new_empty.default, (x, [2, 4]))
    graph.call_function(aten.fill_.Scalar, (unread, 1.0))
    graph.output(graph.call_function(aten.mul.Tensor, (fresh, 2.0)))
    keep_live(graph)
    module = torch.fx.GraphModule(torch.nn.Module(), graph)
    x = torch.arange(4.0).view(2, 2)
    assert torch.equal(module(x), torch.cat([x, torch.full((2, 2), 7.0)], 1) * 2)
    assert sum(n.target is aten.new_empty.default for n in graph.nodes) == 1


@pytest.mark.parametrize("family, role", [("bart", "anchor"), ("marian", "augment")])
def test_a_decoder_with_unused_cross_attention_decodes_with_its_cache(family, role):
    """BART's family as a causal LM holds each layer's attention over an encoder (`encoder_attn`, not causal),
    which it runs only given encoder states: it is no reason to recompute (it was), and the model decodes
    with its cache and gives full forwards' tokens, padded rows included."""
    from tests.families import check_generate
    record = check_generate(family, role)
    assert record["status"] == "works" and record["greedy"] and record["padded"], record
    assert set(record["cached"]) == {"base", "other"}


def test_a_self_attention_that_reads_ahead_takes_no_cache():
    """The exemptions are for attention over an encoder and for a decoder's self-attention: one that is not
    causal outside a decoder (BERT's as an encoder) still refuses."""
    from tests.families import small_model
    model = small_model("bart")
    assert decode.cache_kwarg(model) is not None
    model.model.decoder.layers[0].self_attn.is_causal = False
    assert decode.cache_kwarg(model) is not None
    model.model.decoder.layers[0].self_attn.is_decoder = False
    assert decode.cache_kwarg(model) is None


@pytest.mark.parametrize("role", ["anchor", "augment"])
def test_a_decoder_self_attention_that_says_it_is_not_causal_decodes_with_its_cache(role):
    """BigBird-Pegasus's decoder self-attention says `is_causal=False`, yet its decoder passes it a causal mask:
    it decodes with its cache (it recomputed), and gives full forwards' tokens, padded rows included."""
    from tests.families import check_generate
    record = check_generate("bigbird_pegasus", role)
    assert record["status"] == "works" and record["greedy"] and record["padded"], record
    assert set(record["cached"]) == {"base", "other"}


@pytest.mark.parametrize("family, role", [("minicpm3", "augment"), ("deepseek_v3", "anchor"), ("falcon", "anchor")])
def test_latent_and_multi_query_attention_decode_with_their_caches(family, role):
    """Latent attention (MiniCPM3, DeepSeek-V3) caches keys and values of different widths, and Falcon's
    multi-query attention one key-value head, where the config's head count and width said otherwise: the
    static caches are sized from a one-token forward (`decode.cache_shapes`), so they decode with a cache
    (they recomputed, after a failed trace). MiniCPM3 assembles its keys through slices of a fresh tensor,
    writes the dead-code pass used to drop (its steps then read uninitialised memory)."""
    from tests.families import check_generate
    record = check_generate(family, role)
    assert record["status"] == "works" and record["greedy"] and record["padded"], record
    assert set(record["cached"]) == {"base", "other"}


def test_under_autocast_angles_computed_with_autocast_off_decode_as_recomputed():
    """The decode graph is traced as the compile's trace is (`frontends.exported_module`): an anchor whose
    rotary angles are a one-term matmul with autocast off (transformers up to 5.17) decodes under bf16 autocast
    with its cache (`cache=True`: the first-use check must pass) and gives the recomputing path's tokens."""
    from tests.families import small_model
    from tests.test_compile import _MatmulRotary
    torch.manual_seed(0)
    anchor = small_model("llama").eval()
    anchor.model.rotary_emb = _MatmulRotary(anchor.model.rotary_emb)
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "aug", "input": "shared"}],
            "edges": [{"source": "aug", "target": "anchor", "layers": {"every": 1}}]}
    composed = cg.compile(spec, models={"anchor": anchor, "aug": support.llama(dim=32).eval()})
    support.randomize_new_parameters(composed, seed=0, std=0.3)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = composed.generate(ids, 6, cache=True)
        assert torch.equal(cached, composed.generate(ids, 6, cache=False))

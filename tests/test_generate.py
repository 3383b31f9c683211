"""Generation: the stage split, greedy == argmax over full forwards, padding, sampling filters, eos.

Two compositions cover both front ends and every input mode: the bundled demo (custom modules, fx
front end) and Llama <- GPT-2 (shared) + BERT (prompt) built from small configs (torch.export front end).
Their cross-attention weights are random and nonzero, so the augments change what the anchor predicts.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import calmgraph as cg
from calmgraph.demo.models import demo_models
from calmgraph.demo.run import demo_spec_path
from calmgraph.generation.generate import filter_logits, next_token
from calmgraph.plan import MODEL_KEY
from calmgraph.generation.stage import split_stages

warnings.filterwarnings("ignore", category=UserWarning)
VOCAB = 96


def randomize(composed, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in composed.named_new_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if ".norm." in name else 0.0))
    return composed


def demo():
    models = demo_models()
    return randomize(cg.compile(str(demo_spec_path()), models=models)), models["base"], "notes"


def hf(cross_attention=None):
    import transformers as t
    t.logging.set_verbosity_error()
    torch.manual_seed(0)
    llama = t.LlamaForCausalLM(t.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                             max_position_embeddings=64))
    gpt2 = t.GPT2LMHeadModel(t.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64))
    bert = t.BertModel(t.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=VOCAB, max_position_embeddings=64))
    spec = {"anchor": {"name": "llama"},
            "augments": [{"name": "gpt2"}, {"name": "bert", "input": "prompt"}],
            "edges": [{"source": "gpt2", "target": "llama", "layers": {"every": 2},
                       "cross_attention": cross_attention or {}},
                      {"source": "bert", "target": "llama", "layers": [[-1, 2]]}]}
    models = {"llama": llama.eval(), "gpt2": gpt2.eval(), "bert": bert.eval()}
    return randomize(cg.compile(spec, models=models)), llama, "bert"


@pytest.fixture(scope="module")
def hf_composition():
    return hf()


@pytest.fixture(scope="module", params=["demo", "hf"])
def composition(request):
    if request.param == "hf":
        composed, llama, name = request.getfixturevalue("hf_composition")
        return composed, lambda ids: llama(ids, use_cache=False).logits, name
    return demo()


@pytest.fixture(scope="module")
def small():
    """The demo composition, for tests that only read it."""
    return demo()


def tokens(shape, seed):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def prompt(name, batch=3):
    ids = tokens((batch, 6), 7)
    mask = torch.ones_like(ids)
    mask[1:2, 4:] = 0                     # the second row's prompt (if any) is shorter
    return {f"{name}_input_ids": ids, f"{name}_mask": mask}


def greedy_by_full_forwards(composed, ids, n, prompts):
    """The reference: append the argmax of the last position of a full forward, n times."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, composed(ids, **prompts)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


# -- stages -----------------------------------------------------------------------------------------
def test_staged_forward_equals_fused_forward_exactly(composition):
    composed, anchor, name = composition
    stages = split_stages(composed, [name])
    ids, prompts = tokens((3, 10), 1), prompt(name)
    with torch.no_grad():
        fused = composed(ids, **prompts)
        staged = stages.anchor(ids, *stages.augment(**prompts))
        assert not torch.allclose(fused, anchor(ids), atol=1e-3)   # the augments do change the logits
    assert torch.equal(staged, fused)


def test_stages_partition_the_fused_graph(composition):
    composed, _, name = composition
    stages = split_stages(composed, [name])
    models = lambda gm: {n.meta.get(MODEL_KEY) for n in gm.graph.nodes} - {None}  # noqa: E731
    assert models(stages.augment) == {name}
    assert name not in models(stages.anchor)
    ops = lambda gm: sum(n.op not in ("placeholder", "output") for n in gm.graph.nodes)  # noqa: E731
    assert ops(stages.augment) + ops(stages.anchor) == ops(composed)  # every node in exactly one stage
    anchor_inputs = [n.name for n in stages.anchor.graph.nodes if n.op == "placeholder"]
    assert anchor_inputs == ["input_ids", *stages.states]
    assert [n.name for n in stages.augment.graph.nodes if n.op == "placeholder"] == [f"{name}_input_ids", f"{name}_mask"]


def test_stages_share_the_composed_weights():
    composed, _, name = demo()
    stages = split_stages(composed, [name])
    ids, prompts = tokens((2, 5), 1), prompt(name, batch=2)
    with torch.no_grad():
        for p in composed.new_parameters():
            p.mul_(2)
        assert torch.equal(stages.anchor(ids, *stages.augment(**prompts)), composed(ids, **prompts))


def test_no_prompt_augment_gives_an_empty_augment_stage():
    models = demo_models()
    spec = {"anchor": {"name": "base"}, "augments": [{"name": "arith"}],
            "edges": [{"source": "arith", "target": "base", "layers": {"every": 2}}]}
    composed = randomize(cg.compile(spec, models={k: models[k] for k in ("base", "arith")}))
    stages = split_stages(composed, [])
    ids = tokens((2, 7), 3)
    assert stages.augment() == () and stages.states == []
    with torch.no_grad():
        assert torch.equal(stages.anchor(ids), composed(ids))
    assert torch.equal(composed.generate(ids, 5, temperature=0), greedy_by_full_forwards(composed, ids, 5, {}))


# -- greedy and padding -----------------------------------------------------------------------------
def test_greedy_equals_argmax_over_full_forwards(composition):
    composed, _, name = composition
    ids, prompts = tokens((3, 8), 2), prompt(name)
    out = composed.generate(ids, 12, temperature=0, **prompts)
    assert out.shape == (3, 20) and torch.equal(out[:, :8], ids)
    assert torch.equal(out, greedy_by_full_forwards(composed, ids, 12, prompts))


def test_left_padding_gives_the_tokens_of_each_unpadded_row(composition):
    composed, _, name = composition
    lengths, n = [5, 9, 7], 8
    rows = [tokens((1, L), 10 + i) for i, L in enumerate(lengths)]
    prompts = prompt(name)
    ids = torch.full((3, 9), -1)                   # a pad id no embedding could look up: must never be read
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 9 - row.shape[1]:], mask[i, 9 - row.shape[1]:] = row, 1
    out = composed.generate(ids, n, temperature=0, attention_mask=mask, **prompts)
    assert torch.equal(out[:, :9], ids)
    for i, row in enumerate(rows):
        alone = composed.generate(row, n, temperature=0, **{k: v[i:i + 1] for k, v in prompts.items()})
        assert torch.equal(out[i, 9:], alone[0, row.shape[1]:]), f"row {i}"


def test_left_padded_greedy_equals_transformers_generate_at_init(hf_composition):
    """At init (zero output projections) the composition is the anchor, so its greedy tokens must be
    those of transformers' own generate: KV cache, attention mask and position ids from the mask."""
    composed, llama, name = hf_composition
    saved = {n: p.clone() for n, p in composed.named_new_parameters()}
    try:
        with torch.no_grad():
            for n, p in composed.named_new_parameters():
                if n.endswith("to_out.weight"):
                    p.zero_()
        ids, mask = tokens((3, 9), 30), torch.ones(3, 9, dtype=torch.long)
        mask[0, :4] = mask[2, :2] = 0
        ids = ids.masked_fill(mask == 0, 0)
        eos = llama.generation_config.eos_token_id   # both stop rows at it and pad them with 0
        ours = composed.generate(ids, 10, temperature=0, attention_mask=mask, eos_token_id=eos, pad_token_id=0,
                                 **prompt(name))
        theirs = llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(ours, theirs)
    finally:
        with torch.no_grad():
            for n, p in composed.named_new_parameters():
                p.copy_(saved[n])


def test_right_padding_also_reads_each_row_at_its_own_end(small):
    composed, _, name = small
    row0, row1 = tokens((1, 4), 20), tokens((1, 6), 21)
    ids = torch.cat([torch.cat([row0, torch.zeros(1, 2, dtype=torch.long)], 1), row1])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    prompts = prompt(name, batch=2)
    out = composed.generate(ids, 5, temperature=0, attention_mask=mask, **prompts)
    alone = composed.generate(row0, 5, temperature=0, **{k: v[:1] for k, v in prompts.items()})
    assert torch.equal(out[0, 6:], alone[0, 4:])


# -- the anchor's KV cache ----------------------------------------------------------------------------
def test_cached_decode_logits_equal_full_forwards(hf_composition):
    """Prefill then one token at a time through the decode graph (KV caches, the shared GPT-2 decoded a
    token at a time too, the BERT prompt read once) gives the logits of the anchor stage over the whole sequence."""
    from calmgraph.generation.generate import contexts_of, decoder_for, stages_of
    composed, _, name = hf_composition
    ids, prompts = tokens((3, 14), 40), prompt(name)
    stages, contexts = stages_of(composed), contexts_of(composed)
    assert not contexts.reads_sequence                   # GPT-2 has its own cache: not rerun over the sequence
    decoder = decoder_for(composed, 3, 14)
    with torch.inference_mode():                         # as generate runs it (its cache is an inference tensor)
        full = composed(ids, **prompts)
        states = stages.augment(**prompts)
        kv = decoder.project(contexts.module(ids[:, :6], *states))        # BERT's keys and values, once
        assert len(kv) == 2 and len(decoder.precomputed) == 1
        got = [decoder.module(ids[:, :6], torch.arange(6), *contexts.module(ids[:, :6], *states), *kv)]
        for t in range(6, 14):
            step = decoder.module(ids[:, t:t + 1], torch.tensor([t]), *contexts.module(ids[:, :t + 1], *states), *kv)
            got.append(step)
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary, window, null_kv", [(False, None, False), (True, None, False), (False, 2, False),
                                                    (True, 1, False), (False, None, True), (True, 1, True)],
                         ids=["plain", "rotary", "window2", "window1_rotary", "null_kv", "window1_rotary_null_kv"])
@pytest.mark.parametrize("t", [1, 3, 7])
def test_causal_cross_attention_reads_the_last_positions_as_the_full_sequence_does(t, rotary, window, null_kv):
    """A decode step's queries are the last t of the context's 8 positions: each must see exactly what
    the same position sees when the whole sequence is read at once (and, rotary, be turned by its own
    position), as the float64 reference computes it."""
    from calmgraph.cross_attention import CrossAttention
    from tests.reference import reference_cross_attention
    torch.manual_seed(0)
    block = CrossAttention(16, 12, heads=2, dim_head=8, causal=True, rotary=rotary, window=window, null_kv=null_kv)
    torch.nn.init.normal_(block.to_out.weight)
    x, context = torch.randn(2, 8, 16), torch.randn(2, 8, 12)
    step = block(x[:, -t:], context)
    torch.testing.assert_close(step, block(x, context)[:, -t:], rtol=1e-5, atol=1e-6)
    expected = reference_cross_attention(block.double(), x[:, -t:].double(), context.double(), causal=True)
    torch.testing.assert_close(step, expected.float(), rtol=1e-5, atol=1e-5)


def test_cached_generation_equals_recomputing_with_padded_rows(hf_composition):
    composed, _, name = hf_composition
    ids, mask = tokens((3, 9), 41), torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = mask[2, :3] = 0                        # two rows of 6 tokens, one of 9: two cached groups
    kwargs = dict(temperature=0, attention_mask=mask, **prompt(name))
    cached = composed.generate(ids, 10, cache=True, **kwargs)
    assert torch.equal(cached, composed.generate(ids, 10, cache=False, **kwargs))


@pytest.mark.parametrize("null_kv", [False, True], ids=["", "null_kv"])
def test_cached_generation_with_rotary_windowed_cross_attention_equals_recomputing(null_kv):
    """Rotary windowed blocks in the decode graph turn a step's query by its place in the sequence and read
    back from there: the tokens of left-padded rows match recomputing the whole sequence each step."""
    composed, _, name = hf({"positions": "rotary", "window": 3, "null_kv": null_kv})
    ids, mask = tokens((3, 9), 43), torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    kwargs = dict(temperature=0, attention_mask=mask, **prompt(name))
    assert torch.equal(composed.generate(ids, 8, cache=True, **kwargs), composed.generate(ids, 8, cache=False, **kwargs))


def test_cached_generation_shares_the_composed_weights_and_leaves_the_anchor_alone(hf_composition):
    from calmgraph.generation.generate import decoder_for
    composed, llama, name = hf_composition
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    ids = tokens((2, 5), 42)
    first = composed.generate(ids, 6, temperature=0, cache=True, **prompt(name, batch=2))
    assert torch.equal(composed.generate(ids, 6, temperature=0, cache=True, **prompt(name, batch=2)), first)
    decoder = decoder_for(composed, 2, 11).module
    ours = {p.data_ptr() for p in composed.parameters()}
    assert {p.data_ptr() for p in decoder.parameters()} <= ours       # no weight copied, xattn shared
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama.modules())


def test_compiled_decode_step_gives_the_same_tokens(hf_composition, monkeypatch):
    """compile_step runs the decode step through torch.compile (here its eager backend: the plumbing, not
    inductor's kernels, is what calmgraph adds)."""
    import calmgraph.generation.generate as generation
    monkeypatch.setattr(generation, "STEP_COMPILE", {"backend": "eager"})
    composed, _, name = hf_composition
    ids, prompts = tokens((2, 7), 44), prompt(name, batch=2)
    plain = composed.generate(ids, 6, temperature=0, cache=True, **prompts)
    assert torch.equal(composed.generate(ids, 6, temperature=0, cache=True, compile_step=True, **prompts), plain)
    # a dict is torch.compile's keywords, in place of STEP_COMPILE
    seen = []
    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward
    monkeypatch.setattr(generation, "STEP_COMPILE", {"backend": "not a backend"})
    assert torch.equal(composed.generate(ids, 6, cache=True, compile_step={"backend": backend}, **prompts), plain)
    assert len(seen) == 1


def test_cache_is_refused_for_an_anchor_transformers_does_not_cache(small):
    composed, _, name = small
    with pytest.raises(cg.InputError, match="is not a transformers causal LM"):
        composed.generate(tokens((1, 4), 43), 2, cache=True, **prompt(name, batch=1))
    with pytest.raises(cg.InputError, match="compile_step compiles the KV-cache decode graph"):
        composed.generate(tokens((1, 4), 43), 2, compile_step=True, **prompt(name, batch=1))
    with pytest.raises(cg.InputError, match="cache must be None"):
        composed.generate(tokens((1, 4), 43), 2, cache="yes", **prompt(name, batch=1))


# -- sampling ---------------------------------------------------------------------------------------
def allowed_tokens(logits, temperature, top_k, top_p, slack):
    """Reference in float64 with plain sorting: top-k, then the smallest prefix of the renormalised
    distribution whose mass reaches top_p (+ slack, for float rounding at the boundary)."""
    out = []
    for row in logits.double() / temperature:
        order = sorted(range(len(row)), key=lambda i: -row[i].item())
        kept = order[:top_k] if top_k is not None else order
        probs = torch.softmax(row[kept], 0).tolist()
        if top_p is not None and top_p < 1:
            mass, cut = 0.0, 0
            while cut < len(kept) and mass < top_p + slack:
                mass, cut = mass + probs[cut], cut + 1
            kept = kept[:cut]
        out.append(set(kept))
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 40), temperature=st.floats(0.1, 3.0),
       top_k=st.none() | st.integers(1, 50), top_p=st.none() | st.floats(0.01, 1.0))
def test_top_k_top_p_keep_exactly_the_allowed_tokens(seed, vocab, temperature, top_k, top_p):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, vocab, generator=g) * 3
    kept = [set(torch.isfinite(row).nonzero().flatten().tolist())
            for row in filter_logits(logits, temperature, top_k, top_p)]
    for got, low, high in zip(kept, allowed_tokens(logits, temperature, top_k, top_p, -1e-5),
                              allowed_tokens(logits, temperature, top_k, top_p, 1e-5)):
        assert low <= got <= high
    picks = next_token(logits.repeat(50, 1), temperature, top_k, top_p, generator=g).view(50, 4)
    for j, allowed in enumerate(kept):
        assert set(picks[:, j].tolist()) <= allowed


def test_sampled_generation_only_picks_from_the_top_k_of_its_logits(small):
    composed, _, name = small
    ids, prompts = tokens((3, 6), 4), prompt(name)
    out = composed.generate(ids, 10, do_sample=True, temperature=1.5, top_k=3, generator=torch.Generator().manual_seed(0), **prompts)
    with torch.no_grad():
        logits = composed(out, **prompts)
    for t in range(6, 16):
        top3 = logits[:, t - 1].topk(3).indices
        assert (top3 == out[:, t:t + 1]).any(1).all(), f"position {t}"


def test_seeded_sampling_is_reproducible(small):
    composed, _, name = small
    ids, prompts = tokens((3, 6), 5), prompt(name)
    run = lambda seed: composed.generate(ids, 12, do_sample=True, top_p=0.95, generator=torch.Generator().manual_seed(seed), **prompts)  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


# -- eos ----------------------------------------------------------------------------------------------
def test_eos_stops_each_row_and_pads_after_it(small):
    composed, _, name = small
    ids, prompts = tokens((3, 6), 6), prompt(name)
    free = composed.generate(ids, 10, temperature=0, **prompts)[:, 6:]
    eos = int(free[0, 3])                                          # row 0 emits it at step <= 3
    out = composed.generate(ids, 10, temperature=0, eos_token_id=eos, pad_token_id=-7, **prompts)[:, 6:]
    for i in range(3):
        hits = (free[i] == eos).nonzero().flatten().tolist()
        stop = hits[0] + 1 if hits else 10
        assert torch.equal(out[i, :stop], free[i, :stop])
        assert (out[i, stop:] == -7).all()
    assert (out[0] == eos).sum() == 1


def test_generation_stops_once_every_row_is_finished(small):
    composed, _, name = small
    ids, prompts = tokens((1, 6), 6), prompt(name, batch=1)
    free = composed.generate(ids, 10, temperature=0, **prompts)
    eos = int(free[0, 8])
    stop = int((free[0, 6:] == eos).nonzero()[0]) + 1
    out = composed.generate(ids, 10, temperature=0, eos_token_id=[VOCAB + 5, eos], **prompts)
    assert torch.equal(out, free[:, :6 + stop])


def test_zero_new_tokens_returns_the_prompt(small):
    composed, _, name = small
    ids = tokens((2, 4), 8)
    assert torch.equal(composed.generate(ids, 0, **prompt(name, batch=2)), ids)


# -- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1}, "temperature must be a finite number >= 0"),
    ({"top_k": -1}, "top_k must be a non-negative int"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"max_new_tokens": -2}, "max_new_tokens must be a non-negative int"),
    ({"attention_mask": torch.ones(2, 3)}, r"attention_mask must have the shape of input_ids \(2, 4\); got \(2, 3\)"),
    ({"attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])}, r"rows \[1\] of attention_mask have no real token"),
    ({"notes_input_ids": None}, r"missing inputs \['notes_input_ids'\]"),
    ({"nots_input_ids": torch.zeros(2, 3, dtype=torch.long)}, r"unknown keywords \['nots_input_ids'\]: generate takes "
                                                              r".*the inputs of this composition: input_ids, "
                                                              "notes_input_ids, notes_mask"),
    ({"notes_input_ids": torch.zeros(3, 3, dtype=torch.long)}, "notes_input_ids has batch size 3 but input_ids has 2"),
    ({"input_ids": torch.zeros(2, 4)}, "input_ids must be a \\(batch, seq\\) tensor of int64 \\(or int32\\) token ids"),
])
def test_bad_input_is_named(small, kwargs, message):
    composed, _, _ = small
    args = {"input_ids": tokens((2, 4), 9), "max_new_tokens": 3, "notes_input_ids": tokens((2, 3), 9), **kwargs}
    if args["notes_input_ids"] is None:
        del args["notes_input_ids"]
    with pytest.raises(cg.InputError, match=message):
        composed.generate(**args)

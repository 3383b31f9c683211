"""generate as a transformers user expects it: greedy by default, `do_sample`, `generation_config`,
`min_new_tokens`, `repetition_penalty`, `stopping_criteria`, `streamer`, and transformers' own warnings.

The references are transformers' `generate` of the anchor (at init, with the output projections at zero,
the composition computes the anchor exactly), argmax over full forwards, and properties that must hold.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import calmgraph as cg
import calmgraph.generation.sampling as sampling
from tests import support
from tests.support import VOCAB
from tests.test_generate import demo, greedy_by_full_forwards, hf, prompt, tokens

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def small():
    return demo()


@pytest.fixture(scope="module")
def at_init():
    """Llama <- GPT-2 (shared) + BERT (prompt) with every output projection at zero: the anchor exactly."""
    composed, llama, name = hf()
    with torch.no_grad():
        for n, p in composed.named_new_parameters():
            if n.endswith("to_out.weight"):
                p.zero_()
    return composed, llama, name


# -- defaults and warnings ---------------------------------------------------------------------------
def test_the_default_is_greedy_without_a_warning(small):
    composed, _, name = small
    ids, prompts = tokens((3, 6), 1), prompt(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = composed.generate(ids, 8, **prompts)
    assert torch.equal(out, greedy_by_full_forwards(composed, ids, 8, prompts))


@pytest.mark.parametrize("flags", [{"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.9}, {"temperature": 0.7, "top_k": 5}])
def test_sampling_flags_without_do_sample_warn_as_transformers_does_and_stay_greedy(small, flags):
    composed, _, name = small
    ids, prompts = tokens((3, 6), 2), prompt(name)
    with pytest.warns(UserWarning) as record:
        out = composed.generate(ids, 6, **flags, **prompts)
    assert torch.equal(out, composed.generate(ids, 6, **prompts))
    with pytest.raises(ValueError) as theirs:          # transformers' own wording, flag by flag
        transformers.GenerationConfig(**flags).validate(strict=True)
    ours = [str(w.message) for w in record if "do_sample" in str(w.message)]
    assert len(ours) == len(flags) and all(message in str(theirs.value) for message in ours)


# -- the same tokens as transformers' generate ----------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(do_sample=False, repetition_penalty=1.5, min_new_tokens=6),
    dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, min_new_tokens=4),
    dict(do_sample=True),
], ids=["greedy_penalty_min", "sampled_all", "sampled_plain"])
@pytest.mark.parametrize("padded", [False, True], ids=["", "left_padded"])
def test_the_tokens_are_transformers_generate_of_the_anchor_at_init(at_init, kwargs, padded):
    composed, llama, name = at_init
    ids, mask = tokens((3, 9), 30), torch.ones(3, 9, dtype=torch.long)
    if padded:
        mask[0, :4] = mask[2, :2] = 0
        ids = ids.masked_fill(mask == 0, 0)
    eos = int(greedy_by_full_forwards(composed, ids[1:2], 1, prompt(name, batch=1))[0, -1])  # a token greedy emits
    common = dict(attention_mask=mask, eos_token_id=eos, pad_token_id=0, max_new_tokens=10, **kwargs)
    torch.manual_seed(5)
    ours = composed.generate(ids, **common, **prompt(name))
    torch.manual_seed(5)
    theirs = llama.generate(ids, **common)
    assert torch.equal(ours, theirs)


def test_min_new_tokens_holds_back_the_eos(small):
    composed, _, name = small
    ids, prompts = tokens((1, 6), 6), prompt(name, batch=1)
    eos = int(composed.generate(ids, 1, **prompts)[0, -1])         # what greedy emits first
    assert composed.generate(ids, 5, eos_token_id=eos, **prompts).shape[1] == 7   # stops at once
    out = composed.generate(ids, 5, eos_token_id=eos, min_new_tokens=3, **prompts)[0, 6:]
    assert eos not in out[:3].tolist()


# -- generation_config ------------------------------------------------------------------------------
def test_generation_config_object_or_dict_gives_what_the_keywords_give(small):
    composed, _, name = small
    ids, prompts = tokens((3, 6), 3), prompt(name)
    run = lambda **kw: composed.generate(ids, generator=torch.Generator().manual_seed(0), **kw, **prompts)  # noqa: E731
    settings = dict(max_new_tokens=7, do_sample=True, temperature=1.3, top_k=4)
    expected = run(**settings)
    assert torch.equal(run(generation_config=transformers.GenerationConfig(**settings)), expected)
    assert torch.equal(run(generation_config=settings), expected)
    assert not torch.equal(expected, run(max_new_tokens=7))              # sampling did change the tokens
    with pytest.warns(UserWarning, match="`do_sample` is not set to `True`"):         # keywords win
        overridden = run(generation_config=settings, max_new_tokens=3, do_sample=False)
    assert torch.equal(overridden, run(max_new_tokens=3))


def test_a_models_own_generation_config_is_accepted(at_init):
    composed, llama, name = at_init
    ids = tokens((2, 5), 4)
    out = composed.generate(ids, generation_config=llama.generation_config, max_new_tokens=4, **prompt(name, batch=2))
    assert torch.equal(out, llama.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=llama.generation_config.eos_token_id))


@pytest.mark.parametrize("config, message", [
    ({"max_new_tokens": 3, "num_beam": 2}, r"generation_config has unknown fields \['num_beam'\]; generate reads "
                                           "max_new_tokens, min_new_tokens, do_sample"),
    (lambda: transformers.GenerationConfig(num_beams=4), r"generation_config sets \{'num_beams': 4\}, which calmgraph"),
    ("greedy", "generation_config must be a transformers GenerationConfig or a dict; got str"),
])
def test_bad_generation_config_is_named(small, config, message):
    composed, _, name = small
    with pytest.raises(cg.InputError, match=message):
        composed.generate(tokens((2, 4), 9), 3, generation_config=config() if callable(config) else config,
                          **prompt(name, batch=2))


# -- stopping criteria and streamers ------------------------------------------------------------------
def test_stopping_criteria_finish_rows_as_eos_does(small):
    composed, _, name = small
    ids, prompts = tokens((3, 6), 6), prompt(name)
    free = composed.generate(ids, 10, **prompts)
    eos = int(free[0, 8])
    by_eos = composed.generate(ids, 10, eos_token_id=eos, pad_token_id=-7, **prompts)
    last_is_eos = lambda seen, scores: seen[:, -1] == eos  # noqa: E731 - per row
    by_criterion = composed.generate(ids, 10, pad_token_id=-7, stopping_criteria=[last_is_eos], **prompts)
    assert torch.equal(by_criterion, by_eos)
    stop_at = transformers.StoppingCriteriaList([transformers.MaxLengthCriteria(max_length=6 + 4)])
    assert torch.equal(composed.generate(ids, 10, stopping_criteria=stop_at, **prompts), free[:, :10])


class Recorder:
    """transformers' streamer protocol: put(prompt), put(tokens of a step)..., end()."""

    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        assert not self.ended
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_a_streamer_gets_the_prompt_then_each_step_then_end(at_init):
    composed, llama, name = at_init
    ids, mask = tokens((2, 7), 11), torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])   # two prompt lengths
    ours, theirs = Recorder(), Recorder()
    out = composed.generate(ids, 5, attention_mask=mask, streamer=ours, **prompt(name, batch=2))
    llama.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, streamer=theirs, pad_token_id=0)
    assert ours.ended == theirs.ended == 1 and len(ours.puts) == len(theirs.puts) == 6
    assert all(torch.equal(a, b) for a, b in zip(ours.puts, theirs.puts))
    assert torch.equal(torch.cat([ours.puts[0], *(p[:, None] for p in ours.puts[1:])], 1), out)


# -- without transformers, and bad keywords -------------------------------------------------------------
def test_greedy_and_basic_sampling_work_without_transformers(small, monkeypatch):
    composed, _, name = small
    ids, prompts = tokens((3, 6), 4), prompt(name)
    with_it = composed.generate(ids, 6, **prompts)
    monkeypatch.setattr(sampling, "logits_process", lambda: None)
    assert torch.equal(composed.generate(ids, 6, **prompts), with_it)
    out = composed.generate(ids, 8, do_sample=True, temperature=1.5, top_k=3,
                            generator=torch.Generator().manual_seed(0), **prompts)
    with torch.no_grad():
        logits = composed(out, **prompts)
    for t in range(6, 14):
        assert (logits[:, t - 1].topk(3).indices == out[:, t:t + 1]).any(1).all(), f"position {t}"
    with pytest.raises(cg.InputError, match="repetition_penalty use transformers' logits processors"):
        composed.generate(ids, 3, repetition_penalty=1.2, **prompts)


@pytest.mark.parametrize("kwargs, message", [
    ({"tempreature": 0.5}, r"unknown keywords \['tempreature'\]: generate takes max_new_tokens, min_new_tokens, "
                           r"do_sample, temperature, .*stopping_criteria, streamer, .*and the inputs of this "
                           r"composition: input_ids, notes_input_ids, notes_mask \(optional\)"),
    ({"max_new_tokens": None}, "max_new_tokens is required: pass it, or set it in generation_config"),
    ({"do_sample": "yes"}, "do_sample must be True or False"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a finite positive number"),
    ({"min_new_tokens": -1}, "min_new_tokens must be a non-negative int"),
    ({"stopping_criteria": 3}, "stopping_criteria must be a transformers StoppingCriteriaList"),
    ({"eos_token_id": "</s>"}, "eos_token_id must be an int, a non-empty list of ints, or None"),
    ({"eos_token_id": []}, "eos_token_id must be an int, a non-empty list of ints, or None"),
    ({"max_new_tokens": True}, "max_new_tokens must be a non-negative int; got True"),
    ({"do_sample": True, "temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ({"do_sample": True, "temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"do_sample": True, "top_k": True}, "top_k must be a non-negative int"),
    ({"do_sample": True, "top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty must be a finite positive number"),
    ({"do_sample": True, "generator": 123}, r"generator must be a torch.Generator on the ids' device \(cpu\); got 123"),
    ({"compile_step": "yes"}, "compile_step must be True, False or a dict of torch.compile keywords"),
    ({"compile_step": {"modes": "max-autotune"}}, r"torch.compile takes no \['modes'\]; it takes backend, mode"),
    ({"compile_step": {"mode": "reduce-overhead", "options": {}}}, "a mode or options, not both"),
    ({"compile_prefill": 1}, "compile_prefill must be True, False or a dict of torch.compile keywords"),
    ({"compile_prefill": True}, "compile_prefill compiles the KV-cache decode graph, which this call does not use"),
    ({"compile_prefill": {"dynamic": True, "cudagraphs": True}},
     r"compile_prefill: torch.compile takes no \['cudagraphs'\]"),
    ({"cache": 1}, "cache must be None .*, True or False; got 1"),
    ({"eos_token_id": VOCAB}, rf"eos_token_id {VOCAB} is outside the vocabulary \[0, {VOCAB}\) .* no row could ever finish"),
    ({"eos_token_id": [VOCAB, -1]}, rf"eos_token_id \[{VOCAB}, -1\] is outside the vocabulary"),
    ({"attention_mask": torch.full((2, 4), 0.5)}, r"attention_mask must hold only 0 \(padding\) and 1 \(token\); .* 0.5"),
])
def test_bad_options_are_named(small, kwargs, message):
    composed, _, name = small
    args = {"max_new_tokens": 3, **prompt(name, batch=2), **kwargs}
    with pytest.raises(cg.InputError, match=message):
        composed.generate(tokens((2, 4), 9), **args)


def test_a_prompt_mask_that_is_not_0_or_1_is_refused(small):
    composed, _, name = small
    prompts = prompt(name, batch=2)
    prompts[f"{name}_mask"] = prompts[f"{name}_mask"] * 0.5
    with pytest.raises(cg.InputError, match=rf"{name}_mask must hold only 0 \(padding\) and 1 \(token\)"):
        composed.generate(tokens((2, 4), 9), 3, **prompts)


# -- what the models can read: vocabulary and positions ---------------------------------------------------
def test_ids_outside_the_vocabulary_are_refused_before_any_model_runs(small):
    composed, _, name = small
    for bad in (VOCAB, -1):
        ids = tokens((2, 4), 9)
        ids[1, 2] = bad
        with pytest.raises(cg.InputError, match=rf"input_ids holds token ids outside the vocabulary \[0, {VOCAB}\)"):
            composed.generate(ids, 3, **prompt(name, batch=2))


def test_max_new_tokens_past_the_positions_is_refused_before_anything_is_allocated(at_init):
    composed, _, name = at_init                       # the shared sequence is read by models of 64 positions
    ids = tokens((2, 10), 4)
    with pytest.raises(cg.InputError, match="a prompt of 10 tokens and max_new_tokens=1000000000000 need "
                                            "1000000000010 positions, .* have 64; lower max_new_tokens to at most 54"):
        composed.generate(ids, 10**12, **prompt(name, batch=2))
    assert composed.generate(ids, 54, **prompt(name, batch=2)).shape == (2, 64)


def test_without_known_positions_the_recomputing_path_allocates_as_it_goes():
    # A hand-written GPT does not say its positions, so nothing bounds max_new_tokens up front: the working
    # buffer must grow with the tokens made, not hold the 10**12 that were allowed (8 TB: refused by torch).
    torch.manual_seed(0)
    composed = cg.compile({"anchor": {"name": "base"}, "augments": [{"name": "kv"}],
                           "edges": [{"source": "kv", "target": "base", "layers": {"every": 2}}]},
                          models={"base": support.gpt(dim=32, depth=2).eval(), "kv": support.gpt(dim=32, depth=2).eval()})
    assert composed.signature["input_ids"].positions is None
    ids = tokens((1, 5), 2)
    out = composed.generate(ids, 10**12, stopping_criteria=lambda seen, scores: seen.shape[1] >= 9)
    assert torch.equal(out, greedy_by_full_forwards(composed, ids, 4, {}))


def test_only_ids_every_reader_can_embed_are_generated():
    # The anchor's vocabulary (96) is larger than the shared augment's (80), and its head is pushed towards
    # the ids past 80: greedy must pick the best of the ids the augment can read back, at every step.
    torch.manual_seed(0)
    anchor, kv = support.llama(dim=32, depth=2).eval(), support.gpt2(dim=32, depth=2).eval()
    kv.resize_token_embeddings(80)
    with torch.no_grad():
        anchor.lm_head.weight[80:] *= 50
    composed = cg.compile({"anchor": {"name": "base"}, "augments": [{"name": "kv"}],
                           "edges": [{"source": "kv", "target": "base", "layers": {"every": 1}}]},
                          models={"base": anchor, "kv": kv})
    ids = torch.randint(0, 80, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (anchor(ids).logits[:, -1].argmax(-1) >= 80).any()       # unmasked, it would emit unreadable ids
    expected = ids
    with torch.no_grad():
        for _ in range(6):
            expected = torch.cat([expected, composed(expected)[:, -1, :80].argmax(-1, keepdim=True)], dim=1)
    for cache in (True, False):
        assert torch.equal(composed.generate(ids, 6, cache=cache), expected)


def casts(fn) -> tuple[torch.Tensor, int]:
    from torch.profiler import profile
    with profile() as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")


def test_linear_weights_leave_tied_weights_and_linear_subclasses_alone():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.proj, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight                          # tied: the embedding reads it too
            self.mha_out = torch.nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4)
            self.half = torch.nn.Linear(4, 4).to(torch.bfloat16)         # not float32: nothing to cast

    from calmgraph.generation.copies import linear_weights
    model = Model()
    assert linear_weights(model, torch.device("cpu")) == {id(model.proj.weight), id(model.proj.bias)}


def test_autocast_copies_are_the_casts_autocast_makes(small):
    from calmgraph.generation.copies import autocast_copies
    composed, _, _ = small
    cpu = torch.device("cpu")
    assert autocast_copies(composed, cpu) == {}                          # autocast off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        copies = autocast_copies(composed, cpu)
    weights = {id(p): p for p in composed.parameters()}
    assert copies and all(torch.equal(t, weights[i].to(torch.bfloat16)) for i, t in copies.items())


@pytest.fixture(scope="module")
def llama_gpt2_bert():
    return hf()


@pytest.mark.parametrize("which, cache", [("small", None), ("llama_gpt2_bert", True)], ids=["recomputed", "cached"])
def test_eager_generate_under_autocast_casts_each_linear_weight_once(which, cache, request, monkeypatch):
    """Each step runs on copies of the nn.Linear weights cast once, where autocast would cast them again at
    every step: the demo's anchor stage, recomputed (it has no cache), and the decode graph, which reads the
    composed model's weights by names of its own (found by identity). The decode graph's caches hold the
    models' dtype: each write casts its keys and values to it (they came in bfloat16, and `index_copy_`
    refused them). Same tokens as full forwards under autocast, fewer casts, no warning."""
    import calmgraph.generation.copies as copies
    composed, _, name = request.getfixturevalue(which)
    ids, prompts = tokens((2, 4), 9), prompt(name, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = greedy_by_full_forwards(composed, ids, 6, prompts)
        composed.generate(ids, 6, cache=cache, **prompts)   # a new decoder's first use runs the check's forwards
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got, fewer = casts(lambda: composed.generate(ids, 6, cache=cache, **prompts))
        monkeypatch.setattr(copies, "autocast_copies", lambda module, device: {})
        again, every_step = casts(lambda: composed.generate(ids, 6, cache=cache, **prompts))
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert fewer < every_step


@pytest.mark.parametrize("mode", ["shared", "prompt"])
def test_llama_augments_decode_under_autocast(mode):
    """A Llama anchor and a Llama augment under autocast: each decoded model's cache writes cast its keys and
    values to the cache's dtype (a cast that the decode graph's rewrites, which see the traced dtypes, must
    not take for a no-op). Eager, compiled, and with concatenated projections: the tokens of full forwards."""
    from tests.test_generate_fuse import compose, ids_and_prompts
    composed = compose("llama", mode)
    ids, extra = ids_and_prompts(mode, seed=45, length=5)
    step = {"backend": "eager"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = greedy_by_full_forwards(composed, ids, 5, extra)
        assert torch.equal(composed.generate(ids, 5, cache=True, **extra), expected)
        assert torch.equal(composed.generate(ids, 5, compile_step=step, **extra), expected)
        assert torch.equal(composed.generate(ids, 5, compile_step=step, concat_projections=True, **extra), expected)


def test_rows_of_two_lengths_compile_on_one_set_of_cast_weights(llama_gpt2_bert):
    """Under autocast, rows of two prompt lengths decode side by side, a decoder each: both decoders' compiled
    steps and prefills hold the same half-size copies of the weights (one set per composition, not one per
    decoder), and give eager's tokens."""
    from calmgraph.generation.generate import decoder_for
    composed, _, name = llama_gpt2_bert
    ids, prompts = tokens((2, 6), 9), prompt(name, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0                                                     # rows of 4 and 6 tokens
    step = {"backend": "eager"}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = composed.generate(ids, 5, attention_mask=mask, compile_step=step, compile_prefill=step, **prompts)
        assert torch.equal(got, composed.generate(ids, 5, attention_mask=mask, **prompts))
        made = [decoder_for(composed, 1, 11, slot)._compiled[role][2]  # under autocast: its decoders
                for slot in (0, 1) for role in ("step", "prefill")]
    held = [{id(p) for p in getattr(m, "step", m)._orig_mod.parameters() if p.dtype == torch.bfloat16}
            for m in made]   # a step's compiled module is inside decode.MathAttention
    assert held[0] and all(h == held[0] for h in held)


@pytest.mark.parametrize("compiles", [("compile_step",), ("compile_prefill",), ("compile_step", "compile_prefill")])
def test_a_compiled_step_under_autocast_runs_on_weights_cast_once_and_refreshed_at_each_call(llama_gpt2_bert,
                                                                                              monkeypatch, compiles):
    """The compiled step (and prefill) holds copies of the linear weights cast to autocast's dtype (its caches
    shared; one copy for both), so no step casts them again: fewer casts than compiled on the float32 weights,
    the same tokens as full forwards, no warning. The copies are refreshed at each call: a weight changed
    between two calls changes the next call's tokens as it changes full forwards'."""
    import calmgraph.generation.copies as copies
    composed, _, name = llama_gpt2_bert
    ids, prompts = tokens((2, 4), 9), prompt(name, batch=2)
    step = {"backend": "eager"}
    compiled = dict.fromkeys(compiles, step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = greedy_by_full_forwards(composed, ids, 6, prompts)
        monkeypatch.setattr(copies, "autocast_weights", lambda module, device: (None, []))
        generate = lambda: composed.generate(ids, 6, cache=True, **compiled, **prompts)  # noqa: E731
        generate()                                 # compiles: dynamo's tracing casts too; counted: a later call
        again, every_step = casts(generate)
        monkeypatch.undo()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            generate()
            got, fewer = casts(generate)
        assert torch.equal(got, expected) and torch.equal(again, expected)
        assert fewer < every_step
        cast = {id(w) for w in copies.autocast_weights(composed, torch.device("cpu"))[1]}
        weight = next(p for n, p in reversed(list(composed.named_parameters()))   # the anchor's last MLP
                      if n.endswith("down_proj.weight") and id(p) in cast)
        before = weight.detach().clone()
        try:
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 5)
            changed = greedy_by_full_forwards(composed, ids, 6, prompts)
            assert not torch.equal(changed, expected)
            assert torch.equal(composed.generate(ids, 6, cache=True, **compiled, **prompts), changed)  # same twin
        finally:
            with torch.no_grad():
                weight.copy_(before)

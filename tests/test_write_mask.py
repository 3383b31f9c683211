"""`writes: masked`: a block adds its delta only where the call's `write_mask` is 1.

Checked against the eager reference (hooks on the user's own models, explicit attention math), against
two properties (an all-zero mask is the anchor alone; an all-ones mask is the same blocks with `writes:
all`), and through every path that calls the fused graph: generation (the stage split, padding), export,
training, the bench's hook baseline.
"""
from __future__ import annotations

import pytest
import torch

import calmgraph as cg
from calmgraph.errors import InputError, LayerRefError, SpecError, TraceError
from tests.support import VOCAB, bert, eager_reference, gpt, gpt2, llama, randomize_new_parameters


def composition(writes_gpt2="masked", writes_bert="masked"):
    """Llama <- GPT-2 (shared, every 2nd block) and BERT (prompt, into block 2); random nonzero blocks."""
    torch.manual_seed(0)
    models = {"llama": llama().eval(), "gpt2": gpt2().eval(), "bert": bert().eval()}
    spec = {"anchor": {"name": "llama"}, "augments": [{"name": "gpt2"}, {"name": "bert", "input": "prompt"}],
            "edges": [{"source": "gpt2", "target": "llama", "layers": {"every": 2},
                       "cross_attention": {"writes": writes_gpt2}},
                      {"source": "bert", "target": "llama", "layers": [[-1, 2]],
                       "cross_attention": {"writes": writes_bert}}]}
    composed = cg.compile(spec, models=models)
    randomize_new_parameters(composed, std=0.2)
    return composed, models


def inputs(batch=2, seq=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    notes = torch.randint(0, VOCAB, (batch, 7), generator=g)
    notes_mask = torch.ones(batch, 7, dtype=torch.long)
    notes_mask[-1, 4:] = 0
    write = torch.randint(0, 2, (batch, seq), generator=g)
    return ids, notes, notes_mask, write


@pytest.fixture(scope="module")
def masked():
    return composition()


def call(composed, ids, notes, notes_mask, write):
    with torch.no_grad():
        return composed(input_ids=ids, bert_input_ids=notes, bert_mask=notes_mask, write_mask=write)


@pytest.mark.parametrize("writes", [("masked", "masked"), ("masked", "all"), ("all", "masked")])
def test_matches_the_eager_reference(writes):
    composed, models = composition(*writes)
    ids, notes, notes_mask, write = inputs()
    expected = eager_reference(composed, models, ids, {"bert": (notes, notes_mask)}, write_mask=write)
    torch.testing.assert_close(call(composed, ids, notes, notes_mask, write), expected, rtol=1e-4, atol=1e-4)


def test_all_zero_is_the_anchor_alone_and_all_ones_is_writes_all(masked):
    composed, models = masked
    ids, notes, notes_mask, write = inputs()
    with torch.no_grad():
        alone = models["llama"](ids).logits
        torch.testing.assert_close(call(composed, ids, notes, notes_mask, torch.zeros_like(write)), alone)
        everywhere, _ = composition("all", "all")
        everywhere.get_submodule("xattn").load_state_dict(composed.get_submodule("xattn").state_dict())
        unmasked = everywhere(input_ids=ids, bert_input_ids=notes, bert_mask=notes_mask)
    torch.testing.assert_close(call(composed, ids, notes, notes_mask, torch.ones_like(write)), unmasked)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # the blocks do write


def test_a_write_reaches_later_positions_only(masked):
    """A position's own block output is masked, but later positions read the states it changed: a write
    at position 3 changes the logits from position 3 on, and none before it."""
    composed, models = masked
    ids, notes, notes_mask, _ = inputs()
    write = torch.zeros_like(ids)
    write[:, 3] = 1
    diff = (call(composed, ids, notes, notes_mask, write) - models["llama"](ids).logits.detach()).abs().amax(-1)
    assert (diff[:, :3] == 0).all() and (diff[:, 3:] > 1e-4).all()


def test_chained_augments_write_where_the_mask_says():
    """augment -> augment -> anchor, both edges masked: the middle model is a target too."""
    torch.manual_seed(1)
    models = {"base": gpt(48, 4).eval(), "mid": gpt(32, 2).eval(), "low": gpt(24, 2).eval()}
    composed = cg.compile({"anchor": {"name": "base"}, "augments": [{"name": "mid"}, {"name": "low"}],
                           "edges": [{"source": "low", "target": "mid", "layers": [[1, 0]]},
                                     {"source": "mid", "target": "base", "layers": [[1, 1], [1, 3]]}],
                           "cross_attention": {"writes": "masked"}}, models=models)
    randomize_new_parameters(composed, std=0.2)
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    write = torch.randint(0, 2, (3, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = composed(input_ids=ids, write_mask=write)
    torch.testing.assert_close(got, eager_reference(composed, models, ids, write_mask=write), rtol=1e-4, atol=1e-4)


def test_bad_write_masks_are_refused_by_name(masked):
    composed, _ = masked
    ids, notes, notes_mask, write = inputs()
    with pytest.raises(InputError, match=r"missing inputs \['write_mask'\]; this composition takes input_ids, "
                                         r"bert_input_ids, write_mask, bert_mask \(optional\)"):
        composed(input_ids=ids, bert_input_ids=notes)
    with pytest.raises(InputError, match=r"write_mask must be a real tensor of the shape of input_ids \(2, 9\): 1 "
                                         r"where the masked blocks write, 0 where not; got a \(2, 8\)"):
        call(composed, ids, notes, notes_mask, write[:, :8])
    with pytest.raises(InputError, match=r"write_mask must hold only 0 \(no write\) and 1 \(write\); got other "
                                         r"values such as 2"):
        call(composed, ids, notes, notes_mask, write * 2)


def test_a_masked_edge_into_a_prompt_augment_is_refused():
    torch.manual_seed(0)
    models = {"llama": llama().eval(), "b1": bert().eval(), "b2": bert().eval()}
    spec = {"anchor": {"name": "llama"}, "augments": [{"name": "b1", "input": "prompt"}, {"name": "b2", "input": "prompt"}],
            "edges": [{"source": "b2", "target": "b1", "layers": [[0, 1]], "cross_attention": {"writes": "masked"}},
                      {"source": "b1", "target": "llama", "layers": [[1, 1]]}]}
    with pytest.raises(LayerRefError, match=r"edges\[0\].cross_attention.writes: masked writes follow `write_mask` "
                                            r"over the anchor's tokens, but the target 'b1' reads a prompt of its "
                                            r"own; use writes: all for this edge"):
        cg.compile(spec, models=models)
    with pytest.raises(SpecError, match=r"writes"):
        cg.CompositionSpec(**{**spec, "cross_attention": {"writes": "prompt"}})


def _argmax_reference(composed, ids, notes, notes_mask, write, new):
    """Greedy by full forwards, one row at a time, the write mask 0 at every new token."""
    out = []
    for r in range(ids.shape[0]):
        seq, w = ids[r:r + 1], write[r:r + 1]
        for _ in range(new):
            logits = call(composed, seq, notes[r:r + 1], notes_mask[r:r + 1], w)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            w = torch.cat([w, torch.zeros_like(w[:, :1])], 1)
        out.append(seq[0, ids.shape[1]:])
    return torch.stack(out)


CACHES = {"recompute": {"cache": False}, "cached": {"cache": True},
          "compiled": {"cache": True, "compile_step": {"backend": "eager"}},
          "compiled_prefill": {"cache": True, "compile_step": {"backend": "eager"},     # the prefill writes
                               "compile_prefill": {"backend": "aot_eager", "dynamic": True}}}


@pytest.mark.parametrize("how", CACHES)
def test_generate_writes_in_the_prompt_only_and_matches_full_forwards(masked, how):
    composed, _ = masked
    ids, notes, notes_mask, write = inputs(batch=3, seq=8, seed=5)
    got = composed.generate(ids, 6, bert_input_ids=notes, bert_mask=notes_mask, write_mask=write, **CACHES[how])
    torch.testing.assert_close(got[:, 8:], _argmax_reference(composed, ids, notes, notes_mask, write, 6))


@pytest.mark.parametrize("how", CACHES)
def test_generate_with_left_padding_moves_the_write_mask_with_the_tokens(masked, how):
    """Rows of different lengths: the cached path decodes them in groups, each with its own prompt's mask."""
    composed, _ = masked
    ids, notes, notes_mask, write = inputs(batch=2, seq=8, seed=6)
    padded, attention, padded_write = (torch.zeros_like(t) for t in (ids, ids, write))
    padded[0], attention[0], padded_write[0] = ids[0], 1, write[0]
    padded[1, 3:], attention[1, 3:], padded_write[1, 3:] = ids[1, :5], 1, write[1, :5]
    got = composed.generate(padded, 4, attention_mask=attention, bert_input_ids=notes, bert_mask=notes_mask,
                            write_mask=padded_write, **CACHES[how])
    assert torch.equal(got[0, 8:], _argmax_reference(composed, ids[:1], notes[:1], notes_mask[:1], write[:1], 4)[0])
    assert torch.equal(got[1, 8:], _argmax_reference(composed, ids[1:, :5], notes[1:], notes_mask[1:], write[1:, :5], 4)[0])


def test_the_decode_step_takes_the_write_mask_and_writes_nothing_at_new_tokens(masked):
    """The cached path really decodes (not a silent fallback): its decoder takes a write_mask, and a prompt
    with writes gives other tokens than the same prompt without (the blocks write in the prompt)."""
    from calmgraph.generation.generate import decoder_for
    composed, _ = masked
    ids, notes, notes_mask, write = inputs(batch=3, seq=8, seed=5)
    kwargs = dict(bert_input_ids=notes, bert_mask=notes_mask, cache=True)
    with_writes = composed.generate(ids, 6, write_mask=torch.ones_like(write), **kwargs)
    assert decoder_for(composed, 3, 14).takes_writes
    without = composed.generate(ids, 6, write_mask=torch.zeros_like(write), **kwargs)
    assert not torch.equal(with_writes, without)


def test_the_pt2_takes_the_write_mask(masked, tmp_path):
    composed, _ = masked
    program = torch.export.load(str(composed.export(tmp_path / "masked.pt2"))).module()
    for batch, seq in [(2, 9), (3, 5)]:
        ids, notes, notes_mask, write = inputs(batch, seq, seed=seq)
        with torch.no_grad():
            got = program(input_ids=ids, bert_input_ids=notes, write_mask=write, bert_mask=notes_mask)
        torch.testing.assert_close(got, call(composed, ids, notes, notes_mask, write), rtol=1e-5, atol=1e-5)


def test_training_updates_a_masked_block_only_through_written_positions():
    """FineTuner passes write_mask from the batch: all zeros, the masked blocks get no gradient and stay as
    they are; the blocks of the unmasked edge still train."""
    from calmgraph.train import FineTuner, TrainConfig
    composed, _ = composition("masked", "all")
    ids, notes, notes_mask, _ = inputs(batch=4, seq=9)
    data = [{"input_ids": ids[i], "bert_input_ids": notes[i], "bert_mask": notes_mask[i],
             "write_mask": torch.zeros(9, dtype=torch.long)} for i in range(4)]
    before = {k: p.detach().clone() for k, p in composed.named_new_parameters()}
    FineTuner(composed, data, TrainConfig(max_steps=3, batch_size=2, lr=1e-2, cpu=True, progress=False)).train()
    after = dict(composed.named_new_parameters())
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("xattn.bert_to_llama") for k in moved), sorted(moved)


def test_the_hook_baseline_computes_the_same(masked):
    from calmgraph.bench.baselines import HookComposition
    composed, models = masked
    ids, notes, notes_mask, write = inputs()
    with torch.no_grad():
        hooked = HookComposition(composed, models)(input_ids=ids, bert_input_ids=notes, bert_mask=notes_mask,
                                                   write_mask=write)
    torch.testing.assert_close(getattr(hooked, "logits", hooked), call(composed, ids, notes, notes_mask, write))


def test_a_masked_link_into_a_recomputed_shared_augment_generates_by_recomputing():
    """GPT-2 writes (masked) into a BERT that reads the anchor's tokens and is run again over the sequence at
    each step; the step's contexts take no write_mask. cache=None falls back to recomputing, with a warning,
    and still generates what full forwards give; cache=True says why it cannot."""
    torch.manual_seed(0)
    models = {"llama": llama().eval(), "gpt2": gpt2().eval(), "bert": bert().eval()}
    spec = {"anchor": {"name": "llama"}, "augments": [{"name": "gpt2"}, {"name": "bert"}],
            "edges": [{"source": "gpt2", "target": "bert", "layers": [[1, 1]], "cross_attention": {"writes": "masked"}},
                      {"source": "bert", "target": "llama", "layers": [[-1, 2]]}]}
    composed = cg.compile(spec, models=models)
    randomize_new_parameters(composed, std=0.2)
    g = torch.Generator().manual_seed(3)
    ids, write = torch.randint(0, VOCAB, (2, 7), generator=g), torch.randint(0, 2, (2, 7), generator=g)
    with pytest.warns(UserWarning, match=r"without the anchor's KV cache: a shared augment recomputed at each step "
                                         r"is the target of a writes: masked link"):
        got = composed.generate(ids, 4, write_mask=write)
    expected = []
    for r in range(2):
        seq, w = ids[r:r + 1], write[r:r + 1]
        for _ in range(4):
            with torch.no_grad():
                logits = composed(input_ids=seq, write_mask=w)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
            w = torch.cat([w, torch.zeros_like(w[:, :1])], 1)
        expected.append(seq[0])
    assert torch.equal(got, torch.stack(expected))
    with pytest.raises(TraceError, match=r"generate\(\.\.\., cache=False\) recomputes instead"):
        composed.generate(ids, 4, write_mask=write, cache=True)


def test_the_steps_after_prefill_drop_the_masked_blocks(masked):
    """A new token is never written: the step graph has no masked block, no link cache of one, and none of
    GPT-2's weights or cache (only masked links read it), while prefill keeps them all. The generate tests
    above run it."""
    from calmgraph.generation.generate import decoder_for
    composed, _ = masked
    decoder = decoder_for(composed, 2, 12)
    targets = lambda gm: [str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert any("masked" in t for t in targets(decoder.module)) and any("link_cache" in t for t in targets(decoder.module))
    for step in (decoder.step, decoder.to_compile):
        assert not any("masked" in t or "link_cache" in t or "attend" in t for t in targets(step))
        gpt2 = [n for n in step.graph.nodes if n.meta.get("calmgraph_model") == "gpt2"]
        assert not any(n.op == "get_attr" for n in gpt2) and len(gpt2) <= 4   # no weight, no cache: positions only
        assert [n.target for n in step.graph.nodes if n.op == "placeholder"] == \
            [n.target for n in decoder.module.graph.nodes if n.op == "placeholder"]
    half, _ = composition(writes_gpt2="masked", writes_bert="all")
    step = decoder_for(half, 2, 12).step
    assert any("attend" in t for t in targets(step)) and not any("link_cache" in t for t in targets(step))

"""Calling a composition: every bad input is an InputError naming the input and what to do, before any model
runs; the checks stay in the graph under torch.compile (no graph break) and in the exported program."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.support import DECODERS, VOCAB, bert, gpt2, llama, run_model

import calmgraph as cg
from calmgraph.demo.models import TinyEncoder, TinyLM

SMALL_VOCAB, PROMPT_POSITIONS = 80, 16  # the augment's vocabulary is the anchor's (96) less 16


def spec():
    return cg.CompositionSpec(anchor={"name": "base"}, augments=[{"name": "kv"}, {"name": "docs", "input": "prompt"}],
                              edges=[{"source": "kv", "target": "base", "layers": {"every": 1}},
                                     {"source": "docs", "target": "base", "layers": {"every": 1}}])


@pytest.fixture(scope="module")
def composition():
    torch.manual_seed(0)
    kv = gpt2(dim=32, depth=2)
    kv.resize_token_embeddings(SMALL_VOCAB)
    models = {"base": llama(dim=32, depth=2).eval(), "kv": kv.eval(),
              "docs": TinyEncoder(vocab=VOCAB, dim=32, depth=2, heads=2, max_len=PROMPT_POSITIONS).eval()}
    return cg.compile(spec(), models=models), models


def ids(batch=2, seq=5, high=SMALL_VOCAB, seed=0):
    return torch.randint(0, high, (batch, seq), generator=torch.Generator().manual_seed(seed))


PROMPT = ids(seq=6, high=VOCAB, seed=1)
BAD_CALLS = {
    "id at the vocabulary": (lambda: ((ids() * 0 + VOCAB,), {"docs_input_ids": PROMPT}), "input_ids", "vocabulary [0, 80)"),
    "id read only by the anchor's larger vocabulary": (lambda: ((ids() * 0 + SMALL_VOCAB,), {"docs_input_ids": PROMPT}),
                                                      "input_ids", "vocabulary [0, 80)"),
    "negative id": (lambda: ((ids() - SMALL_VOCAB,), {"docs_input_ids": PROMPT}), "input_ids", "vocabulary"),
    "prompt id past its model's vocabulary": (lambda: ((ids(),), {"docs_input_ids": PROMPT + VOCAB}), "docs_input_ids",
                                              "vocabulary [0, 96)"),
    "longer than the anchor's positions": (lambda: ((ids(seq=65),), {"docs_input_ids": PROMPT}), "input_ids", "64 positions"),
    "longer than the prompt model's positions": (lambda: ((ids(),), {"docs_input_ids": ids(seq=17)}), "docs_input_ids",
                                                 "16 positions"),
    **{f"{dtype} ids": (lambda dtype=dtype: ((ids().to(dtype),), {"docs_input_ids": PROMPT}), "input_ids", "int64")
       for dtype in (torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float32)},
    "missing prompt": (lambda: ((ids(),), {}), "docs_input_ids", "takes input_ids, docs_input_ids, docs_mask (optional)"),
    "misspelt keyword": (lambda: ((ids(),), {"doc_input_ids": PROMPT}), "doc_input_ids", "takes input_ids"),
    "extra keyword": (lambda: ((ids(),), {"docs_input_ids": PROMPT, "attention_mask": PROMPT}), "attention_mask",
                      "takes input_ids"),
    "too many positional": (lambda: ((ids(), PROMPT, PROMPT * 0 + 1, PROMPT), {}), "4 positional", "at most 3"),
    "given twice": (lambda: ((ids(), PROMPT), {"docs_input_ids": PROMPT}), "docs_input_ids", "both by position"),
    "length 0": (lambda: ((ids(seq=0),), {"docs_input_ids": PROMPT}), "input_ids", "at least one token"),
    "prompt length 0": (lambda: ((ids(),), {"docs_input_ids": PROMPT[:, :0]}), "docs_input_ids", "at least one token"),
    "batch 0": (lambda: ((ids(batch=0),), {"docs_input_ids": PROMPT[:0]}), "input_ids", "at least one sequence"),
    "mask of 0.5": (lambda: ((ids(),), {"docs_input_ids": PROMPT, "docs_mask": torch.full(PROMPT.shape, 0.5)}),
                    "docs_mask", "only 0 (padding) and 1"),
    "mask of 2": (lambda: ((ids(),), {"docs_input_ids": PROMPT, "docs_mask": PROMPT * 0 + 2}), "docs_mask", "only 0"),
    "complex mask": (lambda: ((ids(),), {"docs_input_ids": PROMPT, "docs_mask": torch.ones(PROMPT.shape, dtype=torch.cfloat)}),
                     "docs_mask", "real tensor"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_a_bad_call_is_an_input_error_naming_the_input(composition, case):
    composed, _ = composition
    make, name, what = BAD_CALLS[case]
    args, kwargs = make()
    with pytest.raises(cg.InputError) as info:
        composed(*args, **kwargs)
    message = str(info.value)
    assert name in message and what in message and "\n" not in message


def test_a_good_call_is_unchanged(composition):
    # At initialisation the composition is exactly the anchor, at the longest sequence it takes, with the
    # extreme ids of the shared vocabulary and a binary float mask.
    composed, models = composition
    x = ids(seq=64)
    x[0, 0], x[1, -1] = 0, SMALL_VOCAB - 1
    mask = torch.ones(2, PROMPT_POSITIONS)
    mask[0, 3:] = 0
    with torch.no_grad():
        got = composed(x, docs_input_ids=ids(seq=PROMPT_POSITIONS, high=VOCAB), docs_mask=mask)
    assert torch.equal(got, run_model(models["base"], x))


@given(st.lists(st.integers(-3, VOCAB + 3), min_size=1, max_size=8), st.integers(1, 2))
@settings(max_examples=40, deadline=None)
def test_ids_are_refused_exactly_when_outside_every_readers_vocabulary(composition, values, batch):
    composed, models = composition
    x = torch.tensor([values] * batch)
    inside = all(0 <= v < SMALL_VOCAB for v in values)
    with torch.no_grad():
        if inside:
            assert torch.equal(composed(x, PROMPT[:batch]), run_model(models["base"], x))
        else:
            with pytest.raises(cg.InputError, match="input_ids holds token ids outside"):
                composed(x, PROMPT[:batch])


@pytest.mark.parametrize("family", [*DECODERS, "bert", "tiny"])
def test_vocabulary_and_positions_are_found_for_every_family(family):
    # Each test model is built with VOCAB ids and 64 positions (TinyLM: max_len=64); the shared sequence
    # takes the least of the anchor's (VOCAB + 50, 100) and the augment's. The handwritten GPT does not
    # say its positions (its config is not kept): the anchor's 100 stand.
    make = {**DECODERS, "bert": bert, "tiny": lambda: TinyLM(vocab=VOCAB, dim=32, depth=2, heads=2, max_len=64)}[family]
    torch.manual_seed(0)
    models = {"base": TinyLM(vocab=VOCAB + 50, dim=32, depth=2, heads=2, max_len=100).eval(), "kv": make().eval()}
    reads = {"input": "prompt"} if family == "bert" else {}
    composed = cg.compile(cg.CompositionSpec(anchor={"name": "base"}, augments=[{"name": "kv", **reads}],
                                             edges=[{"source": "kv", "target": "base", "layers": {"every": 1}}]),
                          models=models)
    tokens = composed.signature["kv_input_ids" if reads else "input_ids"]
    assert (tokens.vocab, tokens.positions) == (VOCAB, 100 if family == "gpt" else 64)
    if reads:
        assert (composed.signature["input_ids"].vocab, composed.signature["input_ids"].positions) == (VOCAB + 50, 100)


def test_checks_compile_without_graph_breaks_and_still_refuse(composition):
    composed, _ = composition
    torch._dynamo.reset()
    x = ids()
    explained = torch._dynamo.explain(composed)(x, PROMPT)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(composed, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x, PROMPT), composed(x, PROMPT))
        with pytest.raises(RuntimeError, match=r"input_ids holds token ids outside the vocabulary \[0, 80\)"):
            compiled(x + SMALL_VOCAB, PROMPT)
        with pytest.raises(RuntimeError, match="docs_mask must hold only 0"):
            compiled(x, PROMPT, torch.full(PROMPT.shape, 0.5))
        with pytest.raises(cg.InputError, match="unknown inputs"):
            compiled(x, doc_input_ids=PROMPT)
    torch._dynamo.reset()


def test_exported_program_checks_ids_and_masks_with_torch_ops_only(composition, tmp_path):
    composed, _ = composition
    path = composed.export(tmp_path / "composed.pt2")
    program = torch.export.load(str(path))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten._assert_async.msg" in targets and not any("calmgraph" in t for t in targets)
    module = program.module()

    def run(x, prompt, mask):  # the artifact takes its inputs by name
        return module(input_ids=x, docs_input_ids=prompt, docs_mask=mask)
    x, mask = ids(), torch.ones_like(PROMPT)
    with torch.no_grad():
        assert torch.allclose(run(x, PROMPT, mask), composed(x, PROMPT, mask), atol=1e-5)
        with pytest.raises(RuntimeError, match="input_ids holds token ids outside"):
            run(x - SMALL_VOCAB, PROMPT, mask)
        with pytest.raises(RuntimeError, match="docs_input_ids holds token ids outside"):
            run(x, PROMPT + VOCAB, mask)
        with pytest.raises(RuntimeError, match="docs_mask must hold only 0"):
            run(x, PROMPT, mask * 3)

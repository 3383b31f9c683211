"""Model sources: each kind builds the model it names, passed models win, and every bad source is refused
with an error naming the model and the source."""
import textwrap

import pytest
import torch
import torch.nn as nn

import calmgraph as cg
from calmgraph.demo.models import TinyLM

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64}
BERT = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "vocab_size": 64}
TINY = {"python": "calmgraph.demo.models:TinyLM", "kwargs": {"vocab": 64, "dim": 24, "depth": 2, "heads": 2}}


def spec(anchor_source=None, augment_source=None, prompt=False):
    return {"anchor": {"name": "base", **({"source": anchor_source} if anchor_source else {})},
            "augments": [{"name": "aug", "input": "prompt" if prompt else "shared",
                          **({"source": augment_source} if augment_source else {})}],
            "edges": [{"source": "aug", "target": "base", "layers": [[-1, 0]]}]}


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- each kind ----------------------------------------------------------------------------------------
def test_hf_config_builds_the_configured_model_seeded_without_touching_global_rng():
    rng = torch.get_rng_state()
    models = cg.load_models(spec({"hf_config": LLAMA, "seed": 3}, {"hf_config": BERT, "seed": 0}, prompt=True))
    assert torch.equal(torch.get_rng_state(), rng)
    base, aug = models["base"], models["aug"]
    assert type(base).__name__ == "LlamaForCausalLM" and base.config.hidden_size == 32
    assert type(aug).__name__ == "BertModel"  # a prompt augment is read as an encoder: no LM head
    assert not base.training
    again = cg.load_models(spec({"hf_config": LLAMA, "seed": 3}, TINY))["base"]
    other = cg.load_models(spec({"hf_config": LLAMA, "seed": 4}, TINY))["base"]
    assert same_weights(base, again) and not same_weights(base, other)


def test_hf_dir_loads_saved_weights_offline_relative_to_the_spec_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = cg.load_models(spec({"hf_config": LLAMA, "seed": 1}, TINY))["base"]
    saved.save_pretrained(tmp_path / "models" / "llama")
    (tmp_path / "spec.yaml").write_text(textwrap.dedent("""
        anchor: {name: base, source: {hf: models/llama}}
        augments: [{name: aug, source: {python: "calmgraph.demo.models:TinyLM", kwargs: {vocab: 64, dim: 24}}}]
        edges: [{source: aug, target: base, layers: [[-1, 0]]}]
    """))
    loaded = cg.load_models(tmp_path / "spec.yaml")["base"]
    assert type(loaded).__name__ == "LlamaForCausalLM" and same_weights(loaded, saved)


def test_python_factory_from_module_and_from_file(tmp_path):
    (tmp_path / "factories.py").write_text(textwrap.dedent("""
        from calmgraph.demo.models import TinyLM
        def small(width):
            return TinyLM(vocab=64, dim=width, depth=2, heads=2)
    """))
    models = cg.load_models(spec(TINY, {"python": "factories.py:small", "kwargs": {"width": 16}, "seed": 0}),
                            base_dir=tmp_path, trust_code=True)
    assert isinstance(models["base"], TinyLM) and models["base"].tok.embedding_dim == 24
    assert isinstance(models["aug"], TinyLM) and models["aug"].tok.embedding_dim == 16
    torch.manual_seed(0)
    assert same_weights(models["aug"], TinyLM(vocab=64, dim=16, depth=2, heads=2))  # seed applied


def test_compile_from_sources_alone_is_the_anchor_at_init():
    composed = cg.compile(spec({"hf_config": LLAMA, "seed": 5}, {**TINY, "seed": 6}))
    anchor = cg.load_models(spec({"hf_config": LLAMA, "seed": 5}, TINY))["base"]
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.allclose(composed(ids), anchor(ids, use_cache=False).logits, atol=1e-6)


def test_models_passed_in_python_take_precedence_over_sources():
    mine = TinyLM(vocab=64, dim=40, depth=3, heads=2).eval()
    composed = cg.compile(spec({"python": "no.such.module:factory"}, TINY), models={"base": mine})
    assert composed.base.tok.embedding_dim == 40  # the source was never loaded (it would fail)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(composed(ids), mine(ids))


# -- refusals -----------------------------------------------------------------------------------------
class Boom(Exception):
    pass


def raising_factory():
    raise Boom("out of cheese")


def not_a_module():
    return {"weights": 1}


NOT_CALLABLE = 3


@pytest.mark.parametrize("source, message", [
    ({"hf": "/no/such/dir"}, "no directory at '/no/such/dir'"),
    ({"python": "no_such_module_xyz:make"}, "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
    ({"python": "calmgraph.demo.models:NoSuchModel"}, "'calmgraph.demo.models' has no attribute 'NoSuchModel'"),
    ({"python": "tests.test_sources:NOT_CALLABLE"}, "'NOT_CALLABLE' is a int, not a callable factory"),
    ({"python": "tests.test_sources:raising_factory"}, "the factory raised Boom: out of cheese"),
    ({"python": "tests.test_sources:not_a_module"}, "the factory returned a dict, not a torch.nn.Module"),
    ({"python": "calmgraph.demo.models:TinyLM", "kwargs": {"widht": 3}}, "the factory raised TypeError"),
    ({"python": "missing_file.py:make"}, "no Python file at"),
    ({"hf_config": {"model_type": "no_such_arch"}}, "could not build it from the config: ValueError"),
    ({"hf_config": LLAMA, "auto_class": "LlamaModel"}, "auto_class 'LlamaModel' is not a transformers Auto class"),
])
def test_bad_source_raises_model_error_naming_model_and_source(source, message):
    with pytest.raises(cg.ModelError) as e:
        cg.load_models(spec(TINY, source), trust_code=True)
    text = str(e.value)
    assert text.startswith("model 'aug' (source ") and message in text, text


@pytest.mark.parametrize("source, loc, message", [
    ({"python": "no_colon"}, "augments[0].source.python", "expected 'package.module:factory'"),
    ({"hf_config": {"hidden_size": 8}}, "augments[0].source", "needs `model_type`"),
    ({"hf": "x", "revision": "main"}, "augments[0].source.revision", "unknown key"),
    ({"huggingface": "x"}, "augments[0].source", "a source is one of"),
])
def test_malformed_source_is_a_located_spec_problem(source, loc, message):
    with pytest.raises(cg.SpecError) as e:
        cg.load_spec(spec(TINY, source))
    assert [p.loc for p in e.value.problems] == [loc] and message in e.value.problems[0].msg


def test_no_source_and_no_model_says_how_to_give_one():
    with pytest.raises(cg.ModelError, match=r"no model given for \['aug'\]: give each a `source:` in the spec or pass models="):
        cg.compile(spec(TINY, None))


def test_spec_with_sources_round_trips_through_yaml_and_json():
    s = cg.load_spec(spec({"hf_config": LLAMA, "seed": 1}, {**TINY, "seed": 2}))
    assert cg.CompositionSpec.from_yaml(s.to_yaml()) == s == cg.CompositionSpec.from_json(s.to_json())


# -- dtype ---------------------------------------------------------------------------------------------
def test_hf_dtype_loads_the_saved_weights_in_that_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = cg.load_models(spec({"hf_config": LLAMA, "seed": 1}, TINY))["base"].float()
    saved.save_pretrained(tmp_path / "llama")  # float32 on disk
    for dtype in ("bfloat16", "float16", "float32"):
        loaded = cg.load_models(spec({"hf": str(tmp_path / "llama"), "dtype": dtype}, TINY))["base"]
        want = {k: v.to(getattr(torch, dtype)) for k, v in saved.state_dict().items()}
        got = loaded.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), dtype


def test_hf_config_dtype_builds_the_weights_in_that_dtype_and_compiles():
    composed = cg.compile(spec({"hf_config": LLAMA, "seed": 5, "dtype": "bfloat16"}, TINY))
    anchor = cg.load_models(spec({"hf_config": LLAMA, "seed": 5, "dtype": "bfloat16"}, TINY))["base"]
    assert {p.dtype for p in anchor.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in composed.named_parameters() if n.startswith("base.")} == {torch.bfloat16}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # identity at init, in the anchor's own dtype
        assert torch.equal(composed(ids), anchor(ids, use_cache=False).logits)


@pytest.mark.parametrize("source", [{"hf": "x", "dtype": "int8"}, {"hf_config": LLAMA, "dtype": "fp16"}])
def test_an_unknown_dtype_is_a_located_spec_problem(source):
    with pytest.raises(cg.SpecError) as e:
        cg.load_spec(spec(source, TINY))
    assert [p.loc for p in e.value.problems] == ["anchor.source.dtype"]
    assert "float32" in e.value.problems[0].msg and "bfloat16" in e.value.problems[0].msg

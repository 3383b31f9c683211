"""Hostile input: generated specs (hypothesis) and one test per kind of bad input, each asserting its message.

Every generated spec either compiles, computes exactly its anchor at init and matches the eager reference
once its cross-attention weights are randomised, or raises a calmgraph error. Nothing else may escape.
`pytest tests/test_hostile.py --hypothesis-show-statistics` prints how the examples ended (docs/hostile.md).
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import calmgraph as cg
from reference import eager_reference, randomize_new_parameters

VOCAB = 32


# -- small fast models (fx front end): position-wise blocks, so any layer map is valid causally ------------
class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class MiniLM(nn.Module):
    """forward(input_ids) -> logits."""

    def __init__(self, dim: int = 8, depth: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class MiniEncoder(MiniLM):
    """forward(input_ids, attention_mask) -> hidden states; padded positions are zeroed."""

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids) * attention_mask[..., None]
        for layer in self.layers:
            x = layer(x)
        return x


def mini(input_kind: str, dim: int, depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return (MiniEncoder if input_kind == "prompt" else MiniLM)(dim, depth).eval()


# -- generated specs: a valid composition, then (often) one to three mutations that may break it -------------
NAMES = ["base", "kv", "docs", "x_1", "B2"]
ODD_NAMES = ["bad-name", "1st", "", "ünï", "a b", "a.b"]


@st.composite
def valid_composition(draw):
    names = draw(st.permutations(NAMES))[: 1 + draw(st.integers(1, 3))]
    anchor, augs = names[0], names[1:]
    inputs = {anchor: "shared", **{a: draw(st.sampled_from(["shared", "prompt"])) for a in augs}}
    depth = {n: draw(st.integers(1, 4)) for n in names}
    dims = {n: draw(st.sampled_from([8, 12, 16])) for n in names}

    def layer_map(src, tgt):
        if draw(st.booleans()):
            return {"every": draw(st.integers(1, depth[src]))}
        pairs = draw(st.lists(st.tuples(st.integers(-depth[src], depth[src] - 1),
                                        st.integers(-depth[tgt], depth[tgt] - 1)), min_size=1, max_size=3,
                              unique_by=lambda p: (p[0] % depth[src], p[1] % depth[tgt])))
        return [[f"layers.{s % depth[src]}" if draw(st.integers(0, 4)) == 0 else s, t] for s, t in pairs]

    edges = []
    for i, a in enumerate(augs):  # each augment feeds a later model (never a prompt one if it is shared)
        later = [anchor] + [b for b in augs[i + 1:] if not (inputs[a] == "shared" and inputs[b] == "prompt")]
        for target in draw(st.lists(st.sampled_from(later), min_size=1, max_size=2, unique=True)):
            edge = {"source": a, "target": target, "layers": layer_map(a, target)}
            if draw(st.integers(0, 2)) == 0:
                edge["cross_attention"] = draw(st.fixed_dictionaries({}, optional={
                    "heads": st.integers(1, 4), "norm": st.sampled_from(["rms", "layer", "none"]),
                    "gate": st.sampled_from(["zero", "tanh"]), "project_context": st.just(True)}))
            edges.append(edge)
    spec = {"anchor": {"name": anchor, **({"tap": "input"} if draw(st.booleans()) else {})},
            "augments": [{"name": a, "input": inputs[a], **({"tap": "input"} if draw(st.booleans()) else {})}
                         for a in augs],
            "edges": edges}
    models = {n: mini(inputs[n], dims[n], depth[n], i) for i, n in enumerate(names)}
    return spec, models


def mutate(draw, spec, models):
    """One hostile change: most make the spec or the models invalid, some only unusual."""
    kind = draw(st.sampled_from(MUTATIONS))
    edge = draw(st.sampled_from(spec["edges"])) if spec["edges"] else {}
    aug = draw(st.sampled_from(spec["augments"])) if spec["augments"] else {}
    names = [spec["anchor"]["name"]] + [a["name"] for a in spec["augments"]]
    if kind == "odd name":
        draw(st.sampled_from([spec["anchor"], aug]))["name"] = draw(st.sampled_from(ODD_NAMES))
    elif kind == "duplicate name":
        aug["name"] = draw(st.sampled_from(names))
    elif kind == "self-loop":
        edge["target"] = edge["source"]
    elif kind == "cycle":
        spec["edges"].append({"source": edge["target"], "target": edge["source"], "layers": [[0, 0]]})
    elif kind == "unknown model":
        edge[draw(st.sampled_from(["source", "target"]))] = "nobody"
    elif kind == "index":
        edge["layers"] = [[draw(st.sampled_from([4, -5, 10**12, -10**12, "layers.9", "lyers.0"])), 0]]
    elif kind == "every":
        edge["layers"] = {"every": draw(st.sampled_from([0, -1, 5, "two"]))}
    elif kind == "layers type":
        edge["layers"] = draw(st.sampled_from(["all", [], [[0]], [[0, 0, 0]], None, 3.5]))
    elif kind == "unknown key":
        draw(st.sampled_from([spec, edge, aug]))[draw(st.sampled_from(["anchr", "layer", "inputs"]))] = 1
    elif kind == "cross_attention":
        edge["cross_attention"] = {draw(st.sampled_from(["heads", "norm", "gate", "project_context", "dim"])):
                                   draw(st.sampled_from([0, -2, "batch", False, None]))}
    elif kind == "blocks":
        aug["blocks"] = draw(st.sampled_from(["layers", "layer", "head", "emb", ""]))
    elif kind == "anchor as source":
        edge["source"] = spec["anchor"]["name"]
    elif kind == "drop model":
        models.pop(draw(st.sampled_from(sorted(models))))
    elif kind == "extra model":
        models["stray"] = mini("shared", 8, 1, 9)
    elif kind == "no augments":
        spec["augments"] = []
    elif kind == "input kind":
        aug["input"] = draw(st.sampled_from(["prompt", "shared", "image", 1]))


MUTATIONS = ["odd name", "duplicate name", "self-loop", "cycle", "unknown model", "index", "every", "layers type",
             "unknown key", "cross_attention", "blocks", "anchor as source", "drop model", "extra model",
             "no augments", "input kind"]


@st.composite
def compositions(draw):
    spec, models = draw(valid_composition())
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        mutate(draw, spec, models)
    return spec, models


def call_args(composed, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    kwargs, prompts = {}, {}
    for aug in composed.spec.augments:
        if aug.input == "prompt":
            p = torch.randint(0, VOCAB, (2, 5), generator=g)
            m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
            kwargs.update({f"{aug.name}_input_ids": p, f"{aug.name}_mask": m})
            prompts[aug.name] = (p, m)
    return ids, kwargs, prompts


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(compositions())
def test_generated_specs_compile_correctly_or_raise_calmgraph_errors(case):
    spec, models = case
    try:
        composed = cg.compile(spec, models)
    except cg.CalmGraphError as e:
        event(f"rejected: {type(e).__name__}")
        assert isinstance(e, ValueError), "a spec or model problem is the user's: a ValueError subclass"
        assert str(e).strip()
        return
    event(f"compiled ({len(composed.links)} cross-attention blocks)")
    ids, kwargs, prompts = call_args(composed)
    with torch.no_grad():
        anchor = models[composed.spec.anchor.name](ids)
        assert torch.equal(composed(ids, **kwargs), anchor)
        randomize_new_parameters(composed)
        out = composed(ids, **kwargs)
        torch.testing.assert_close(out, eager_reference(composed, models, None, ids, prompts), atol=1e-5, rtol=0)


# -- one test per kind of bad input --------------------------------------------------------------------------
def spec(**changes) -> dict:
    base = {"anchor": {"name": "base"}, "augments": [{"name": "kv"}],
            "edges": [{"source": "kv", "target": "base", "layers": [[0, 1]]}]}
    return {**base, **changes}


def models(**changes) -> dict:
    return {"base": mini("shared", 8, 2, 0), "kv": mini("shared", 12, 3, 1), **changes}


def spec_error(data, match, error=cg.SpecError):
    with pytest.raises(error, match=match) as e:
        cg.CompositionSpec.from_dict(data) if isinstance(data, dict) else data()
    return str(e.value)


def test_malformed_yaml():
    spec_error(lambda: cg.CompositionSpec.from_yaml("anchor: [unclosed\n  - x: {"), "not valid YAML")


def test_malformed_json():
    spec_error(lambda: cg.CompositionSpec.from_json('{"anchor": {"name": "base",}'), "not valid JSON")


def test_spec_that_is_not_a_mapping():
    spec_error(lambda: cg.CompositionSpec.from_yaml("- anchor\n- kv\n"), "a spec is a mapping with keys anchor, augments, edges; got list")
    spec_error(lambda: cg.CompositionSpec.from_json("42"), "got int")


def test_spec_file_missing(tmp_path):
    spec_error(lambda: cg.load_spec(tmp_path / "nope.yaml"), "no spec file at")


def test_wrong_types_are_all_reported_with_locations():
    msg = spec_error(spec(augments=[{"name": "kv", "input": 3}],
                          edges=[{"source": "kv", "target": "base", "layers": "all", "cross_attention": {"heads": "four"}}]),
                     "3 problems")
    assert "augments[0].input: Input should be 'shared' or 'prompt' (got 3)" in msg
    assert "edges[0].layers" in msg
    assert "edges[0].cross_attention.heads: Input should be a valid integer" in msg


def test_unknown_keys():
    msg = spec_error({**spec(), "anchr": {"name": "x"}, "edges": [{"source": "kv", "target": "base", "layer": [[0, 1]]}]},
                     "unknown key")
    assert "anchr: unknown key (check its spelling; unknown keys are not ignored)" in msg
    assert "edges[0].layer: unknown key" in msg and "edges[0].layers: required but missing" in msg


@pytest.mark.parametrize("ref,loc", [(10**12, 0), (-10**12, 1)])
def test_absurd_layer_index_is_refused_by_the_spec(ref, loc):
    """Past any model's depth: refused when the spec is read, before any model is looked at."""
    pair = [ref, 0] if loc == 0 else [0, ref]
    with pytest.raises(cg.SpecError, match=rf"edges\[0\]\.layers\[0\]\[{loc}\]: a block index is between -100,000 and 100,000"):
        cg.compile(spec(edges=[{"source": "kv", "target": "base", "layers": [pair]}]), models())


@pytest.mark.parametrize("ref,loc", [(99_999, 0), (-99_999, 1), (3, 0), (-4, 0), (2, 1), (-3, 1)])
def test_layer_index_out_of_range(ref, loc):
    pair = [ref, 0] if loc == 0 else [0, ref]
    n, model = (3, "kv") if loc == 0 else (2, "base")
    with pytest.raises(cg.LayerRefError, match=rf"edges\[0\]\.layers\[0\]\[{loc}\]: layer {ref} is out of range for "
                                             rf"'{model}', which has {n} blocks \(0\.\.{n - 1}, or -{n}\.\.-1 from the end\)"):
        cg.compile(spec(edges=[{"source": "kv", "target": "base", "layers": [pair]}]), models())


def test_layer_name_with_a_typo():
    with pytest.raises(cg.LayerRefError, match=r"'layer.1' is not a block of 'kv'; did you mean 'layers.1'\? tap points: 3 blocks"):
        cg.compile(spec(edges=[{"source": "kv", "target": "base", "layers": [["layer.1", 0]]}]), models())


def test_every_zero_and_too_deep():
    spec_error(spec(edges=[{"source": "kv", "target": "base", "layers": {"every": 0}}]),
               r"edges\[0\]\.layers\.every: Input should be greater than 0")
    with pytest.raises(cg.LayerRefError, match=r"edges\[0\]\.layers\.every: 4 exceeds the depth of 'kv' \(3 blocks\)"):
        cg.compile(spec(edges=[{"source": "kv", "target": "base", "layers": {"every": 4}}]), models())


@pytest.mark.parametrize("name", ["bad-name", "1st", "", "ünï", "a b", "a.b", "x" * 3 + "\n", "__import__('os')"])
def test_names_with_odd_characters(name):
    spec_error(spec(anchor={"name": name}), r"anchor\.name: String should match pattern '\^\[A-Za-z\]\[A-Za-z0-9_\]\*\$'")


def test_cycle():
    msg = spec_error(spec(augments=[{"name": "kv"}, {"name": "b"}, {"name": "c"}],
                          edges=[{"source": "kv", "target": "base", "layers": [[0, 0]]},
                                 {"source": "b", "target": "c", "layers": [[0, 0]]},
                                 {"source": "c", "target": "b", "layers": [[0, 0]]}]), "cycle")
    assert "edges: cycle b -> c -> b: a model cannot (indirectly) attend to itself" in msg
    assert "augment 'b' reaches the anchor 'base' through no edge" in msg


def test_self_loop():
    spec_error(spec(edges=[{"source": "kv", "target": "base", "layers": [[0, 0]]},
                           {"source": "kv", "target": "kv", "layers": [[0, 1]]}]),
               r"edges\[1\]: self-loop: 'kv' cannot attend to itself")


def test_anchor_listed_as_augment():
    spec_error(spec(augments=[{"name": "kv"}, {"name": "base"}]),
               r"augments\[1\]\.name: 'base' is the anchor; a model cannot be both anchor and augment")


def test_anchor_as_a_source_and_unknown_models():
    msg = spec_error(spec(edges=[{"source": "base", "target": "kv", "layers": [[0, 0]]},
                                 {"source": "kv", "target": "bsae", "layers": [[0, 0]]}]), "problems")
    assert "edges[1].target: unknown model 'bsae' (models: base, kv)" in msg


def test_shared_source_into_prompt_target_would_leak_the_future():
    spec_error(spec(augments=[{"name": "kv"}, {"name": "docs", "input": "prompt"}],
                    edges=[{"source": "kv", "target": "docs", "layers": [[0, 0]]},
                           {"source": "docs", "target": "base", "layers": [[0, 0]]}]),
               r"edges\[0\]: 'kv' reads the shared sequence and 'docs' a prompt")


def test_duplicate_layer_pairs():
    spec_error(spec(edges=[{"source": "kv", "target": "base", "layers": [[0, 1], [0, 1]]}]),
               r"edges\[0\]\.layers\[1\]: duplicate layer pair \[0, 1\] \(also at layers\[0\]\)")
    with pytest.raises(cg.LayerRefError, match=r"layer pair \(2, 1\) of 'kv' -> 'base' is also given by edges\[0\]"):
        cg.compile(spec(edges=[{"source": "kv", "target": "base", "layers": [[-1, 1]]},
                               {"source": "kv", "target": "base", "layers": [[2, 1]]}]), models())


def test_missing_extra_and_wrong_models():
    with pytest.raises(cg.ModelError, match=r"no model given for \['kv'\]: give each a `source:` in the spec or pass models="):
        cg.compile(spec(), {"base": models()["base"]})
    with pytest.raises(cg.ModelError, match=r"models \['kb'\] are not in the spec"):
        cg.compile(spec(), {**models(), "kb": models()["kv"]})
    with pytest.raises(cg.ModelError, match="model 'kv' is a str, not a torch.nn.Module"):
        cg.compile(spec(), models(kv="gpt2"))


def test_blocks_that_are_not_a_block_list():
    with pytest.raises(cg.LayerRefError, match=r"augments\[0\]\.blocks: 'head' is a Linear, not a non-empty nn.ModuleList"):
        cg.compile(spec(augments=[{"name": "kv", "blocks": "head"}]), models())
    with pytest.raises(cg.LayerRefError, match=r"has no submodule 'layer'; did you mean 'layers'\?"):
        cg.compile(spec(augments=[{"name": "kv", "blocks": "layer"}]), models())


def test_device_mismatch():
    with pytest.raises(cg.ModelError, match=r"all models must be on one device to be fused into one graph "
                                            r"\(base: cpu, kv: meta\); move them with .to\(device\) before compiling"):
        cg.compile(spec(), models(kv=mini("shared", 12, 3, 1).to("meta")))


def test_all_on_meta_compiles_without_weights():
    composed = cg.compile(spec(), {n: m.to("meta") for n, m in models().items()})
    assert all(p.device.type == "meta" for p in composed.parameters())


def test_dtype_mismatch_runs_in_the_anchors_dtype():
    """A float32 augment feeding a float64 anchor: the cross-attention is built in the anchor's dtype and
    casts the context, so the composition is exact at init and matches the reference."""
    ms = models(base=mini("shared", 8, 2, 0).double())
    composed = cg.compile(spec(), ms)
    assert {p.dtype for p in composed.new_parameters()} == {torch.float64}
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(composed(ids), ms["base"](ids))
        randomize_new_parameters(composed)
        torch.testing.assert_close(composed(ids), eager_reference(composed, ms, None, ids), atol=1e-10, rtol=0)


@pytest.fixture(scope="module")
def prompted():
    s = spec(augments=[{"name": "kv"}, {"name": "docs", "input": "prompt"}],
             edges=[{"source": "kv", "target": "base", "layers": [[0, 1]]},
                    {"source": "docs", "target": "base", "layers": [[-1, 0]]}])
    return cg.compile(s, models(docs=mini("prompt", 16, 2, 2)))


@pytest.mark.parametrize("call,match", [
    (lambda c, i, p: c(i.float(), p), r"input_ids must be a \(batch, seq\) tensor of int64 \(or int32\) token ids; got a \(2, 7\) torch.float32 tensor"),
    (lambda c, i, p: c(i[0], p), r"input_ids must be a \(batch, seq\) tensor of int64 \(or int32\) token ids; got a \(7,\) torch.int64 tensor"),
    (lambda c, i, p: c(i[None], p), r"got a \(1, 2, 7\) torch.int64 tensor"),
    (lambda c, i, p: c(i.tolist(), p), r"input_ids must be a \(batch, seq\) tensor of int64 \(or int32\) token ids; got list"),
    (lambda c, i, p: c(i, p.float()), r"docs_input_ids must be a \(batch, seq\) tensor of int64 \(or int32\) token ids"),
    (lambda c, i, p: c(i, p[:1]), r"a prompt holds 1 sequences but input_ids 2; pass one prompt per sequence"),
    (lambda c, i, p: c(i, p, torch.ones(2, 4)), r"docs_mask must be a real tensor of the shape of its input ids \(2, 5\); got a \(2, 4\) torch.float32 tensor"),
    (lambda c, i, p: c(i, p, "all"), r"docs_mask must be a real tensor of the shape of its input ids \(2, 5\); got str"),
])
def test_wrong_inputs_at_call_time(prompted, call, match):
    ids, prompt = torch.randint(0, VOCAB, (2, 7)), torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(cg.InputError, match=match):
        call(prompted, ids, prompt)


def test_spec_round_trips_through_yaml_and_json():
    s = cg.CompositionSpec.from_dict(spec(cross_attention={"heads": 2, "gate": "tanh"}))
    assert cg.CompositionSpec.from_yaml(s.to_yaml()) == s
    assert cg.CompositionSpec.from_json(json.dumps(json.loads(s.to_json()))) == s

"""The spec: parsing, round trips, and a clear located error for every bad spec."""
from __future__ import annotations


import pytest
import torch
from tests.support import gpt, xtransformers

import calmgraph as cg

GOOD = """\
anchor:
  name: base
  blocks: model.layers
augments:
- name: kv
  input: shared
  blocks: transformer.h
- name: docs
  input: prompt
edges:
- source: kv
  target: base
  layers:
    every: 4
  cross_attention:
    heads: 4
- source: docs
  target: base
  layers:
  - [3, 0]
  - [7, model.layers.5]
  - [-1, -1]
cross_attention:
  norm: layer
  gate: tanh
"""


def base_dict(**overrides):
    d = {"anchor": {"name": "base"}, "augments": [{"name": "kv"}],
         "edges": [{"source": "kv", "target": "base", "layers": {"every": 2}}]}
    d.update(overrides)
    return d


def test_yaml_and_json_round_trip_exactly(tmp_path):
    spec = cg.CompositionSpec.from_yaml(GOOD)
    assert spec.edges[1].layers == [(3, 0), (7, "model.layers.5"), (-1, -1)]
    assert spec.edges[0].layers == cg.Every(every=4)
    assert cg.CompositionSpec.from_yaml(spec.to_yaml()) == spec
    assert cg.CompositionSpec.from_json(spec.to_json()) == spec
    (tmp_path / "s.yaml").write_text(GOOD)
    (tmp_path / "s.json").write_text(spec.to_json())
    assert cg.load_spec(tmp_path / "s.yaml") == cg.load_spec(tmp_path / "s.json") == spec
    # what the user did not write is not written back
    assert "tap" not in spec.to_yaml() and spec.to_dict()["cross_attention"] == {"norm": "layer", "gate": "tanh"}


def test_per_edge_override_merges_with_defaults():
    spec = cg.CompositionSpec.from_yaml(GOOD)
    merged = spec.cross_attention_for(spec.edges[0])
    assert (merged.heads, merged.norm, merged.gate) == (4, "layer", "tanh")
    assert spec.cross_attention_for(spec.edges[1]).heads is None


def problems(data) -> list[str]:
    with pytest.raises(cg.SpecError) as info:
        cg.CompositionSpec.from_dict(data)
    assert isinstance(info.value, ValueError)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("data, expected", [
    (base_dict(extra=1), ["extra: unknown key"]),
    (base_dict(anchor={"name": "base", "blokcs": "x"}), ["anchor.blokcs: unknown key"]),
    (base_dict(anchor={}), ["anchor.name: required but missing"]),
    (base_dict(augments=[]), ["augments: List should have at least 1 item"]),
    (base_dict(augments=[{"name": "kv", "input": "both"}]), ["augments[0].input: Input should be 'shared' or 'prompt'"]),
    (base_dict(augments=[{"name": "k v"}]), ["augments[0].name: String should match pattern"]),
    (base_dict(edges=[{"source": "kv", "target": "base", "layers": {"every": 0}}]), ["edges[0].layers.every: Input should be greater than 0"]),
    (base_dict(edges=[{"source": "kv", "target": "base", "layers": []}]), ["edges[0].layers: List should have at least 1 item"]),
    (base_dict(edges=[{"source": "kv", "target": "base", "layers": [[1, 2, 3]]}]), ["edges[0].layers[0]: Tuple should have at most 2 items"]),
    (base_dict(edges=[{"source": "kv", "target": "base", "layers": [[1.5, 2]]}]),
     ["edges[0].layers[0][0]: a layer is a block index (an int, negative counts from the end) or a block's qualified name"]),
    (base_dict(cross_attention={"heads": -1}), ["cross_attention.heads: Input should be greater than 0"]),
    (base_dict(cross_attention={"norm": "batch"}), ["cross_attention.norm: Input should be 'rms', 'layer' or 'none'"]),
])
def test_bad_fields_are_located(data, expected):
    found = problems(data)
    for e in expected:
        assert any(p.startswith(e) for p in found), (e, found)


def test_every_field_problem_is_reported_at_once():
    found = problems(base_dict(anchor={"name": "base", "tap": "middle"}, augments=[{"name": "kv", "input": "x"}],
                               edges=[{"source": "kv", "target": "base", "layers": {"every": -2}}]))
    assert [p.split(":")[0] for p in found] == ["anchor.tap", "augments[0].input", "edges[0].layers.every"]


@pytest.mark.parametrize("data, expected", [
    (base_dict(edges=[{"source": "kb", "target": "base", "layers": {"every": 2}}]),
     ["edges[0].source: unknown model 'kb' (models: base, kv)"]),
    (base_dict(edges=[{"source": "kv", "target": "kv", "layers": {"every": 2}}]),
     ["edges[0]: self-loop: 'kv' cannot attend to itself"]),
    (base_dict(augments=[{"name": "base"}]), ["augments[0].name: 'base' is the anchor"]),
    (base_dict(augments=[{"name": "kv"}, {"name": "kv"}]), ["augments[1].name: duplicate model name 'kv' (also at augments[0].name)"]),
    (base_dict(edges=[{"source": "base", "target": "kv", "layers": {"every": 2}},
                      {"source": "kv", "target": "base", "layers": {"every": 2}}]),
     ["edges[0].source: the anchor 'base' is what the composition computes"]),
    (base_dict(augments=[{"name": "kv"}, {"name": "a"}, {"name": "b"}],
               edges=[{"source": "a", "target": "b", "layers": {"every": 1}}, {"source": "b", "target": "a", "layers": {"every": 1}},
                      {"source": "kv", "target": "base", "layers": {"every": 1}}]),
     ["edges: cycle a -> b -> a", "augments[1]: augment 'a' reaches the anchor", "augments[2]: augment 'b' reaches"]),
    (base_dict(augments=[{"name": "kv"}, {"name": "docs", "input": "prompt"}],
               edges=[{"source": "kv", "target": "docs", "layers": {"every": 1}}, {"source": "docs", "target": "base", "layers": {"every": 1}}]),
     ["edges[0]: 'kv' reads the shared sequence and 'docs' a prompt"]),
    (base_dict(edges=[{"source": "kv", "target": "base", "layers": [[1, 2], [0, 0], [1, 2]]}]),
     ["edges[0].layers[2]: duplicate layer pair [1, 2] (also at layers[0])"]),
])
def test_bad_graphs_are_located(data, expected):
    found = problems(data)
    for e in expected:
        assert any(p.startswith(e) for p in found), (e, found)


def test_malformed_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("anchor: [name: base\n")
    (tmp_path / "bad.json").write_text("{\"anchor\": }")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(cg.SpecError, match="not valid YAML"):
        cg.load_spec(tmp_path / "bad.yaml")
    with pytest.raises(cg.SpecError, match="not valid JSON"):
        cg.load_spec(tmp_path / "bad.json")
    with pytest.raises(cg.SpecError, match="a spec is a mapping with keys anchor, augments, edges; got list"):
        cg.load_spec(tmp_path / "list.yaml")
    with pytest.raises(cg.SpecError, match="no spec file at"):
        cg.load_spec(tmp_path / "missing.yaml")


def test_direct_construction_raises_calmgraph_errors():
    with pytest.raises(cg.SpecError, match="edges: required but missing"):
        cg.CompositionSpec(anchor={"name": "base"}, augments=[{"name": "kv"}])
    with pytest.raises(cg.SpecError, match=r"edges\[0\].layers.every: Input should be greater than 0"):
        cg.CompositionSpec(anchor={"name": "base"}, augments=[{"name": "kv"}],
                           edges=[cg.EdgeSpec(source="kv", target="base", layers=cg.Every(every=1)).model_dump() | {"layers": {"every": 0}}])


# -- problems that need the models: raised by compile, before anything is built -----------------------
def models():
    torch.manual_seed(0)
    return {"base": gpt(dim=32, depth=4).eval(), "kv": xtransformers(dim=32, depth=2).eval()}


def compile_problems(edges, **spec_kw) -> list[str]:
    spec = cg.CompositionSpec.from_dict(base_dict(edges=edges, **spec_kw))
    with pytest.raises(cg.LayerRefError) as info:
        cg.compile(spec, models=models())
    assert isinstance(info.value, ValueError)
    return [str(p) for p in info.value.problems]


def test_layer_refs_checked_against_models_all_at_once():
    found = compile_problems([{"source": "kv", "target": "base", "layers": [[2, 0], [0, "blocks.7"], [0, "blocks1"], [-3, 1]]}])
    assert found == [
        "edges[0].layers[0][0]: layer 2 is out of range for 'kv', which has 2 blocks (0..1, or -2..-1 from the end)",
        "edges[0].layers[1][1]: 'blocks.7' is not a block of 'base'; did you mean 'blocks.3'? tap points: 4 blocks: "
        "blocks.0, blocks.1, blocks.2, blocks.3",
        "edges[0].layers[2][1]: 'blocks1' is not a block of 'base'; did you mean 'blocks.1'? tap points: 4 blocks: "
        "blocks.0, blocks.1, blocks.2, blocks.3",
        "edges[0].layers[3][0]: layer -3 is out of range for 'kv', which has 2 blocks (0..1, or -2..-1 from the end)",
    ]


def test_layer_refs_resolving_to_the_same_pair():
    found = compile_problems([{"source": "kv", "target": "base", "layers": [[1, 3], [-1, "blocks.3"]]}])
    assert found == ["edges[0].layers: layer pair (1, 3) of 'kv' -> 'base' is also given by edges[0]"]


def test_every_larger_than_depth_and_unprojected_dims():
    found = compile_problems([{"source": "kv", "target": "base", "layers": {"every": 3},
                               "cross_attention": {"project_context": False}}])
    assert "edges[0].layers.every: 3 exceeds the depth of 'kv' (2 blocks)" in found


def test_rotary_positions_and_windows_need_aligned_tokens():
    found = compile_problems([{"source": "kv", "target": "base", "layers": {"every": 2},
                               "cross_attention": {"positions": "rotary", "dim_head": 7}}],
                             augments=[{"name": "kv", "input": "prompt"}], cross_attention={"window": 2})
    assert found == [
        "edges[0].cross_attention.positions: positions needs the source to read the anchor's tokens, but "
        "'kv' has input: prompt (its positions are not the anchor's); use positions: none for this edge",
        "cross_attention.window: window needs the source to read the anchor's tokens, but 'kv' has input: prompt "
        "(its positions are not the anchor's); use window: null for this edge",
        "edges[0].cross_attention.positions: rotary positions turn channel pairs, but dim_head is 7 (odd); set "
        "cross_attention.dim_head to an even number"]


def test_blocks_path_errors():
    spec = cg.CompositionSpec.from_dict(base_dict(anchor={"name": "base", "blocks": "blokcs"},
                                                  augments=[{"name": "kv", "blocks": "wte"}]))
    with pytest.raises(cg.LayerRefError) as info:
        cg.compile(spec, models=models())
    found = [str(p) for p in info.value.problems]
    assert found[0].startswith("anchor.blocks: GPT has no submodule 'blokcs'; did you mean 'blocks'?")
    assert found[1].startswith("augments[0].blocks: TransformerWrapper has no submodule 'wte'")


def test_model_problems():
    spec = cg.CompositionSpec.from_dict(base_dict())
    with pytest.raises(cg.ModelError, match=r"no model given for \['kv'\]"):
        cg.compile(spec, models={"base": gpt()})
    with pytest.raises(cg.ModelError, match=r"models \['extra'\] are not in the spec"):
        cg.compile(spec, models={**models(), "extra": gpt()})
    with pytest.raises(cg.ModelError, match="model 'kv' is a str, not a torch.nn.Module"):
        cg.compile(spec, models={"base": gpt(), "kv": "gpt2"})
    with torch.device("meta"):
        on_meta = gpt()
    with pytest.raises(cg.ModelError, match="all models must be on one device"):
        cg.compile(spec, models={"base": gpt(), "kv": on_meta})


def test_untraceable_model_raises_trace_error():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
            self.emb = torch.nn.Embedding(10, 8)

        def forward(self, ids):
            x = self.emb(ids)
            if x.sum() > 0:  # data-dependent control flow: neither front end can follow it
                x = x * 2
            for layer in self.layers:
                x = layer(x)
            return x

    spec = cg.CompositionSpec.from_dict(base_dict())
    with pytest.raises(cg.TraceError) as info:
        cg.compile(spec, models={"base": gpt(), "kv": Branchy()})
    message = str(info.value)
    assert "could not trace model 'kv' (Branchy)" in message
    assert "- fx:" in message and "- export:" in message and "hint:" in message


def test_call_time_input_errors():
    spec = cg.CompositionSpec.from_dict(base_dict())
    composed = cg.compile(spec, models=models())
    with pytest.raises(cg.InputError, match=r"input_ids must be a \(batch, seq\) tensor of int64 \(or int32\) token ids; got a \(2, 3, 4\) torch.float32 tensor"):
        composed(torch.randn(2, 3, 4))
    with pytest.raises(cg.InputError, match="input_ids must be .* got a \\(5,\\) torch.int64 tensor"):
        composed(torch.zeros(5, dtype=torch.long))

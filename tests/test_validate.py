"""`calmgraph validate` reports the problems of every stage in one run: the spec's shape, its composition
graph and its layer references, located in the file as written."""
import textwrap

import pytest

import calmgraph as cg
from calmgraph.errors import LayerRefError
from calmgraph.sources import load_models
from calmgraph.validate import check

LM = 'source: {python: "calmgraph.demo.models:TinyLM", kwargs: {vocab: 64, dim: %d, depth: %d, heads: 2}, seed: 0}'
ENCODER = 'source: {python: "calmgraph.demo.models:TinyEncoder", kwargs: {vocab: 64, dim: 16, depth: 2, heads: 2}}'

# four mistakes of three stages: two of shape, one model name, two layer references
FOUR = f"""
anchor: {{name: base, {LM % (32, 4)}}}
augments:
  - {{name: helper, {LM % (24, 3)}}}
  - {{name: notes, input: prompt, {ENCODER}}}
edges:
  - {{source: helper, target: base, layers: [[1, 2], [7, 3]], cross_attention: {{heeds: 2}}}}
  - {{source: noets, target: base, layers: [[-1, 3]]}}
  - {{source: notes, target: base, layers: [[0, layers.9]]}}
cross_attention: {{norm: rmss}}
"""


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_every_stage_in_one_run(tmp_path):
    problems, spec, _ = check(write(tmp_path, FOUR))
    assert spec is None
    assert [p.loc for p in problems] == ["edges[0].cross_attention.heeds", "cross_attention.norm", "edges[1].source",
                                         "edges[0].layers[1][0]", "edges[2].layers[0][1]"]
    assert "unknown model 'noets'" in problems[2].msg


def test_the_layer_problems_are_those_compile_finds_once_the_rest_is_fixed(tmp_path):
    problems, _, _ = check(write(tmp_path, FOUR))
    fixed = FOUR.replace(", cross_attention: {heeds: 2}", "").replace("noets", "notes").replace("rmss", "rms")
    path = write(tmp_path, fixed)
    spec = cg.load_spec(path)  # shape and graph now valid: only the layers are wrong
    with pytest.raises(LayerRefError) as e:
        cg.compile(spec, models=load_models(spec, base_dir=tmp_path))
    assert problems[3:] == e.value.problems
    assert check(path)[0] == e.value.problems


def test_an_edge_left_out_does_not_make_its_augment_unreached(tmp_path):
    problems, _, _ = check(write(tmp_path, f"""
        anchor: {{name: base, {LM % (32, 4)}}}
        augments: [{{name: helper, {LM % (24, 3)}}}, {{name: other, {LM % (24, 3)}}}]
        edges: [{{source: helper, target: base, layers: [[0]]}}, {{source: other, target: base, layers: [[5, 0]]}}]
    """))
    # not also "helper reaches the anchor through no edge"; the edge after it keeps its index
    assert [p.loc for p in problems] == ["edges[0].layers[0][1]", "edges[1].layers[0][0]"]


def test_a_wrong_input_says_nothing_more_about_that_model(tmp_path):
    problems, _, _ = check(write(tmp_path, f"""
        anchor: {{name: base, {LM % (32, 4)}}}
        augments: [{{name: pics, input: promt, prompt_input: pixel_values}}]
        edges: [{{source: pics, target: base, layers: [[0, 0]]}}, {{source: base, target: pics, layers: [[0, 0]]}}]
    """))
    assert [p.loc for p in problems] == ["augments[0].input", "edges[1].source"]  # the anchor feeding a model
    assert "is what the composition computes" in problems[1].msg


def test_a_spec_too_broken_to_go_on_stops_at_its_shape(tmp_path):
    problems, _, _ = check(write(tmp_path, """
        anchor: {name: 1base}
        augments: [{name: helper}]
        edges: [{source: nobody, target: base, layers: {every: 0}}]
    """))
    assert [p.loc for p in problems] == ["anchor.name", "edges[0].layers.every"]


@pytest.mark.parametrize("text, message", [(None, "no spec file"), ("anchor: [", "not valid YAML"),
                                           ("- a list", "a spec is a mapping")])
def test_an_unreadable_file_is_one_problem(tmp_path, text, message):
    path = tmp_path / "spec.yaml" if text is None else write(tmp_path, text)
    problems, _, _ = check(path)
    assert len(problems) == 1 and message in problems[0].msg


def test_a_valid_spec_has_no_problems_and_counts_its_pairs(tmp_path):
    path = write(tmp_path, FOUR.replace(", cross_attention: {heeds: 2}", "").replace("noets", "notes")
                 .replace("rmss", "rms").replace("[7, 3]", "[2, 3]").replace("layers.9", "layers.1"))
    problems, spec, pairs = check(path)
    assert problems == [] and pairs == 4 and [m.name for m in spec.models] == ["base", "helper", "notes"]
    assert check(path, models=False) == ([], spec, None)

"""Blocks not held in one ModuleList: `blocks:` as a list of qualified names, or a callable model -> modules."""
import pytest
import torch
import torch.nn as nn

import calmgraph as cg
from calmgraph.demo.models import Layer, TinyLM
from calmgraph.errors import LayerRefError
from tests.reference import eager_reference
from tests.support import randomize_new_parameters

NAMES = ["first.0", "first.1", "middle", "second.0", "second.1"]


class Hybrid(nn.Module):
    """A model whose blocks lie in two lists and one attribute between them (no single ModuleList)."""

    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.first = nn.ModuleList(Layer(dim, 2, causal=True) for _ in range(2))
        self.middle = Layer(dim, 2, causal=True)
        self.second = nn.ModuleList(Layer(dim, 2, causal=True) for _ in range(2))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids):
        x = self.tok(input_ids)
        for layer in [*self.first, self.middle, *self.second]:
            x = layer(x)
        return self.head(x)


def spec(blocks):
    return cg.CompositionSpec(anchor={"name": "base", "blocks": blocks}, augments=[{"name": "kv"}],
                              edges=[{"source": "kv", "target": "base", "layers": [[0, "middle"], [-1, -1]]}])


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"base": Hybrid().eval(), "kv": TinyLM(vocab=64, dim=24, depth=3, heads=2).eval()}


@pytest.mark.parametrize("blocks", [NAMES, lambda m: [*m.first, m.middle, *m.second]], ids=["names", "callable"])
def test_blocks_named_one_by_one_compose_like_the_eager_reference(models, blocks):
    composed = cg.compile(spec(blocks), models=models)
    assert [t.name for t in composed.taps["base"]] == NAMES
    assert [(link.source_layer, link.target_layer) for link in composed.links] == [(0, 2), (2, 4)]
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(composed(ids), models["base"](ids))  # identity at initialisation
    randomize_new_parameters(composed)
    modules = {"base": [models["base"].get_submodule(n) for n in NAMES], "kv": list(models["kv"].layers)}
    torch.testing.assert_close(composed(ids), eager_reference(composed, models, modules, ids))


def test_a_saved_composition_records_a_callables_blocks_by_name_and_loads_again(models, tmp_path):
    composed = cg.compile(spec(lambda m: [*m.first, m.middle, *m.second]), models=models)
    randomize_new_parameters(composed)
    composed.save_new(tmp_path)
    loaded = cg.load(tmp_path, models=models)
    assert loaded.spec.anchor.blocks == tuple(NAMES)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(ids), composed(ids))


def test_a_list_of_blocks_round_trips_through_yaml():
    written = spec(NAMES).to_yaml()
    assert cg.CompositionSpec.from_yaml(written).anchor.blocks == tuple(NAMES)


def test_tap_points_take_a_list_of_names(models):
    taps = cg.tap_points(models["base"], NAMES[::2])
    assert [(t.index, t.name, t.dim) for t in taps] == [(0, "first.0", 32), (1, "middle", 32), (2, "second.1", 32)]


@pytest.mark.parametrize("blocks, message", [
    (["first.0", "midle"], "Hybrid has no submodule 'midle'; did you mean 'middle'"),
    (["first", "first.1"], "block 'first.1' lies inside block 'first'; blocks cannot nest"),
    (["middle", "middle"], "blocks named more than once: middle"),
    (lambda m: [nn.Linear(2, 2)], "returned modules that are not submodules of Hybrid (Linear)"),
    (lambda m: m.nothing, "raised AttributeError"),
    (lambda m: "middle", "it must return a list of the model's modules"),
])
def test_a_wrong_block_list_is_a_located_error(models, blocks, message):
    with pytest.raises(LayerRefError) as e:
        cg.compile(spec(blocks), models=models)
    assert e.value.problems[0].loc == "anchor.blocks" and message in e.value.problems[0].msg


def test_the_spec_refuses_what_is_no_block_list():
    with pytest.raises(cg.SpecError, match=r"anchor.blocks: blocks is the qualified name .* \(got \[\]\)"):
        spec([])
    with pytest.raises(cg.SpecError, match=r"\(got \[1, 2\]\)"):
        spec([1, 2])

"""Each compile pass alone, on toy models whose graphs can be counted by hand (as torch.fx's own tests
do): node kinds and counts before and after, the contract's fields, and `graph.lint()`."""
from __future__ import annotations

import operator
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import calmgraph as cg
from calmgraph.errors import InternalError
from calmgraph.passes.base import CompileState
from calmgraph.passes.gather import Gather
from calmgraph.passes.merge import Merge
from calmgraph.passes.outline import Outline
from calmgraph.passes.prune import Prune
from calmgraph.passes.resolve import Resolve
from calmgraph.passes.schedule import Schedule, schedule
from calmgraph.passes.splice import Splice
from calmgraph.passes.trace import Trace
from calmgraph.passes.verify import Verify, verify
from calmgraph.plan import LINK_KEY, MODEL_KEY
from tests.reference import eager_reference, randomize_new_parameters
from tests.support import VOCAB, llama


class Toy(nn.Module):
    """Embedding -> 3 linear blocks -> head: one call_module node per block in the fx front end."""

    def __init__(self, dim: int, vocab: int = 11):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class InPlaceToy(Toy):
    """An in-place write with no data edge to the read it affects (the fx front end keeps both as they are)."""

    def forward(self, input_ids):
        h = self.emb(input_ids)
        scale = h.new_ones(1)
        for block in self.blocks:
            h = block(h) * scale
            scale.mul_(2.0)
        return self.head(h)


def state_for(layers, prune: bool = True) -> CompileState:
    spec = cg.CompositionSpec.from_dict({"anchor": {"name": "a"}, "augments": [{"name": "b"}],
                                         "edges": [{"source": "b", "target": "a", "layers": layers}]})
    torch.manual_seed(0)
    return CompileState(spec, {"a": Toy(8), "b": Toy(6)}, prune=prune)


def run(state: CompileState, *passes) -> CompileState:
    for p in passes:
        state = p(state).state
    return state


def kinds(graph: fx.Graph, model: str | None = None) -> Counter:
    return Counter(n.op for n in graph.nodes if model is None or n.meta.get(MODEL_KEY) == model)


def test_gather_and_trace_find_one_tap_per_block():
    state = run(state_for([[0, 0]]), Gather(), Trace())
    for name, dim in (("a", 8), ("b", 6)):
        traced = state.traced[name]
        assert [b.name for b in traced.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
        assert [t.target for t in traced.taps] == ["blocks.0", "blocks.1", "blocks.2"]   # the block calls
        assert traced.dim == dim and traced.frontend == "fx"
        assert kinds(traced.graph) == Counter({"call_module": 5, "placeholder": 1, "output": 1})


def test_merge_namespaces_every_model():
    state = run(state_for([[0, 0]]), Gather(), Trace(), Resolve(), Merge())
    graph = state.merged.graph
    graph.lint()
    assert state.order == ["b", "a"] and state.signature.names == ["input_ids"]
    for name in ("a", "b"):   # each model's 5 module calls, under its name, tagged with it
        assert kinds(graph, name) == Counter({"call_module": 5})
        assert {n.target.split(".")[0] for n in graph.nodes if n.meta.get(MODEL_KEY) == name} == {name}
    # one input, its check, and the anchor's logits as the output
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == ["input_ids"]
    assert graph.output_node().args[0] is state.merged.outputs["a"]


def test_splice_adds_a_block_and_a_sum_per_link():
    state = run(state_for([[0, 1], [2, 1]]), Gather(), Trace(), Resolve(), Merge())
    tap = state.merged.taps["a"][1]
    before = kinds(state.merged.graph)
    state = run(state, Splice())
    graph = state.module.graph
    added = kinds(graph) - before
    assert added == Counter({"call_module": 2, "call_function": 2})
    spliced = [n for n in graph.nodes if LINK_KEY in n.meta]
    assert Counter(n.op for n in spliced) == Counter({"call_module": 2, "call_function": 2})
    # both links read the tap's original value; everything after the tap reads the sum of both deltas
    blocks = [n for n in spliced if n.op == "call_module"]
    assert all(n.args[0] is tap for n in blocks)
    total = state.merged.taps["a"][1]
    first_sum = next(n for n in spliced if n.op == "call_function")
    assert total.target is operator.add and set(tap.users) == {*blocks, first_sum} and first_sum.args[0] is tap
    next_block = next(n for n in graph.nodes if n.target == "a.blocks.2")
    assert next_block.args[0] is total
    assert {n.target for n in blocks} == {"xattn.b_to_a.l0_to_l1", "xattn.b_to_a.l2_to_l1"}


def test_prune_removes_what_no_edge_reads_and_keeps_live_links():
    state = run(state_for([[0, 0]]), Gather(), Trace(), Resolve(), Merge(), Splice())
    before = kinds(state.module.graph, "b")
    state = run(state, Prune())
    after = kinds(state.module.graph, "b")
    # b's blocks 1 and 2 and its head feed nothing the anchor reads: 3 module calls fewer
    assert before - after == Counter({"call_module": 3})
    assert state.pruned.blocks_kept == {"b": 1} and state.pruned.head_removed == {"b": True}
    assert [(l.source_layer, l.target_layer) for l in state.links] == [(0, 0)]
    assert not any(name.startswith("b.head") for name, _ in state.module.named_parameters())


def test_prune_keeps_an_in_place_write_a_later_node_reads():
    """fx's dead-code elimination calls no method impure: `scale.mul_(2)` has no users, yet the next block's
    product reads what it wrote. The fused graph must compute what the augment computes alone."""
    spec = cg.CompositionSpec.from_dict({"anchor": {"name": "a"}, "augments": [{"name": "b"}],
                                         "edges": [{"source": "b", "target": "a", "layers": [[1, 0]]}]})
    torch.manual_seed(0)
    models = {"a": Toy(8), "b": InPlaceToy(6)}
    composed = cg.compile(spec, models=models)
    randomize_new_parameters(composed)
    ids = torch.randint(0, 11, (2, 5))
    blocks = {name: list(m.blocks) for name, m in models.items()}
    with torch.no_grad():
        torch.testing.assert_close(composed(ids), eager_reference(composed, models, blocks, ids))
    targets = {n.target for n in composed.graph.nodes}
    assert "mul_" in targets and not targets & {"b.blocks.2", "b.head"}   # the writes kept, dead blocks still gone


def test_prune_off_keeps_everything():
    state = run(state_for([[0, 0]], prune=False), Gather(), Trace(), Resolve(), Merge(), Splice(), Prune())
    assert kinds(state.module.graph, "b") == Counter({"call_module": 5})
    assert state.pruned.nodes_removed == 0


def test_verify_accepts_the_fused_graph_and_refuses_a_wrong_output():
    state = run(state_for([[0, 0]]), Gather(), Trace(), Resolve(), Merge(), Splice(), Prune(), Outline(), Verify())
    assert state.verified and [r["pass"] for r in state.log] == ["gather", "trace", "resolve", "merge", "splice",
                                                                 "prune", "outline", "verify"]
    with pytest.raises(InternalError, match="returns shape"):   # the anchor's logits have 11 entries, not 3
        verify(state.module, state.signature, torch.device("cpu"), torch.Size([2, 7, 3]))


def llama_composition() -> cg.ComposedModel:
    torch.manual_seed(0)
    spec = {"anchor": {"name": "a"}, "augments": [{"name": "b"}],
            "edges": [{"source": "b", "target": "a", "layers": [[1, 1], [3, 3]]}]}
    return cg.compile(spec, models={"a": llama(48, 4), "b": llama(32, 4)})


def test_verify_runs_each_distinct_block_once_and_gives_every_copy_its_shapes():
    composed = llama_composition()
    blocks = [m for m in composed.modules() if isinstance(m, fx.GraphModule) and m is not composed]
    calls = Counter()
    hooks = [b.register_forward_pre_hook(lambda m, args, i=i: calls.update([i])) for i, b in enumerate(blocks)]
    try:
        verify(composed, composed.signature, torch.device("cpu"), torch.Size([2, 7, VOCAB]))
    finally:
        for h in hooks:
            h.remove()
    assert len(blocks) == 8 and sum(calls.values()) == 2        # one Llama block of each model's 4
    shortcut = {n.name: n.meta["val"] for n in composed.graph.nodes if n.op == "call_module"}
    # the reference: every block run (FakeTensorProp as torch.fx has it)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(composed, mode).propagate(*composed.signature.examples(3, 10, torch.device("cpu")))
    full = {n.name: n.meta["val"] for n in composed.graph.nodes if n.op == "call_module"}
    flat = lambda v: [(tuple(t.shape), t.stride(), t.dtype) for t in (v if isinstance(v, tuple) else (v,))]  # noqa: E731
    assert shortcut.keys() == full.keys() and all(flat(shortcut[k]) == flat(full[k]) for k in full)


def test_verify_runs_a_block_that_differs_from_its_neighbours():
    composed = llama_composition()
    wrong = composed.get_submodule("a.model.layers.2.mlp.down_proj")   # 96 -> 48 becomes 96 -> 47
    wrong.weight = nn.Parameter(torch.zeros(47, 96), requires_grad=False)
    with pytest.raises(InternalError, match="shape check"):
        verify(composed, composed.signature, torch.device("cpu"), torch.Size([2, 7, VOCAB]))


def test_compiled_graph_equals_the_pipeline_state():
    state = run(state_for([[0, 0]]), Gather(), Trace(), Resolve(), Merge(), Splice(), Prune(), Outline(), Schedule(),
                Verify())
    composed = cg.compile(state.spec, models=state.models)
    assert composed.code == state.module.code
    assert composed.links == state.links and composed.signature == state.signature
    ids = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        assert torch.equal(composed(ids), state.models["a"](ids))   # identity at initialisation


def calls(graph: fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op == "call_module"]


def test_schedule_runs_each_augment_just_before_the_link_reading_it():
    state = run(state_for([[0, 1], [2, 2]]), Gather(), Trace(), Resolve(), Merge(), Splice(), Prune())
    assert calls(state.module.graph) == ["b.emb", "b.blocks.0", "b.blocks.1", "b.blocks.2", "a.emb", "a.blocks.0",
                                         "a.blocks.1", "xattn.b_to_a.l0_to_l1", "a.blocks.2", "xattn.b_to_a.l2_to_l2",
                                         "a.head"]
    ids = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        before = state.module(ids)
    state = run(state, Schedule())
    assert state.scheduled and state.log[-1]["modified"]
    assert calls(state.module.graph) == ["a.emb", "a.blocks.0", "a.blocks.1", "b.emb", "b.blocks.0",
                                         "xattn.b_to_a.l0_to_l1", "a.blocks.2", "b.blocks.1", "b.blocks.2",
                                         "xattn.b_to_a.l2_to_l2", "a.head"]
    with torch.no_grad():
        assert torch.equal(state.module(ids), before)


def test_schedule_keeps_each_models_order_across_a_chain_and_two_augments():
    """b -> c -> a and d -> a: every node still after its inputs (lint), each model's nodes in their own order
    (in-place writes stay before the reads they affect), the same outputs."""
    spec = cg.CompositionSpec.from_dict({
        "anchor": {"name": "a"}, "augments": [{"name": "b"}, {"name": "c"}, {"name": "d"}],
        "edges": [{"source": "b", "target": "c", "layers": [[1, 0]]}, {"source": "c", "target": "a", "layers": [[2, 1]]},
                  {"source": "d", "target": "a", "layers": [[0, 0], [1, 2]]}]})
    torch.manual_seed(0)
    models = {"a": Toy(8), "b": InPlaceToy(6), "c": Toy(4), "d": Toy(6)}
    state = run(CompileState(spec, models), Gather(), Trace(), Resolve(), Merge(), Splice(), Prune(), Outline())
    graph = state.module.graph
    before = list(graph.nodes)
    ids = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        for p in state.module.parameters():
            p.normal_()                                  # the blocks change the anchor: the outputs tell
        expected = state.module(ids)
        moved = schedule(graph, {"b", "c", "d"})
        graph.lint()
        state.module.recompile()
        assert moved > 0 and sorted(graph.nodes, key=id) == sorted(before, key=id)
        after = list(graph.nodes)
        for model in "abcd":
            mine = [n for n in before if n.meta.get(MODEL_KEY) == model]
            assert [n for n in after if n.meta.get(MODEL_KEY) == model] == mine
        assert [n for n in after if n.op == "placeholder"] == [n for n in before if n.op == "placeholder"]
        order = calls(graph)
        assert order.index("a.blocks.0") < order.index("b.blocks.0") < order.index("c.blocks.1")
        assert order.index("d.blocks.1") > order.index("a.blocks.1")
        assert torch.equal(state.module(ids), expected)
        assert any(n.target == "mul_" for n in after)


class LoopPositions(nn.Module):
    """Position vectors gathered in a Python loop over the sequence: the fx tracer cannot iterate a Proxy's
    size, and torch.export specialises the graph to the example's length."""

    def __init__(self, dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(32, dim))

    def forward(self, h):
        return h + torch.stack([self.pos[i] for i in range(h.shape[1])])


class ToyWithLoop(Toy):
    def __init__(self, dim: int):
        super().__init__(dim)
        self.positions = LoopPositions(dim)

    def forward(self, input_ids):
        h = self.positions(self.emb(input_ids))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@pytest.mark.parametrize("leaf", [LoopPositions, "LoopPositions", "positions"])
def test_leaf_modules_hook_keeps_a_module_whole(leaf):
    spec = {"anchor": {"name": "a"}, "augments": [{"name": "b"}], "edges": [{"source": "b", "target": "a", "layers": [[0, 1]]}]}
    torch.manual_seed(0)
    models = {"a": ToyWithLoop(8), "b": Toy(6)}
    with pytest.raises(cg.TraceError, match="leaf_modules"):
        cg.compile(spec, models)
    composed = cg.compile(spec, models, leaf_modules=[leaf])
    assert any(n.op == "call_module" and n.target == "a.positions" for n in composed.graph.nodes)
    ids = torch.randint(0, 11, (3, 9))   # another length than the one traced
    with torch.no_grad():
        assert torch.equal(composed(ids), models["a"](ids))

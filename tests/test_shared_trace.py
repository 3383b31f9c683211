"""Identical blocks share one torch.export trace (calmgraph/tracing/shared.py). The reference is the full
trace (sharing turned off): the graphs must be the same node for node (ops, constants, weights read, module
stacks, shapes), the composed logits bit for bit; blocks that differ must be traced in full."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import calmgraph as cg
import calmgraph.tracing.frontends as frontends
from calmgraph.blocks import find_blocks
from calmgraph.parallel import block_paths
from calmgraph.passes.trace import trace_model
from calmgraph.tracing import shared
from families import VOCAB, Unbuildable, family_models, family_spec, small_model
from reference import randomize_new_parameters

DEPTH = 5
SHARED = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "phi", "opt", "gemma", "qwen3", "olmo2")
# gemma2, cohere2: sliding-window and full attention layers alternate, so their blocks are not alike;
# falcon: before transformers 5.25 each block's forward made a tensor constant, lifted by torch.export under
# that block's name (traced in full); from 5.25 its blocks trace alike
NOT_SHARED = ("gemma2", "cohere2", "falcon")
EITHER = ("falcon",)  # shares or not by the transformers version: only the graph is checked


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def sharing(monkeypatch):
    """Records, per trace, whether its blocks shared one."""
    taken = []

    def spy(entry, blocks, trace):
        gm = shared.trace_shared(entry, blocks, trace)
        if shared.ENABLED:
            taken.append(gm is not None)
        return gm
    monkeypatch.setattr(frontends, "trace_shared", spy)
    return taken


def traced(model, on: bool, monkeypatch):
    monkeypatch.setattr(shared, "ENABLED", on)
    return trace_model("m", model, find_blocks(model))


def canonical(graph: fx.Graph) -> list:
    """The graph as data: computed nodes in order, each with its op, target, arguments (nodes by their
    position, weights by name), module stack and shape; the weights read, as a set (their order of reads
    at the top of the graph is free)."""
    computed = [n for n in graph.nodes if n.op != "get_attr"]
    at = {n: i for i, n in enumerate(computed)}

    def arg(a):
        if isinstance(a, fx.Node):
            return ("weight", a.target) if a.op == "get_attr" else ("node", at[a])
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        if isinstance(a, dict):
            return {k: arg(v) for k, v in a.items()}
        return a

    def shape(n):
        val = n.meta.get("val")
        return (str(tuple(val.shape)), val.dtype) if isinstance(val, torch.Tensor) else str(val)

    nodes = [(n.op, str(n.target), arg(n.args), arg(n.kwargs), shape(n),
              sorted((n.meta.get("nn_module_stack") or {}).values())) for n in computed]
    return [nodes, sorted(n.target for n in graph.nodes if n.op == "get_attr")]


def compose(family, on: bool, ids, monkeypatch):
    monkeypatch.setattr(shared, "ENABLED", on)
    model = small_model(family, num_hidden_layers=DEPTH)
    models = family_models(model, "anchor")
    composed = cg.compile(family_spec(), models)
    randomize_new_parameters(composed)
    with torch.no_grad():
        return composed(ids), composed


@pytest.mark.parametrize("family", SHARED + NOT_SHARED)
def test_shared_trace_is_the_full_trace(family, ids, sharing, monkeypatch):
    try:
        model = small_model(family, num_hidden_layers=DEPTH)
    except Unbuildable as e:
        pytest.skip(f"{family}: {e}")
    full = traced(model, False, monkeypatch)
    one = traced(model, True, monkeypatch)
    assert sharing[-1] == (family in SHARED) or family in EITHER
    assert canonical(one.graph) == canonical(full.graph)
    assert len(one.taps) == len(full.taps) == DEPTH
    assert one.runs == full.runs == [1] * DEPTH

    out_full, _ = compose(family, False, ids, monkeypatch)
    out_one, composed = compose(family, True, ids, monkeypatch)
    assert torch.equal(out_one, out_full)
    # every anchor block is one submodule call (outline found the copies' blocks)
    assert [p for p in block_paths(composed) if p.startswith("base.")] == [f"base.{b.name}" for b in one.blocks]


def test_a_block_that_differs_is_traced_in_full(sharing, monkeypatch):
    """GPT-2 can scale attention by 1 / (layer index + 1): block 1's graph differs from block 0's (its
    constant), so the trace must not copy block 1's for the others."""
    model = small_model("gpt2", num_hidden_layers=DEPTH, scale_attn_by_inverse_layer_idx=True)
    full = traced(model, False, monkeypatch)
    one = traced(model, True, monkeypatch)
    assert sharing == [False]
    assert canonical(one.graph) == canonical(full.graph)


def test_a_later_block_with_other_attributes_is_traced_in_full(sharing, monkeypatch):
    """Blocks 0 and 1 alike, block 3 not: the two-block trace cannot see it, the attribute check must."""
    model = small_model("llama", num_hidden_layers=DEPTH)
    model.model.layers[3].self_attn.scaling = 0.5
    full = traced(model, False, monkeypatch)
    one = traced(model, True, monkeypatch)
    assert sharing == [False]
    assert canonical(one.graph) == canonical(full.graph)
    scales = [n.kwargs.get("scale") for n in one.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert scales.count(0.5) == 1


def test_per_layer_config_lists_that_differ_are_traced_in_full(sharing, monkeypatch):
    """Qwen2 with sliding-window layers from layer 3 on: `config.layer_types` differs between layers."""
    model = small_model("qwen2", num_hidden_layers=DEPTH, use_sliding_window=True,
                        layer_types=["full_attention"] * 3 + ["sliding_attention"] * (DEPTH - 3))
    assert len(set(model.config.layer_types)) == 2
    full = traced(model, False, monkeypatch)
    one = traced(model, True, monkeypatch)
    assert sharing == [False]
    assert canonical(one.graph) == canonical(full.graph)


def test_blocks_compare_plain_attribute_dicts_and_stateless_modules_by_what_they_hold():
    """transformers 5.25 gives each attention a dict of its own holding a stateless function module
    (`_kernel_funcs`): alike blocks stay alike. A module in such a dict that holds a weight, or a dict
    whose entries differ, makes the blocks differ."""
    import torch.nn as nn
    from calmgraph.tracing.shared import _structure

    class Rope(nn.Module):
        def forward(self, x):
            return x

    def block(funcs):
        b = nn.Linear(4, 4)
        b._kernel_funcs = funcs
        return b

    assert _structure(block({"rope": Rope()})) == _structure(block({"rope": Rope()}))
    assert _structure(block({"rope": Rope()})) != _structure(block({"other": Rope()}))
    assert _structure(block({"rope": nn.Linear(2, 2)})) != _structure(block({"rope": nn.Linear(2, 2)}))  # by identity

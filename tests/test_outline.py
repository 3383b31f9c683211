"""The block-granular fused graph (passes/outline.py) and what it makes possible (calmgraph/parallel.py).

Every block of every model is one submodule at `<model>.<block name>`, called once, owning the user's
weight storage; the outlined graph computes bitwise what the flat graph computed (the flat graph is the
reference: compile with the pass replaced by the identity), exports, compiles without graph breaks and
generates the same tokens. Activation checkpointing gives the same gradients; FSDP2 over 2 CPU processes
gives the same outputs and gradients as one process.
"""
from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import calmgraph as cg
import calmgraph.compiler as compiler
from calmgraph.blocks import Block, find_blocks
from calmgraph.errors import ParallelError
from calmgraph.generation import lockstep
from calmgraph.parallel import block_paths, checkpoint_blocks, checkpointed, shard
from calmgraph.plan import MODEL_KEY
from calmgraph.passes.outline import BLOCK_KEY, Outline, outline_blocks
from calmgraph.demo.models import TinyLM
from tests.reference import randomize_new_parameters
from tests.torchrun import launch
from tests.support import VOCAB, llama, qwen2, xtransformers

EVERY_2 = {"anchor": {"name": "base"}, "augments": [{"name": "kv"}],
           "edges": [{"source": "kv", "target": "base", "layers": {"every": 2}}]}
BATCH = 4


def _models(kind: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    if kind == "llama+qwen2":
        return {"base": llama().eval(), "kv": qwen2().eval()}
    if kind == "xtransformers":
        return {"base": xtransformers().eval(), "kv": xtransformers(dim=32, depth=4).eval()}
    return {"base": TinyLM(vocab=VOCAB, dim=48, depth=4).eval(), "kv": TinyLM(vocab=VOCAB, dim=32, depth=4).eval()}


def _compile(spec, models, *, outline: bool = True):
    """cg.compile, or with the outline pass replaced by the identity (the flat graph, the reference)."""
    if outline:
        composed = cg.compile(spec, models=models)
    else:
        saved = compiler.PIPELINE
        compiler.PIPELINE = tuple(p for p in saved if not isinstance(p, Outline))
        try:
            composed = cg.compile(spec, models=models)
        finally:
            compiler.PIPELINE = saved
    randomize_new_parameters(composed)
    return composed


def composition(prompt: bool = False, masked: bool = False):
    """The Llama + Qwen2 composition and a batch of ids, made the same way in every process. `prompt`: the
    Qwen2 reads a context of its own (`input: prompt`) rather than the anchor's sequence; `masked`: its
    blocks add only where the call's `write_mask` says (`writes: masked`)."""
    spec = EVERY_2 if not prompt else {**EVERY_2, "augments": [{"name": "kv", "input": "prompt"}]}
    if masked:
        spec = {**spec, "cross_attention": {"writes": "masked"}}
    composed = _compile(spec, _models("llama+qwen2"))
    ids = torch.randint(0, VOCAB, (BATCH, 9), generator=torch.Generator().manual_seed(1))
    return composed, ids


def generate_calls(rows: torch.Tensor, rank: int) -> dict[str, tuple[tuple, dict]]:
    """The generate calls each rank of the sharded run makes on its own rows, each rank's differing so that
    the ranks decode for different numbers of steps: {name: (args, keywords)}."""
    padded = rows.clone()
    padded[0, :2] = 0
    mask = torch.ones_like(rows)
    mask[0, :2] = 0                                    # row 0 left-padded by two
    return {
        "greedy": ((rows, 3 + 3 * rank), {}),
        "none_on_rank_0": ((rows, 4 * rank), {}),
        "padded": ((padded, 4), {"attention_mask": mask}),
        "sampled": ((rows, 5), {"do_sample": True, "top_k": 5, "generator": torch.Generator().manual_seed(10 + rank)}),
        "stopped": ((rows, 8), {"stopping_criteria": lambda ids, scores: ids.shape[1] >= rows.shape[1] + 1 + 2 * rank}),
    }


def grads_of_loss(composed, ids) -> dict[str, torch.Tensor]:
    """Gradients of the next-token loss on the new parameters."""
    composed.zero_grad()
    composed.loss(ids).backward()
    return {n: p.grad for n, p in composed.named_new_parameters()}


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


# -- the pass on a graph built by hand ----------------------------------------------------------------
def _hand_built():
    """Model `m`: embedding, two blocks (`layers.0`, `layers.1`), head. A node of no model reads block 0's
    middle (as a tap of another model could) between block 0's nodes; the result adds it in."""
    root = nn.Module()
    m = root.m = nn.Module()
    m.emb = nn.Parameter(torch.randn(5, 4))
    m.layers = nn.ModuleList(nn.Module() for _ in range(2))
    for layer in m.layers:
        layer.w = nn.Parameter(torch.randn(4, 4))
        layer.register_buffer("scale", torch.tensor(0.5))
    g = fx.Graph()

    def node(op, target, args, block=None):
        n = g.create_node(op, target, args)
        n.meta[MODEL_KEY] = "m"
        if block is not None:
            n.meta["nn_module_stack"] = {"k": (f"model.layers.{block}", nn.Module)}
        return n

    x = g.placeholder("x")
    ws = [node("get_attr", f"m.layers.{i}.w", ()) for i in range(2)]
    scales = [node("get_attr", f"m.layers.{i}.scale", ()) for i in range(2)]
    emb = node("get_attr", "m.emb", ())
    h = node("call_function", torch.matmul, (x, emb))
    for i in range(2):
        mid = node("call_function", torch.matmul, (h, ws[i]), block=i)
        if i == 0:
            probe = g.call_function(torch.relu, (mid,))          # no model: read between block 0's nodes
        act = node("call_function", torch.tanh, (mid,), block=i)
        h = node("call_function", operator.add, (h, node("call_function", operator.mul, (act, scales[i]), block=i)),
                 block=i)
    g.output(node("call_function", operator.add, (h, g.call_function(torch.sum, (probe,)))))
    return fx.GraphModule(root, g)


def _ops(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        counts[n.op] = counts.get(n.op, 0) + 1
    return counts


def test_hand_built_graph_becomes_two_block_calls():
    gm = _hand_built()
    x = torch.randn(3, 5)
    before = _ops(gm)
    assert before == {"placeholder": 1, "get_attr": 5, "call_function": 12, "output": 1}
    blocks = [Block(0, "layers.0", ("layers.0",)), Block(1, "layers.1", ("layers.1",))]
    report = outline_blocks(gm, {"m": blocks})
    out = report.module
    assert _ops(gm) == before                                             # the input is left as it was
    # root: x, emb weight, embedding matmul, 2 block calls, block 0's two outputs (getitem), the probe,
    # its sum, the final add
    assert _ops(out) == {"placeholder": 1, "get_attr": 1, "call_function": 6, "call_module": 2, "output": 1}
    assert report.blocks == {"m": ["m.layers.0", "m.layers.1"]} and not report.left_flat
    for i in range(2):
        block = out.get_submodule(f"m.layers.{i}")
        assert _ops(block) == {"placeholder": 1, "get_attr": 2, "call_function": 4, "output": 1}
        assert block.get_parameter("w") is gm.get_parameter(f"m.layers.{i}.w")               # owned, not copied
        assert block.get_buffer("scale") is gm.get_buffer(f"m.layers.{i}.scale")
    assert sorted(n for n, _ in out.named_parameters()) == ["m.emb", "m.layers.0.w", "m.layers.1.w"]
    assert torch.equal(out(x), gm(x))
    calls = [n for n in out.graph.nodes if n.op == "call_module"]
    assert [n.meta[BLOCK_KEY] for n in calls] == ["m.layers.0", "m.layers.1"]
    assert all(n.meta[MODEL_KEY] == "m" for n in calls)


def test_a_block_that_feeds_a_node_reading_it_stays_flat():
    gm = _hand_built()
    g = gm.graph
    probe = next(n for n in g.nodes if n.target is torch.relu)
    act = next(n for n in g.nodes if n.target is torch.tanh)
    act.args = (probe,)                                  # block 0 now reads the probe, which reads block 0
    gm.recompile()
    blocks = [Block(0, "layers.0", ("layers.0",)), Block(1, "layers.1", ("layers.1",))]
    report = outline_blocks(gm, {"m": blocks})
    assert list(report.left_flat) == ["m.layers.0"] and report.blocks == {"m": ["m.layers.1"]}
    x = torch.randn(3, 5)
    assert torch.equal(report.module(x), gm(x))


# -- compositions -------------------------------------------------------------------------------------
def _user_parameter(model: nn.Module, block: Block, name: str) -> nn.Parameter:
    """The user's parameter behind a block submodule's parameter `name` (see outline._relative)."""
    head, _, rest = name.partition(".")
    if head.startswith("member_"):
        member = f"{block.name.rpartition('.')[0]}.{head.removeprefix('member_')}"
        return model.get_parameter(f"{member}.{rest}")
    return model.get_parameter(f"{block.name}.{name}")


@pytest.mark.parametrize("kind", ["llama+qwen2", "xtransformers", "tinylm"])
def test_blocks_are_submodules_owning_the_users_weights(kind, ids):
    models = _models(kind)
    composed = _compile(EVERY_2, models)
    flat = _compile(EVERY_2, models, outline=False)
    with torch.no_grad():
        assert torch.equal(composed(ids), flat(ids))                      # bitwise the flat graph's logits

    paths = block_paths(composed)
    assert len(paths) == len(set(paths))
    calls = [n for n in composed.graph.nodes if BLOCK_KEY in n.meta]
    assert [n.op for n in calls] == ["call_module"] * len(calls) and len(calls) == len(paths)  # once each
    every = [p for p, _ in composed.named_parameters(remove_duplicate=False)]
    assert len({id(p) for p in composed.parameters()}) == len(every)       # no weight registered twice
    for name, model in models.items():
        kept = [b for b in find_blocks(model) if f"{name}.{b.name}" in paths]
        assert kept, name
        if name == "base":                                                  # the anchor keeps every block
            assert len(kept) == len(find_blocks(model))
        for block in kept:
            sub = composed.get_submodule(f"{name}.{block.name}")
            owned = dict(sub.named_parameters())
            users = {id(p) for m in block.members for p in model.get_submodule(m).parameters()}
            assert len(owned) == len(users)                                 # all of the block's weights...
            for pname, p in owned.items():                                  # ...sharing the user's storage
                assert p.data_ptr() == _user_parameter(model, block, pname).data_ptr(), pname
                assert not p.requires_grad
    root_weights = [n.target for n in composed.graph.nodes if n.op == "get_attr"]
    assert not [t for t in root_weights if any(t.startswith(p + ".") for p in paths)]
    links = [n for n in composed.graph.nodes if n.meta.get("calmgraph_link") is not None]
    assert links and all(BLOCK_KEY not in n.meta for n in links)            # cross-attention stays in the root


def test_tinylm_blocks_stay_the_users_modules():
    models = _models("tinylm")
    composed = _compile(EVERY_2, models)
    block = composed.get_submodule("base.layers.2")
    assert type(block).__name__ == "Layer"                                   # already a block call: kept
    assert block.qkv.weight.data_ptr() == models["base"].layers[2].qkv.weight.data_ptr()


def test_outlined_graph_exports_and_compiles_without_graph_breaks(ids, tmp_path):
    composed, _ = composition()
    with torch.no_grad():
        want = composed(ids)
        path = composed.export(tmp_path / "composed.pt2")
        got = torch.export.load(str(path)).module()(input_ids=ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    explained = torch._dynamo.explain(composed)(ids)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.allclose(torch.compile(composed)(ids), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache", [True, False])
def test_generation_is_unchanged(cache, ids):
    models = _models("llama+qwen2")
    composed, flat = _compile(EVERY_2, models), _compile(EVERY_2, models, outline=False)
    new = [composed.generate(ids, 5, temperature=0, cache=cache), flat.generate(ids, 5, temperature=0, cache=cache)]
    assert new[0].shape == (2, 14) and torch.equal(*new)


# -- activation checkpointing -------------------------------------------------------------------------
def _saved_bytes(composed, ids) -> int:
    """Bytes autograd keeps for backward during one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        composed.loss(ids)
    return total


def test_checkpointed_blocks_recompute_and_give_the_same_gradients(ids):
    composed, _ = composition()
    want = {n: g.clone() for n, g in grads_of_loss(composed, ids).items()}
    plain_saved = _saved_bytes(composed, ids)
    ck = checkpoint_blocks(copy.deepcopy(composed))
    assert checkpointed(ck) == block_paths(ck) == block_paths(composed)
    assert checkpoint_blocks(ck).code == ck.code                             # a second call changes nothing
    runs = {}
    for path in block_paths(ck):
        ck.get_submodule(path).register_forward_pre_hook(lambda m, a, p=path: runs.__setitem__(p, runs.get(p, 0) + 1))
    got = grads_of_loss(ck, ids)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    # anchor blocks after the first link read states that need gradients: they run again in backward
    assert runs["base.model.layers.3"] == 2 and runs["kv.model.layers.0"] == 1
    assert _saved_bytes(ck, ids) < 0.7 * plain_saved


def test_checkpointed_blocks_under_torch_compile(ids):
    composed, _ = composition()
    want = {n: g.clone() for n, g in grads_of_loss(composed, ids).items()}
    ck = checkpoint_blocks(composed)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ck)(ids)
    assert explained.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(ck)
    ck.zero_grad()
    from calmgraph.train import next_token_loss
    next_token_loss(compiled(ids), ids).backward()
    for n, p in ck.named_new_parameters():
        assert torch.allclose(p.grad, want[n], rtol=1e-4, atol=1e-6), n


def test_parallel_functions_refuse_what_they_cannot_do(ids):
    composed, _ = composition()
    with pytest.raises(ParallelError, match="torch.distributed initialised"):
        shard(composed)
    with pytest.raises(ParallelError, match="composed model"):
        checkpoint_blocks(nn.Linear(2, 2))
    flat = _compile(EVERY_2, _models("llama+qwen2"), outline=False)
    with pytest.raises(ParallelError, match="no block submodule"):
        checkpoint_blocks(flat)


# -- FSDP2 over 2 CPU processes -----------------------------------------------------------------------
# Tolerance of the sharded run against one process: the same math, with the gradient summed over ranks
# in another order (each rank's half-batch mean, then averaged) than one process's full-batch mean.
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "rank0.pt"
    launch("shard_worker.py", str(out))
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("variant", ["plain", "checkpointed"])
def test_fsdp_on_two_processes_matches_one(sharded, variant):
    composed, ids = composition()
    with torch.no_grad():
        want_logits = composed(ids)
    want = grads_of_loss(composed, ids)
    result = sharded[variant]
    ranks = result["ranks"]
    logits = torch.cat([r["logits"] for r in ranks])
    assert torch.allclose(logits, want_logits, rtol=1e-6, atol=1e-6)
    # each rank holds about half of the frozen weights (dim-0 shards: the last may be a few rows short)
    frozen = result["frozen_total"]
    assert sum(r["frozen_local"] for r in ranks) == frozen
    assert all(abs(r["frozen_local"] - frozen / 2) < 0.02 * frozen for r in ranks)
    assert result["total"] == sum(p.numel() for p in composed.parameters())
    assert result["grads"].keys() == want.keys()
    for n, g in result["grads"].items():
        assert torch.allclose(g, want[n], rtol=GRAD_RTOL, atol=GRAD_ATOL), (n, (g - want[n]).abs().max())
    # generating left the sharded model as it was (and its root gathered: the save below came after it)
    assert all(torch.equal(a, r["logits"]) for a, r in zip(result["after"], ranks, strict=True))
    # the saved new parameters are the whole ones, and load into one process
    fresh, _ = composition()
    with torch.no_grad():
        for p in fresh.new_parameters():
            p.zero_()
    cg.load_new(fresh, result["saved"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.new_parameters(), composed.new_parameters(), strict=True))
    assert torch.equal(fresh.generate(ids[:, :4], 3), composed.generate(ids[:, :4], 3))


def sharded_inputs(variant: str, rows: torch.Tensor) -> dict:
    """The inputs besides the ids of the sharded run's `prompt` and `masked` compositions."""
    if variant == "prompt":
        return {"kv_input_ids": rows.flip(1)}
    return {"write_mask": (rows % 2 == 0).long()} if variant == "masked" else {}


@pytest.mark.parametrize("variant", ["plain", "checkpointed", "prompt", "masked"])
def test_a_sharded_composition_generates_each_ranks_rows_as_one_process_does(sharded, variant):
    """Each rank generated for its own rows, the ranks for different numbers of steps (one for none at all):
    the tokens are one process's, greedy and sampled, padded and stopped early."""
    composed, ids = composition(prompt=variant == "prompt", masked=variant == "masked")
    result = sharded[variant]["generate"] if variant in ("plain", "checkpointed") else sharded[variant]
    for rank, got in enumerate(result["ranks"]):
        rows = ids.chunk(len(result["ranks"]))[rank]
        inputs = sharded_inputs(variant, rows)
        calls = generate_calls(rows, rank)
        assert got.keys() == calls.keys()
        for name, (args, kw) in calls.items():
            want = composed.generate(*args, **kw, **inputs, cache=False)
            assert torch.equal(got[name], want), (rank, name, got[name], want)
        assert torch.equal(got["greedy"], composed.generate(*calls["greedy"][0], **inputs))   # the cached path's
    lengths = [{name: t.shape[1] for name, t in r.items()} for r in result["ranks"]]
    assert lengths[0]["greedy"] != lengths[1]["greedy"] and lengths[0]["none_on_rank_0"] == ids.shape[1]
    assert len(result["warned"]) == 1 and "sharded" in result["warned"][0]    # that it recomputes, it says
    for keyword, (name, is_value_error, message) in result["refused"].items():   # what it cannot do, it says
        assert name == "ParallelError" and is_value_error and "sharded" in message and "save_new" in message, keyword


def test_a_rank_whose_call_raises_stops_the_others_calls(sharded):
    """A generate call refused on one rank, or failing there mid-decode, raises a ParallelError on the other
    (which would otherwise wait for that rank's next forward); the ranks stay in step for the next call."""
    composed, ids = composition()
    ranks = sharded["failures"]
    assert ranks[1]["refused"][0] == "InputError"
    assert ranks[0]["streamer"] == ("RuntimeError", "the streamer broke")
    for rank, case in ((0, "refused"), (1, "streamer")):
        name, message = ranks[rank][case]
        assert name == "ParallelError" and "another process" in message, (rank, case, message)
    for rank, got in enumerate(ranks):
        assert torch.equal(got["after"], composed.generate(ids.chunk(2)[rank], 3 + rank, cache=False))


class _Mesh:
    """What `lockstep.Rounds` reads of a DeviceMesh."""

    ndim = 1

    def __init__(self, device_type: str):
        self.device_type = device_type

    def get_group(self, dim: int):
        return None


def test_the_lockstep_flag_goes_where_the_mesh_runs_its_collectives():
    """gloo: the CPU, wherever the ids are; another device type: the ids' device (the rank's own, which the
    current device need not be)."""
    ids = torch.zeros(1, 2, dtype=torch.long, device="meta")
    assert lockstep.Rounds(_Mesh("cpu"), ids).device == torch.device("cpu")
    assert lockstep.Rounds(_Mesh("meta"), ids).device == ids.device


class _NoGradLayer(nn.Module):
    """A block with a `torch.no_grad()` region, which torch.export lifts into a subgraph of the model."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        with torch.no_grad():
            scale = x.abs().mean(-1, keepdim=True) + 1
        return x + self.proj(x) / scale


class _NoGradLM(TinyLM):
    def __init__(self):
        super().__init__(vocab=VOCAB, dim=32, depth=2)
        self.layers = nn.ModuleList(_NoGradLayer(32) for _ in range(2))


def test_what_export_lifts_out_of_a_block_moves_into_it(ids, monkeypatch):
    import calmgraph.passes.trace as trace
    monkeypatch.setattr(trace, "frontend_order", lambda model: ["export"])
    torch.manual_seed(0)
    models = {"base": _NoGradLM().eval(), "kv": _NoGradLM().eval()}
    spec = {"anchor": {"name": "base"}, "augments": [{"name": "kv"}],
            "edges": [{"source": "kv", "target": "base", "layers": [[0, 1]]}]}
    composed = cg.compile(spec, models=models)                  # cross-attention at its zero init: identity
    lifted = [n.target for n in composed.graph.nodes if n.op == "get_attr" and "_calmgraph_" in n.target]
    assert not lifted
    for path in ("base.layers.0", "base.layers.1", "kv.layers.0"):
        inner = [n.target for n in composed.get_submodule(path).graph.nodes if n.op == "get_attr"]
        assert any(t.startswith("_calmgraph_") for t in inner), path
    with torch.no_grad():
        assert torch.allclose(composed(ids), models["base"](ids), atol=1e-6)

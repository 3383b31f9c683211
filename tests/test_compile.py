"""The core compiler: identity at init, parity with an eager reference, gradients, masks, wiring, pruning."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.fx as fx
from tests.support import (DECODERS, VOCAB, bert, eager_reference, gpt, randomize_new_parameters, run_model,
                      xtransformers)

import calmgraph as cg
from calmgraph.demo.models import TinyEncoder


def spec(*augments, edges, **anchor):
    return cg.CompositionSpec(anchor={"name": "base", **anchor}, augments=list(augments), edges=edges)


def every(source, k, target="base", **kw):
    return {"source": source, "target": target, "layers": {"every": k}, **kw}


def check_identity_and_parity(composed, models, ids, prompts=None):
    args = [p for pair in (prompts or {}).values() for p in pair[:1]]
    masks = [pair[1] for pair in (prompts or {}).values()]
    with torch.no_grad():
        anchor = run_model(models["base"], ids)
        fused = composed(ids, *args, *masks)
        assert isinstance(composed, fx.GraphModule)
        assert fused.shape == (*ids.shape, VOCAB)
        assert torch.equal(fused, anchor), "at initialisation the composition must be exactly the anchor"
        randomize_new_parameters(composed)
        fused = composed(ids, *args, *masks)
        reference = eager_reference(composed, models, ids, prompts)
    assert not torch.allclose(fused, anchor, atol=1e-3), "randomised cross-attention must change the output"
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_family_as_anchor(family, ids):
    torch.manual_seed(0)
    models = {"base": DECODERS[family]().eval(), "kv": gpt(dim=32, depth=4).eval()}
    composed = cg.compile(spec({"name": "kv"}, edges=[every("kv", 2)]), models=models)
    check_identity_and_parity(composed, models, ids)


@pytest.mark.parametrize("family", DECODERS)
def test_family_as_augment(family, ids):
    torch.manual_seed(0)
    models = {"base": gpt(dim=64, depth=4).eval(), "kv": DECODERS[family](dim=32).eval()}
    composed = cg.compile(spec({"name": "kv"}, edges=[every("kv", 2)]), models=models)
    check_identity_and_parity(composed, models, ids)


def prompt_ids(seed=2, length=6):
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, VOCAB, (2, length), generator=g)
    m = torch.ones_like(p)
    m[0, 4:] = 0  # the first prompt is shorter
    return p, m


@pytest.mark.parametrize("encoder", [bert, lambda: TinyEncoder(vocab=VOCAB, dim=32, depth=2, heads=2)],
                         ids=["bert", "tiny_encoder"])
def test_prompt_augment(encoder, ids):
    torch.manual_seed(0)
    models = {"base": llama_or_gpt(), "docs": encoder().eval()}
    composed = cg.compile(spec({"name": "docs", "input": "prompt"}, edges=[every("docs", 1)]), models=models)
    assert "docs_mask" in composed.input_names
    check_identity_and_parity(composed, models, ids, {"docs": prompt_ids()})


def test_null_kv_with_a_padded_prompt(ids):
    # The null key stays readable where the prompt is padding, and from a prompt that is all padding.
    torch.manual_seed(0)
    models = {"base": llama_or_gpt(), "docs": TinyEncoder(vocab=VOCAB, dim=32, depth=2, heads=2).eval()}
    composed = cg.compile(spec({"name": "docs", "input": "prompt"},
                               edges=[every("docs", 1, cross_attention={"null_kv": True})]), models=models)
    p, m = prompt_ids()
    m[1] = 0
    check_identity_and_parity(composed, models, ids, {"docs": (p, m)})


def llama_or_gpt():
    return gpt(dim=64, depth=4).eval()


def three_augment_models():
    torch.manual_seed(0)
    return {"base": gpt(dim=64, depth=6).eval(), "a": gpt(dim=32, depth=4).eval(),
            "b": xtransformers(dim=48, depth=3).eval(), "docs": TinyEncoder(vocab=VOCAB, dim=32, depth=2, heads=2).eval()}


def test_two_and_three_augments(ids):
    models = three_augment_models()
    two = spec({"name": "a"}, {"name": "b"}, edges=[every("a", 2), every("b", 1)])
    check_identity_and_parity(cg.compile(two, models={k: models[k] for k in ("base", "a", "b")}), models, ids)
    three = spec({"name": "a"}, {"name": "b"}, {"name": "docs", "input": "prompt"},
                 edges=[every("a", 2), every("b", 1), {"source": "docs", "target": "base", "layers": [[1, 0], [1, 5]]}])
    check_identity_and_parity(cg.compile(three, models=models), models, ids, {"docs": prompt_ids()})


def test_augment_to_augment_edge(ids):
    """b attends to a, base attends to b: a's information reaches the anchor only through b."""
    models = {k: v for k, v in three_augment_models().items() if k in ("base", "a", "b")}
    s = spec({"name": "a"}, {"name": "b"}, edges=[
        {"source": "a", "target": "b", "layers": [[1, 0], [3, 2]]}, every("b", 1)])
    composed = cg.compile(s, models=models)
    assert {(l.source, l.target) for l in composed.links} == {("a", "b"), ("b", "base")}
    check_identity_and_parity(composed, models, ids)
    # the a -> b blocks really are on the path: zeroing them changes the output
    with torch.no_grad():
        before = composed(ids)
        for p in composed.xattn.a_to_b.parameters():
            p.zero_()
        assert not torch.allclose(before, composed(ids), atol=1e-4)


@pytest.mark.parametrize("layers", [[[0, 2], [1, 2], [3, 2]], [[1, 0], [1, 3], [1, -1]]],
                         ids=["many_to_one", "one_to_many"])
def test_layer_maps(layers, ids):
    torch.manual_seed(0)
    models = {"base": gpt(dim=64, depth=6).eval(), "kv": gpt(dim=32, depth=4).eval()}
    composed = cg.compile(spec({"name": "kv"}, edges=[{"source": "kv", "target": "base", "layers": layers}]),
                          models=models)
    assert len(composed.links) == 3
    check_identity_and_parity(composed, models, ids)


@pytest.mark.parametrize("tap", ["output", "input"])
@pytest.mark.parametrize("gate", ["zero", "tanh"])
@pytest.mark.parametrize("norm", ["rms", "layer", "none"])
def test_cross_attention_options(tap, gate, norm, ids):
    torch.manual_seed(0)
    models = {"base": gpt(dim=64, depth=4).eval(), "kv": DECODERS["llama"](dim=64).eval()}
    s = cg.CompositionSpec(anchor={"name": "base", "tap": tap}, augments=[{"name": "kv", "tap": tap}],
                           edges=[every("kv", 2, cross_attention={"heads": 2, "project_context": norm != "none"})],
                           cross_attention={"gate": gate, "norm": norm})
    composed = cg.compile(s, models=models)
    assert all(l.heads == 2 for l in composed.links)
    if tap == "input":  # block 0's input is the embedding; tapping it is legal and must work
        assert composed.links[0].target_layer == 1
    check_identity_and_parity(composed, models, ids)


@pytest.mark.parametrize("options", [{"positions": "rotary"}, {"window": 1}, {"window": 3, "positions": "rotary"},
                                     {"null_kv": True}, {"window": 1, "null_kv": True, "positions": "rotary"}],
                         ids=["rotary", "window1", "window3_rotary", "null_kv", "window1_null_kv_rotary"])
def test_positional_cross_attention_matches_the_reference(options, ids):
    """RoPE on queries and keys against the reference's own complex-number rotation; a window against its
    own position arithmetic; a null key/value against its own extra score column."""
    torch.manual_seed(0)
    models = {"base": DECODERS["llama"](dim=48).eval(), "kv": gpt(dim=32).eval()}
    s = spec({"name": "kv"}, edges=[every("kv", 1, cross_attention=options)])
    composed = cg.compile(s, models=models)
    blocks = [composed.get_submodule(".".join(("xattn", *l.module_path))) for l in composed.links]
    assert all((b.rotary, b.window, b.null_kv is not None) ==
               (options.get("positions") == "rotary", options.get("window"), options.get("null_kv", False)) for b in blocks)
    check_identity_and_parity(composed, models, ids)


def test_every_follows_the_paper():
    from calmgraph.passes.resolve import every_pairs
    assert every_pairs(4, 24, 24) == [(3, 3), (7, 7), (11, 11), (15, 15), (19, 19), (23, 23)]
    assert every_pairs(4, 16, 32) == [(3, 7), (7, 15), (11, 23), (15, 31)]
    assert every_pairs(2, 4, 6) == [(1, 2), (3, 5)]
    for k, na, nb in [(1, 5, 3), (3, 10, 7), (2, 12, 30)]:
        pairs = every_pairs(k, na, nb)
        assert len(pairs) == na // k and pairs[-1][1] == nb - 1 and all(0 <= t < nb for _, t in pairs)
        assert [s for s, _ in pairs] == list(range(k - 1, na // k * k, k))


@pytest.mark.parametrize("enabled", [True, False])
def test_compile_pauses_the_cyclic_collector_and_restores_it(enabled, monkeypatch):
    import gc

    from calmgraph.passes.trace import Trace
    seen = []
    call = Trace.call
    monkeypatch.setattr(Trace, "call", lambda self, state: (seen.append(gc.isenabled()), call(self, state))[1])
    models = {"anchor": gpt(), "aug": gpt()}
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "aug"}],
            "edges": [{"source": "aug", "target": "anchor", "layers": [[0, 0]]}]}
    bad = {**spec, "edges": [{"source": "aug", "target": "anchor", "layers": [[0, 99]]}]}
    (gc.enable if enabled else gc.disable)()
    try:
        cg.compile(spec, models=models)
        assert seen == [False] and gc.isenabled() == enabled
        with pytest.raises(cg.LayerRefError):                  # a failing compile restores it too
            cg.compile(bad, models=models)
        assert seen == [False, False] and gc.isenabled() == enabled
    finally:
        gc.enable()


def test_gradients_reach_only_new_parameters(ids):
    torch.manual_seed(0)
    models = {"base": DECODERS["llama"](dim=48).eval(), "kv": gpt(dim=32).eval(),
              "docs": TinyEncoder(vocab=VOCAB, dim=32, depth=2, heads=2).eval()}
    s = spec({"name": "kv"}, {"name": "docs", "input": "prompt"}, edges=[every("kv", 2), every("docs", 2)])
    composed = cg.compile(s, models=models).train()
    randomize_new_parameters(composed)
    p, m = prompt_ids()
    composed(ids, p, m).logsumexp(-1).mean().backward()
    new = dict(composed.named_new_parameters())
    assert new and all(param.grad is not None and param.grad.abs().sum() > 0 for param in new.values())
    frozen = [(n, q) for n, q in composed.named_parameters() if n not in new]
    assert frozen and all(not q.requires_grad and q.grad is None for _, q in frozen)
    assert all(q.grad is None for model in models.values() for q in model.parameters())
    assert set(map(id, composed.new_parameters())) == {id(q) for q in composed.parameters() if q.requires_grad}


def test_shared_mode_is_causal(ids):
    torch.manual_seed(0)
    models = {"base": DECODERS["qwen2"](dim=48).eval(), "kv": gpt(dim=32).eval()}
    composed = cg.compile(spec({"name": "kv"}, edges=[every("kv", 1)]), models=models)
    randomize_new_parameters(composed)
    t = 5
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
    with torch.no_grad():
        a, b = composed(ids), composed(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-4)


@pytest.mark.parametrize("encoder", [bert, lambda: TinyEncoder(vocab=VOCAB, dim=32, depth=2, heads=2)],
                         ids=["bert", "tiny_encoder"])
def test_prompt_mode_honours_padding(encoder, ids):
    torch.manual_seed(0)
    models = {"base": gpt(dim=64).eval(), "docs": encoder().eval()}
    composed = cg.compile(spec({"name": "docs", "input": "prompt"}, edges=[every("docs", 1)]), models=models)
    randomize_new_parameters(composed)
    p, m = prompt_ids()
    padded = p.clone()
    padded[0, 4:] = (padded[0, 4:] + 7) % VOCAB  # only masked positions change
    real = p.clone()
    real[0, 1] = (real[0, 1] + 7) % VOCAB       # a real position changes
    with torch.no_grad():
        out = composed(ids, p, m)
        torch.testing.assert_close(composed(ids, padded, m), out, atol=1e-6, rtol=0)
        assert not torch.allclose(composed(ids, real, m)[0], out[0], atol=1e-4)
        # no mask means every position is real
        assert torch.equal(composed(ids, p), composed(ids, p, torch.ones_like(m)))
        # a prompt that is all padding contributes nothing (not NaN)
        empty = torch.zeros_like(m)
        empty[1] = 1
        assert torch.isfinite(composed(ids, p, empty)).all()


def test_pruning_removes_unread_layers_and_head(ids):
    torch.manual_seed(0)
    models = {"base": gpt(dim=64, depth=4).eval(), "kv": DECODERS["llama"](dim=48, depth=6).eval()}
    s = spec({"name": "kv"}, edges=[{"source": "kv", "target": "base", "layers": [[1, 1], [2, 3]]}])
    pruned, full = cg.compile(s, models=models), cg.compile(s, models=models, prune=False)
    assert len(pruned.graph.nodes) < len(full.graph.nodes)
    assert pruned.pruned.blocks_kept["kv"] == 3 and pruned.pruned.blocks_total["kv"] == 6
    assert pruned.pruned.head_removed["kv"] and not full.pruned.head_removed["kv"]
    # no node of kv's blocks 3..5 or its head survives, and the head's weight is not held
    survivors = " ".join(n.name for n in pruned.graph.nodes)
    assert "kv_lm_head" not in " ".join(n for n, _ in pruned.named_parameters())
    assert "kv_linear" in survivors or "kv_" in survivors
    full.load_state_dict(pruned.state_dict(), strict=False)
    randomize_new_parameters(pruned)
    randomize_new_parameters(full)
    with torch.no_grad():
        assert torch.equal(pruned(ids), full(ids))


def test_models_are_not_modified_and_weights_are_shared(ids):
    torch.manual_seed(0)
    base, kv = DECODERS["llama"](dim=48).train(), gpt(dim=32).train()
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in (("base", base), ("kv", kv))}
    flags = {n: [p.requires_grad for p in m.parameters()] for n, m in (("base", base), ("kv", kv))}
    s = spec({"name": "kv"}, edges=[every("kv", 2)])
    first = cg.compile(s, models={"base": base, "kv": kv})
    second = cg.compile(s, models={"base": base, "kv": kv})  # a model can be compiled twice
    for name, model in (("base", base), ("kv", kv)):
        assert model.training and all(m.training for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == flags[name]
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[name][k])
    # storage is shared, not copied: an update to the user's weights is seen by both compositions
    user = dict(base.named_parameters())["model.embed_tokens.weight"]
    fused = [p for n, p in first.named_parameters() if n.startswith("base") and "embed_tokens" in n][0]
    assert fused.data_ptr() == user.data_ptr() and fused is not user and not fused.requires_grad
    with torch.no_grad():
        user.add_(1.0)
    base.eval()
    with torch.no_grad():
        expected = run_model(base, ids)
        assert torch.equal(first(ids), expected) and torch.equal(second(ids), expected)
    # the frozen models stay in eval mode when the composition trains
    first.train()
    assert first.xattn.training and not first.base.training


def test_compiles_on_meta_device():
    with torch.device("meta"):
        models = {"base": DECODERS["llama"](dim=64, depth=8), "kv": gpt(dim=32, depth=4)}
    composed = cg.compile(spec({"name": "kv"}, edges=[every("kv", 2)]), models=models)
    assert [l.target_dim for l in composed.links] == [64, 64] and composed.links[0].source_dim == 32
    assert all(p.device.type == "meta" for p in composed.new_parameters())


def test_moving_the_composition_moves_the_devices_written_into_its_graph(ids):
    """torch.export writes the tracing device into the graph (arange(device=cpu), to(x, cpu)): after
    `.to()` they must name the new device, or a CPU-compiled model fails on the GPU. Checked with `meta`."""
    models = {"base": DECODERS["llama"](), "kv": bert()}
    composed = cg.compile(spec({"name": "kv", "input": "prompt"}, edges=[every("kv", 1)]), models=models)

    def devices(module):
        return {v for m in module.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes
                for v in (*n.args, *n.kwargs.values()) if isinstance(v, torch.device)}

    assert devices(composed) == {torch.device("cpu")}
    moved = composed.to("meta")
    assert moved is composed and devices(composed) == {torch.device("meta")}
    out = composed(ids.to("meta"), ids[:, :5].to("meta"))
    assert out.device.type == "meta" and out.shape == (*ids.shape, VOCAB)
    assert all(p.device.type == "cpu" for p in models["base"].parameters())   # the user's model stays put


def test_casting_a_graph_that_holds_its_dtypes_compiles_it_again(ids):
    """torch.export writes dtypes as constants, and a norm's cast up to float32 and back to its input's dtype
    are both float32 when traced in float32: the cast graph failed at its first product deep in torch. So a
    cast compiles the composition again from cast copies of its models. Each cast gives what a compile from
    models in that dtype gives, keeps the new parameters (the same objects, cast), hooks, mode and attributes
    of its own, and leaves the user's models alone."""
    models = {"base": DECODERS["llama"](), "kv": gpt(dim=32, depth=2)}
    theirs = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    composed = cg.compile(spec({"name": "kv"}, edges=[every("kv", 1)]), models=models)
    randomize_new_parameters(composed)
    new = dict(composed.named_new_parameters())
    calls = []
    composed.register_forward_hook(lambda *_: calls.append(1))
    composed.tag = "mine"
    composed.train()
    for dtype, cast in ((torch.bfloat16, lambda c: c.to(torch.bfloat16)), (torch.float16, lambda c: c.half()),
                        (torch.float64, lambda c: c.double()), (torch.float32, lambda c: c.to("cpu", torch.float32))):
        expected = {n: p.detach().to(dtype) for n, p in new.items()}
        assert cast(composed) is composed
        assert {p.dtype for p in composed.parameters()} == {dtype}
        assert all(composed.get_parameter(n) is p and torch.equal(p, expected[n]) for n, p in new.items())
        # the reference: compiled from models in that dtype (copies of the composition's own), the same blocks
        again = cg.compile(spec({"name": "kv"}, edges=[every("kv", 1)]),
                           models={n: copy.deepcopy(composed.traced_model(n)) for n in models})
        again.xattn.load_state_dict(composed.xattn.state_dict())
        with torch.no_grad():
            out = composed(ids)
            assert out.dtype == dtype and torch.equal(out, again(ids))
        if dtype == torch.bfloat16:                                    # it decodes in that dtype too
            assert torch.equal(composed.generate(ids, 4), again.generate(ids, 4))
    assert len(calls) == 4 and composed.tag == "mine" and composed.training and composed.xattn.training
    assert not composed.base.training                                  # the frozen models stay in eval
    for n, m in models.items():                                        # the user's: as they were
        assert all(v.dtype == torch.float32 and torch.equal(v, theirs[n][k]) for k, v in m.state_dict().items())


def test_a_cast_that_cannot_compile_again_changes_nothing(ids, monkeypatch):
    models = {"base": DECODERS["llama"](), "kv": gpt(dim=32, depth=2)}
    composed = cg.compile(spec({"name": "kv"}, edges=[every("kv", 1)]), models=models)
    before = {k: v.clone() for k, v in composed.state_dict().items()}
    code = composed.code

    def refuse(spec, models):
        assert all(p.dtype == torch.float16 for m in models.values() for p in m.parameters())
        raise cg.errors.TraceError("model 'kv' could not be traced in torch.float16")
    monkeypatch.setattr(composed, "_recompile", refuse)                # compile, as a model that fails in fp16
    with pytest.raises(cg.errors.ModelError, match=r"cast to torch.float16.*nothing was cast.*could not be traced"):
        composed.half()
    marked = next(composed.new_parameters())
    for mark in ("device_mesh", "ds_id"):                              # FSDP2's DTensors, ZeRO-3's partitions
        setattr(marked, mark, None)
        with pytest.raises(cg.errors.ModelError, match=r"cannot cast a sharded composition to torch.bfloat16"):
            composed.to(torch.bfloat16)
        delattr(marked, mark)
    after = composed.state_dict()
    assert composed.code == code
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    composed.xattn.to(torch.bfloat16)                                  # the new blocks alone: no compile
    assert {p.dtype for p in composed.new_parameters()} == {torch.bfloat16}


def test_a_cast_composition_saved_and_loaded_is_in_the_cast_dtype(ids, tmp_path):
    """The spec a cast composition records names the cast dtype for its transformers sources, so `cg.load` builds
    the models in the dtype they were saved in (it built them in the source's old one: a float32 composition)."""
    transformers = pytest.importorskip("transformers")
    for name, seed in (("base", 0), ("kv", 1)):
        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=VOCAB)).save_pretrained(tmp_path / name)
    written = {"anchor": {"name": "base", "source": {"hf": str(tmp_path / "base")}},
               "augments": [{"name": "kv", "source": {"hf": str(tmp_path / "kv")}}], "edges": [every("kv", 1)]}
    for dtype, close in ((torch.bfloat16, 2e-2), (torch.float64, 0)):
        composed = cg.compile(written)
        randomize_new_parameters(composed)
        composed.to(dtype)
        name = str(dtype).removeprefix("torch.")
        assert {m.source.dtype for m in composed.spec.models} == {name}
        loaded = cg.load(composed.save_new(tmp_path / name))
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        # the reference: the spec written with that dtype, the same blocks
        named = {**written, "anchor": {**written["anchor"], "source": {**written["anchor"]["source"], "dtype": name}},
                 "augments": [{**a, "source": {**a["source"], "dtype": name}} for a in written["augments"]]}
        again = cg.compile(named)
        again.xattn.load_state_dict(composed.xattn.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(ids), again(ids))
            # bf16 near, not equal: transformers' loader keeps the rotary frequencies in float32; a cast does not
            torch.testing.assert_close(loaded(ids), composed(ids), atol=close, rtol=close)
    assert cg.compile(written).spec.anchor.source.dtype is None          # the spec given is unchanged


def test_a_composition_not_made_by_compile_refuses_a_cast(ids):
    composed = cg.compile(spec({"name": "kv"}, edges=[every("kv", 1)]),
                          models={"base": DECODERS["llama"](), "kv": gpt(dim=32, depth=2)})
    composed._recompile = None                                         # as one built by hand from a graph
    with pytest.raises(cg.errors.ModelError, match=r"not made by `calmgraph.compile`.*compile it from models in that"):
        composed.to(torch.bfloat16)
    assert {p.dtype for p in composed.parameters()} == {torch.float32}


def test_tap_points_list_blocks_in_order():
    points = cg.tap_points(DECODERS["llama"](dim=48, depth=3))
    assert [(p.index, p.name, p.dim) for p in points] == [(i, f"model.layers.{i}", 48) for i in range(3)]
    xt = cg.tap_points(xtransformers(dim=32, depth=2))
    assert [p.name for p in xt] == ["attn_layers.layers.1", "attn_layers.layers.3"]  # attention + ff = one block


def test_code_reads_like_the_composition():
    torch.manual_seed(0)
    models = {"base": gpt(dim=64, depth=4).eval(), "kv": gpt(dim=32, depth=4).eval()}
    composed = cg.compile(spec({"name": "kv"}, edges=[every("kv", 4)]), models=models)
    code = composed.code
    assert "def forward(self, input_ids):" in code
    assert "self.xattn.kv_to_base.l3_to_l3(base_blocks_3, kv_blocks_3)" in code
    assert "self.kv.blocks" in code and "self.base.blocks" in code


def test_deepcopy_and_loss(ids):
    import copy
    torch.manual_seed(0)
    models = {"base": gpt(dim=64, depth=4).eval(), "kv": gpt(dim=32, depth=4).eval()}
    composed = cg.compile(spec({"name": "kv"}, edges=[every("kv", 2)]), models=models)
    randomize_new_parameters(composed)
    twin = copy.deepcopy(composed)
    assert isinstance(twin, cg.ComposedModel) and twin.spec == composed.spec and len(twin.links) == 2
    with torch.no_grad():
        assert torch.equal(twin(ids), composed(ids))
        next(twin.new_parameters()).add_(1.0)  # a deep copy owns its parameters
        assert not torch.equal(twin(ids), composed(ids))
        # the loss is next-token cross-entropy on the answer tokens only
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, 6:] = True
        logits = composed(ids)
        expected = torch.nn.functional.cross_entropy(logits[:, 5:-1].reshape(-1, VOCAB), ids[:, 6:].reshape(-1))
        torch.testing.assert_close(composed.loss(ids, label_mask=mask), expected)


def _gates_closed(family: str, dtype: torch.dtype):
    """A `family` anchor (tests/families.py) in `dtype` with a Llama augment, compiled: new gates at zero."""
    from tests.families import small_model
    from tests.support import llama
    torch.manual_seed(0)
    models = {"base": small_model(family).eval().to(dtype), "aug": llama(dim=32).eval().to(dtype)}
    return cg.compile(spec({"name": "aug"}, edges=[every("aug", 1)]), models=models), models["base"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_under_autocast_a_float32_trace_keeps_float32_where_a_model_casts_back(family):
    """torch.export writes the dtypes it saw into the graph. Qwen3's q/k norms cast a projection's output up
    to float32 and back to its input's dtype: traced in float32, 'back' is float32, so under bf16 autocast
    the fused graph rounds there once less than the model run eagerly (README, "What compiling does to your
    models"). Llama's norms read the residual stream (float32 under autocast): the anchor's logits exactly.
    Compiled from bfloat16 models, the graph has the model's own roundings: exactly the anchor's."""
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(40))
    composed, anchor = _gates_closed(family, torch.float32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused, eager = composed(ids), anchor(ids).logits
    if family == "llama":
        assert torch.equal(fused, eager)
    else:
        assert not torch.equal(fused, eager)
        torch.testing.assert_close(fused.float(), eager.float(), atol=2 ** -7 * eager.abs().max().item(), rtol=0)
    composed, anchor = _gates_closed(family, torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(composed(ids), anchor(ids).logits)


class _MatmulRotary(torch.nn.Module):
    """Rotary angles as transformers up to 5.17 computed them: a no-grad forward (a nested graph in torch.export's
    trace) whose one-term matmul runs with autocast off, a region a trace without autocast does not record."""

    def __init__(self, rotary):
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq.clone(), persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv_freq = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else \
                contextlib.nullcontext():
            freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def test_under_autocast_angles_computed_with_autocast_off_stay_float32():
    """The trace's one-term matmul becomes a multiply, and export's dtype asserts in the nested graph go: under
    bf16 autocast the anchor's logits are exactly its own eager run's, whose angles stay float32 (before, the
    nested graph's assert refused the bf16 product: "Tensor dtype mismatch")."""
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(41))
    from tests.families import small_model
    from tests.support import llama
    torch.manual_seed(0)
    anchor = small_model("llama").eval()
    anchor.model.rotary_emb = _MatmulRotary(anchor.model.rotary_emb)
    models = {"base": anchor, "aug": llama(dim=32).eval()}
    composed = cg.compile(spec({"name": "aug"}, edges=[every("aug", 1)]), models=models)
    targets = [n.target for m in composed.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes]
    assert torch.ops.higher_order.wrap_with_set_grad_enabled in targets   # the no-grad forward, a nested graph
    assert torch.ops.aten._assert_tensor_metadata.default not in targets
    assert torch.ops.aten.matmul.default not in targets and torch.ops.aten.mul.Tensor in targets
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused, eager = composed(ids), anchor(ids).logits
    assert torch.equal(fused, eager)
    with torch.inference_mode():
        assert torch.equal(composed(ids), anchor(ids).logits)

"""The decode graph's rewrites (`generation/fuse.py`): fewer ops a step, the same logits and tokens.

References: the decode graph built without the rewrites (`decode.FUSE = False`), the fused graph over the
whole sequence (`composed(ids)`), the recomputing path (`cache=False`), and the eager modules the patterns
come from. On CPU every rewrite is exact: `aten.rms_norm`'s CPU kernel is the decomposition it replaces, and
`roll` with a sign moved from one factor to the other is bit-exact. (On CUDA, `rms_norm` is one fused kernel
that sums in another order: there the tolerance is that of a sum's rounding, 1e-5 relative in float32.)
"""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn as nn

import calmgraph as cg
import calmgraph.generation.decode as decode
from calmgraph.generation import fuse as F
from calmgraph.generation.generate import contexts_of, decoder_for, stages_of
from calmgraph.tracing import shared
from calmgraph.tracing.frontends import exported_module
from tests import support

warnings.filterwarnings("ignore", category=UserWarning)
aten = torch.ops.aten
ANCHORS = ["llama", "qwen2", "mistral", "gpt2"]


@functools.cache  # tests only read the compositions (a decode step starts its caches afresh at position 0)
def compose(anchor: str, mode: str, dtype=torch.float32, fuse: bool = True, share: bool = True):
    torch.manual_seed(0)
    models = {"anchor": support.DECODERS[anchor]().eval().to(dtype), "aug": support.llama(dim=32).eval().to(dtype)}
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "aug", "input": mode}],
            "edges": [{"source": "aug", "target": "anchor", "layers": {"every": 2}}]}
    composed = cg.compile(spec, models=models)
    support.randomize_new_parameters(composed, seed=0, std=0.3)
    previous, decode.FUSE, sharing, shared.ENABLED = decode.FUSE, fuse, shared.ENABLED, share
    try:
        decoder_for(composed, 2, 12)      # built now, with or without the rewrites (and the shared trace)
    finally:
        decode.FUSE, shared.ENABLED = previous, sharing
    return composed


def ids_and_prompts(mode, seed=40, length=11):
    ids = torch.randint(3, support.VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    return ids, ({"aug_input_ids": ids[:, :6]} if mode == "prompt" else {})


def steps(composed, ids, extra):
    """Logits of a prefill of 4 positions, then of each next position, through the cached decode graph."""
    decoder, contexts = decoder_for(composed, 2, 12), contexts_of(composed)
    with torch.inference_mode():
        ctx = contexts.module(ids[:, :4], *stages_of(composed).augment(**extra))
        kv = decoder.project(ctx)
        got = [decoder.module(ids[:, :4], torch.arange(4), *ctx, *kv)]
        for t in range(4, ids.shape[1]):
            got.append(decoder.module(ids[:, t:t + 1], torch.tensor([t]), *ctx, *kv))
    return torch.cat(got, 1)


def targets(composed):
    graph = decoder_for(composed, 2, 12).module.graph
    return [n.target for n in graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("anchor", ["llama", "qwen2", "mistral"])
def test_llama_like_steps_lose_the_decomposed_norms_rotary_cats_and_counter_writes(anchor):
    fused, plain = targets(compose(anchor, "shared")), targets(compose(anchor, "shared", fuse=False))
    norms = plain.count(aten.rsqrt.default)
    assert norms > 0 and fused.count(aten.rms_norm.default) == norms
    for gone in (aten.pow.Tensor_Scalar, aten.rsqrt.default, aten.copy_.default):
        assert gone not in fused, gone
    assert plain.count(aten.copy_.default) > 0            # the counters' writes, one per layer
    assert fused.count(aten.roll.default) == plain.count(aten.neg.default) > 0
    assert fused.count(aten.neg.default) == 2              # one negated sin per decoded model
    attention = [n for n in decoder_for(compose(anchor, "shared"), 2, 12).module.graph.nodes
                 if n.target == aten.scaled_dot_product_attention.default]
    assert attention and all(n.kwargs.get("enable_gqa") for n in attention)   # 2 query heads a KV head
    assert all(a.op == "call_function" and a.target == aten.index_copy_.default for n in attention for a in n.args[1:3])
    assert len(fused) < len(plain)


def test_the_compiled_step_reads_the_cache_through_grouped_attention_and_shares_the_eager_steps_caches():
    decoder = decoder_for(compose("llama", "shared"), 2, 12)
    eager = [n for n in decoder.module.graph.nodes if n.target == aten.scaled_dot_product_attention.default]
    compiled = [n for n in decoder.to_compile.graph.nodes if n.op == "call_function"]
    assert eager and [n.target for n in compiled].count(F.grouped_attention) == len(eager)
    assert aten.scaled_dot_product_attention.default not in [n.target for n in compiled]
    assert not any(F._repeated_kv(n) for n in compiled)                          # no repeat_kv left
    caches = {id(b) for b in decoder.module.buffers()}
    assert caches and caches == {id(b) for b in decoder.to_compile.buffers()}
    twin = decoder.with_own_caches()
    own = {id(b) for b in twin.module.buffers()}
    assert own == {id(b) for b in twin.to_compile.buffers()} and not own & caches


def test_the_eager_graphs_read_their_weights_flat_the_same_tensors_with_the_same_logits():
    """`decode.flat_attributes`: no dotted attribute path left for fx's code to walk at each call; the
    tensors are the graph torch.compile gets (no copy), and a twin with the paths gives the same logits."""
    composed = compose("llama", "shared")
    decoder = decoder_for(composed, 2, 12)
    for graph in (decoder.module, decoder.step):
        reads = [n.target for n in graph.graph.nodes if n.op == "get_attr"]
        assert reads and not any("." in t for t in reads)
    held = {id(t) for t in (*decoder.to_compile.parameters(), *decoder.to_compile.buffers())}
    assert {id(t) for t in (*decoder.module.parameters(), *decoder.module.buffers())} <= held
    twin = decoder.with_own_caches()     # rows decoded beside: caches of their own, the weights not copied
    weights = {id(p) for p in decoder.module.parameters()}
    assert all({id(p) for p in g.parameters()} == weights for g in (twin.module, twin.to_compile))
    dotted = torch.fx.GraphModule(decoder.to_compile, _with_paths(decoder.module, decoder.to_compile))
    ids, extra = ids_and_prompts("shared")
    want = steps(composed, ids, extra)
    flat, decoder.module = decoder.module, dotted
    try:
        assert torch.equal(steps(composed, ids, extra), want)
    finally:
        decoder.module = flat


def _with_paths(flat: torch.fx.GraphModule, pathed: torch.fx.GraphModule) -> torch.fx.Graph:
    """`flat`'s graph with each attribute read by its path in `pathed` (which holds the same tensors)."""
    path = {id(t): name for name, t in (*pathed.named_parameters(), *pathed.named_buffers())}
    graph = copy.deepcopy(flat.graph)
    for node in graph.nodes:
        if node.op == "get_attr" and isinstance(getattr(flat, node.target), torch.Tensor):
            node.target = path[id(getattr(flat, node.target))]
    return graph


def compiled_steps(composed, ids, extra):
    """`steps`, through the graph torch.compile gets (run eagerly)."""
    decoder, contexts = decoder_for(composed, 2, 12), contexts_of(composed)
    with torch.inference_mode():
        ctx = contexts.module(ids[:, :4], *stages_of(composed).augment(**extra))
        kv = decoder.project(ctx)
        got = [decoder.module(ids[:, :4], torch.arange(4), *ctx, *kv)]     # the prefill is the eager graph's
        for t in range(4, ids.shape[1]):
            got.append(decoder.to_compile(ids[:, t:t + 1], torch.tensor([t]), *ctx, *kv))
    return torch.cat(got, 1)


@pytest.mark.parametrize("mode", ["shared", "prompt"])
@pytest.mark.parametrize("anchor", ["llama", "qwen2", "mistral"])
def test_the_compiled_steps_graph_gives_the_eager_steps_logits(anchor, mode):
    composed = compose(anchor, mode)
    ids, extra = ids_and_prompts(mode)
    torch.testing.assert_close(compiled_steps(composed, ids, extra), steps(composed, ids, extra),
                               rtol=1e-5, atol=1e-5)


def _attention_ops(module, *args, wrap=lambda compiled: compiled) -> set[str]:
    """The attention ops of `module`'s graph as torch.compile hands it to a backend (after AOT decomposition),
    the compiled module called through `wrap`."""
    from torch._dynamo.backends.common import aot_autograd
    seen = set()

    def capture(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    wrap(torch.compile(module, backend=aot_autograd(fw_compiler=capture)))(*args)
    return {op for op in seen if "attention" in op or "softmax" in op}


@pytest.mark.parametrize("mode", ["shared", "prompt"])
def test_the_compiled_step_traces_attention_as_math_and_keeps_the_tokens(mode, monkeypatch):
    """Every attention of the compiled step reaches the compiler as matmuls and a softmax, which inductor fuses
    with what surrounds them: the models' through `grouped_attention` (a graph rewrite), the links' through it
    too (`LinkCache` and `Attend` while compiling). With MATH_ATTENTION off, a step holds SDPA's fused kernel."""
    composed = compose("llama", mode)
    ids, extra = ids_and_prompts(mode, seed=42, length=6)
    eager = composed.generate(ids, 5, cache=True, **extra)

    def ops(decoder, rows, wrap=decode.MathAttention):
        torch._dynamo.reset()
        with torch.inference_mode():
            rows_extra = {k: v[:rows] for k, v in extra.items()}
            ctx = contexts_of(composed).module(ids[:rows, :4], *stages_of(composed).augment(**rows_extra))
            args = (ids[:rows, 4:5], torch.tensor([4]), *ctx, *decoder.project(ctx))
            return _attention_ops(copy.deepcopy(decoder.to_compile), *args, wrap=wrap)
    math = ops(decoder_for(composed, 2, 12), 2)
    assert "aten._softmax.default" in math and not any("scaled_dot_product" in op for op in math)
    assert "aten._safe_softmax.default" not in math                    # what SDPA's math decomposes to
    monkeypatch.setattr(decode, "MATH_ATTENTION", False)
    fused = ops(decoder_for(composed, 1, 12), 1, wrap=lambda compiled: compiled)   # built without the rewrite
    assert any("_scaled_dot_product_flash_attention" in op for op in fused)      # CPU's fused kernel
    monkeypatch.setattr(decode, "MATH_ATTENTION", True)
    from torch._dynamo.backends.common import aot_autograd
    compiled = composed.generate(ids, 5, cache=True, compile_step={"backend": aot_autograd(fw_compiler=lambda gm, _: gm)},
                                 **extra)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("mode", ["shared", "prompt"])
@pytest.mark.parametrize("anchor", ["mistral", "qwen2"])  # llama, gpt2 and qwen2 in shared mode: test_generate_cached
def test_fused_steps_give_the_logits_of_full_forwards(anchor, mode):
    composed = compose(anchor, mode)
    ids, extra = ids_and_prompts(mode)
    with torch.inference_mode():
        full = composed(ids, **extra)
    torch.testing.assert_close(steps(composed, ids, extra), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["shared", "prompt"])
@pytest.mark.parametrize("anchor", ["llama"])
def test_fused_steps_equal_unfused_steps_exactly_on_cpu(anchor, mode, dtype):
    ids, extra = ids_and_prompts(mode)
    fused, plain = compose(anchor, mode, dtype), compose(anchor, mode, dtype, fuse=False)
    assert len(targets(fused)) < len(targets(plain))
    assert torch.equal(steps(fused, ids, extra), steps(plain, ids, extra))


def _under_autocast(family: str, fuse: bool):
    """A `family` anchor (tests/families.py) with a Llama augment, and its step's logits under bf16 autocast,
    from a decoder built under autocast with or without the rewrites."""
    from tests.families import small_model
    torch.manual_seed(0)
    models = {"anchor": small_model(family).eval(), "aug": support.llama(dim=32).eval()}
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "aug", "input": "shared"}],
            "edges": [{"source": "aug", "target": "anchor", "layers": {"every": 1}}]}
    composed = cg.compile(spec, models=models)
    support.randomize_new_parameters(composed, seed=0, std=0.3)
    ids, extra = ids_and_prompts("shared")
    previous, decode.FUSE = decode.FUSE, fuse
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return composed, steps(composed, ids, extra)
    finally:
        decode.FUSE = previous


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "gemma2"])
def test_under_autocast_the_rewrites_leave_the_step_exact(family):
    """Qwen3's and OLMo2's q/k norms and Gemma2's norms after attention cast a linear's output up to float32
    and back: no-ops as traced in float32, real casts of bfloat16 under autocast. A step run under autocast
    is built without the rewrites that judge dtypes as traced (with them, its logits were a bfloat16 rounding
    off those of the step without rewrites); the step run without autocast keeps them."""
    composed, fused = _under_autocast(family, fuse=True)
    _, plain = _under_autocast(family, fuse=False)
    assert torch.equal(fused, plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = [n.target for n in decoder_for(composed, 2, 12).module.graph.nodes]
    outside = [n.target for n in decoder_for(composed, 2, 12).module.graph.nodes]
    assert aten.rms_norm.default not in under and aten.to.dtype in under
    assert aten.rms_norm.default in outside and outside.count(aten.to.dtype) < under.count(aten.to.dtype)


@pytest.mark.parametrize("mode", ["shared", "prompt"])
@pytest.mark.parametrize("anchor", ANCHORS)
def test_fused_greedy_tokens_equal_recomputing(anchor, mode):
    composed = compose(anchor, mode)
    ids, extra = ids_and_prompts(mode, seed=41, length=6)
    cached = composed.generate(ids, 6, cache=True, **extra)
    assert torch.equal(cached, composed.generate(ids, 6, cache=False, **extra))


# -- each pattern alone, on graphs exported from small modules


def exported(module, *args):
    """As the decode graph is traced: export's dtype asserts dropped (`frontends.exported_module`)."""
    return exported_module(torch.export.export(module.eval(), args, strict=False))


class Rms(nn.Module):
    """transformers' RMSNorm, with the knobs the pattern must check."""

    def __init__(self, dim=8, dims=-1, power=2, upcast=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))
        self.dims, self.power, self.upcast = dims, power, upcast

    def forward(self, x):
        h = x.to(torch.float32) if self.upcast else x
        h = h * torch.rsqrt(h.pow(self.power).mean(self.dims, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_is_fused_and_exact(dtype):
    torch.manual_seed(0)
    module, x = Rms().to(dtype), torch.randn(2, 3, 8, dtype=dtype)
    gm = exported(module, x)
    F.drop_noop_casts(gm.graph)
    assert F.fuse_rms_norm(gm.graph, gm) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.rsqrt.default not in ops and aten.rms_norm.default in ops
    assert torch.equal(gm(x), module(x))
    # with the weight folded in where nothing rounds between (float32), apart (rounded first) in bfloat16
    weighted = [n for n in gm.graph.nodes if n.target == aten.rms_norm.default][0].args[2]
    assert (weighted is not None) == (dtype == torch.float32)


@pytest.mark.parametrize("module", [Rms(dims=0), Rms(power=3), Rms(upcast=False)], ids=["not_last_dim", "cube", "no_upcast"])
def test_rms_norm_near_misses_are_left_alone(module):
    x = torch.randn(4, 3, 8, dtype=torch.bfloat16 if not module.upcast else torch.float32)
    gm = exported(module.to(x.dtype), x)
    before = str(gm.graph)
    assert F.fuse_rms_norm(gm.graph, gm) == 0
    assert str(gm.graph) == before


class NormedProducts(nn.Module):
    """An RMSNorm read by linears (a block's q/k/v); `bias`: one with a bias (Qwen2's), `residual`: the norm
    read by an add as well."""

    def __init__(self, dim=16, bias=False, residual=False):
        super().__init__()
        self.norm, self.residual = Rms(dim), residual
        self.q, self.k = nn.Linear(dim, 24, bias=False), nn.Linear(dim, 8, bias=bias)

    def forward(self, x):
        h = self.norm(x)
        return self.q(h), self.k(h) + (h[..., :8] if self.residual else 0)


def _scaled_past(module, x):
    gm = exported(module, x)
    F.drop_noop_casts(gm.graph)
    F.fuse_rms_norm(gm.graph, gm)
    count = F.scale_past_products(gm.graph, gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, count


@pytest.mark.parametrize("bias", [False, True], ids=["bias_free", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_norms_scale_moves_past_its_products(dtype, bias):
    """`linear(rms_norm(x) * g, W)` -> `linear(x * g, W) * rsqrt(mean(x ** 2) + eps)`: no norm is left, and the
    result is the norm's up to rounding: in float32 to a sum's rounding; in bfloat16 about as far from a float64
    run as the norm as written (three roundings either way, in other places: 0.89-1.08x its error over 20
    seeds), where a wrong scale would be far off."""
    torch.manual_seed(0)
    module, x = NormedProducts(bias=bias).to(dtype), torch.randn(3, 5, 16, dtype=dtype) * 3
    gm, count = _scaled_past(module, x)
    assert count == 1
    assert aten.rms_norm.default not in [n.target for n in gm.graph.nodes]
    got, want = gm(x), module(x)
    assert [g.dtype for g in got] == [dtype, dtype]
    wide = copy.deepcopy(module).double()(x.double())
    for g, w, ref in zip(got, want, wide):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        else:
            assert (g.double() - ref).norm() <= (w.double() - ref).norm() * 1.25


def test_a_norm_read_other_than_by_products_keeps_its_scale():
    x = torch.randn(2, 3, 16)
    gm, count = _scaled_past(NormedProducts(residual=True), x)
    assert count == 0 and aten.rms_norm.default in [n.target for n in gm.graph.nodes]


@pytest.mark.parametrize("anchor, mode", [("llama", "shared"), ("qwen2", "prompt")])   # qwen2: biased q/k/v
def test_with_scale_past_products_the_compiled_step_has_no_norm_and_keeps_the_tokens(anchor, mode, monkeypatch):
    """With SCALE_PAST_PRODUCTS (read when a decoder is built) the step torch.compile gets computes no RMSNorm
    (each scaled past its products), the eager step keeps them; in float32 its logits are the eager step's to a
    sum's rounding, and its tokens equal them."""
    monkeypatch.setattr(decode, "SCALE_PAST_PRODUCTS", True)
    composed = compose.__wrapped__(anchor, mode)                          # its decoders built with the flag
    ids, extra = ids_and_prompts(mode, seed=42, length=6)
    eager = composed.generate(ids, 5, cache=True, **extra)
    decoder = decoder_for(composed, 2, 12)
    norms = lambda gm: sum(n.target == aten.rms_norm.default for n in gm.graph.nodes)
    assert norms(decoder.to_compile) == 0 and norms(decoder.module) > 0
    logits_ids, logits_extra = ids_and_prompts(mode)
    torch.testing.assert_close(compiled_steps(composed, logits_ids, logits_extra),
                               steps(composed, logits_ids, logits_extra), rtol=1e-5, atol=1e-5)
    from torch._dynamo.backends.common import aot_autograd
    torch._dynamo.reset()
    compiled = composed.generate(ids, 5, cache=True, compile_step={"backend": aot_autograd(fw_compiler=lambda gm, _: gm)},
                                 concat_projections=True, **extra)
    assert torch.equal(compiled, eager)


class Rotate(nn.Module):
    def __init__(self, flip=False):
        super().__init__()
        self.flip = flip

    def forward(self, x, cos, sin):
        x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        rotated = torch.cat((x1, -x2) if self.flip else (-x2, x1), dim=-1)
        return x * cos + rotated * sin


def test_rotary_by_roll_is_exact_and_a_near_miss_is_left_alone():
    torch.manual_seed(0)
    args = (torch.randn(2, 4, 3, 8), torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8))
    gm = exported(Rotate(), *args)
    assert F.roll_rotary(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert aten.roll.default in [n.target for n in gm.graph.nodes]
    assert torch.equal(gm(*args), Rotate()(*args))
    for module, near in ((Rotate(flip=True), args), (Rotate(), (*args[:2], torch.randn(2, 1, 3, 1)))):
        gm = exported(module, *near)          # halves the other way round; a sin broadcast along the last dim
        before = str(gm.graph)
        assert F.roll_rotary(gm.graph) == 0 and str(gm.graph) == before


class Grouped(nn.Module):
    """SDPA over KV heads repeated for grouped queries: transformers' `repeat_kv` (head i reads KV head
    i // n), or tiled (head i reads KV head i % h: another pairing, which `enable_gqa` would get wrong)."""

    def __init__(self, tiled=False, dropout=0.0):
        super().__init__()
        self.tiled, self.dropout = tiled, dropout

    def forward(self, q, k, v, mask):
        def repeat(x, n=2):
            b, h, s, d = x.shape
            if self.tiled:
                return x[:, None].expand(b, n, h, s, d).reshape(b, n * h, s, d)
            return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)
        return torch.nn.functional.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=mask, scale=0.3,
                                                                dropout_p=self.dropout)


def test_grouped_queries_read_the_cache_unrepeated_exactly_and_a_tiling_is_left_alone():
    torch.manual_seed(0)
    args = (torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.rand(3, 5) > 0.3)
    gm = exported(Grouped(), *args)
    assert F.sdpa_gqa(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert aten.expand.default not in [n.target for n in gm.graph.nodes]
    assert torch.equal(gm(*args), Grouped()(*args))
    gm = exported(Grouped(tiled=True), *args)
    before = str(gm.graph)
    assert F.sdpa_gqa(gm.graph) == 0 and str(gm.graph) == before


def sdpa_repeated(q, k, v, mask, scale):
    n = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(n, 1), v.repeat_interleave(n, 1), attn_mask=mask, scale=scale)


@pytest.mark.parametrize("mask", ["none", "bool", "bool_per_head", "additive", "two_dims"])
@pytest.mark.parametrize("queries", [1, 3])
def test_grouped_attention_is_sdpa_over_repeated_kv_heads(mask, queries):
    """Against SDPA over the KV heads repeated (head i reads KV head i // n), in float64: masks of one head, of
    every head, additive, and of two dims; one query a row (a decode step) and several."""
    g = torch.Generator().manual_seed(queries)
    b, h, groups, s, d = 2, 6, 2, 7, 8
    q, k, v = (torch.randn(b, heads, t, d, generator=g, dtype=torch.float64)
               for heads, t in ((h, queries), (groups, s), (groups, s)))
    allowed = torch.rand(b, h, queries, s, generator=g) > 0.3
    allowed[..., -1] = True                                                      # every row attends somewhere
    masks = {"none": None, "bool": allowed[:, :1], "bool_per_head": allowed, "two_dims": allowed[0, 0],
             "additive": torch.randn(b, 1, queries, s, generator=g, dtype=torch.float64)}
    for scale in (None, 0.3):
        got = F.grouped_attention(q, k, v, masks[mask], scale)
        torch.testing.assert_close(got, sdpa_repeated(q, k, v, masks[mask], scale), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask", ["none", "bool", "bool_per_head", "additive", "two_dims"])
def test_flex_grouped_attention_is_sdpa_over_repeated_kv_heads(mask):
    """`flex_grouped_attention` compiled (what a step with FLEX_ATTENTION runs) against SDPA over the KV heads
    repeated, in float32: the masks of `grouped_attention`'s test, one query a row and several; KV heads grouped
    and not."""
    g = torch.Generator().manual_seed(1)
    torch._dynamo.reset()                                                        # a compile per shape and scale
    flex = torch.compile(F.flex_grouped_attention, fullgraph=True, backend="aot_eager")
    for queries, groups in ((1, 2), (3, 6)):
        b, h, s, d = 2, 6, 7, 16
        q, k, v = (torch.randn(b, heads, t, d, generator=g) for heads, t in ((h, queries), (groups, s), (groups, s)))
        allowed = torch.rand(b, h, queries, s, generator=g) > 0.3
        allowed[..., -1] = True                                                  # every row attends somewhere
        masks = {"none": None, "bool": allowed[:, :1], "bool_per_head": allowed, "two_dims": allowed[0, 0],
                 "additive": torch.randn(b, 1, queries, s, generator=g)}
        for scale in (None, 0.3):
            torch.testing.assert_close(flex(q, k, v, masks[mask], scale), sdpa_repeated(q, k, v, masks[mask], scale),
                                       rtol=1e-5, atol=1e-5)
    got = flex(q.bfloat16(), k, v, masks[mask])                                 # a query in another dtype (autocast)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sdpa_repeated(q.bfloat16().float(), k, v, masks[mask], None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["shared", "prompt"])
def test_with_flex_attention_the_compiled_step_attends_through_flex_and_keeps_the_tokens(mode, monkeypatch):
    """With FLEX_ATTENTION (read when a decoder is built, and when its step compiles) every attention of the
    compiled step reaches the compiler as flex_attention, the models' and the links', none as a softmax, all
    with one block mask, inputs of the step (none built in it: no fills, no sort); in fp32 its tokens are the
    eager step's."""
    monkeypatch.setattr(decode, "FLEX_ATTENTION", True)
    monkeypatch.setattr(F, "_NOOP_BLOCK_MASKS", {})
    composed = compose.__wrapped__("llama", mode)                         # its decoders built with the flag
    ids, extra = ids_and_prompts(mode, seed=42, length=6)
    eager = composed.generate(ids, 5, cache=True, **extra)
    from torch._dynamo.backends.common import aot_autograd
    seen, block_masks = set(), []

    def capture(gm, _):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        for n in gm.graph.nodes:   # a block mask: its lengths, tensors, block sizes and mask_mod's graph
            if "flex_attention" in str(n.target):
                block_masks.append([(a.op, a.name) for a in n.args[4][2:-3] if isinstance(a, torch.fx.Node)])
        return gm
    torch._dynamo.reset()
    compiled = composed.generate(ids, 5, cache=True, compile_step={"backend": aot_autograd(fw_compiler=capture)},
                                 **extra)
    assert torch.equal(compiled, eager)
    assert {op for op in seen if "attention" in op or "softmax" in op} == {"flex_attention"}
    assert not {op for op in seen if "sort" in op or "ones" in op or "index_put" in op}
    assert block_masks[0] and {op for op, _ in block_masks[0]} == {"placeholder"}   # the step's inputs,
    assert all(m == block_masks[0] for m in block_masks)                              # every attention's
    assert list(F._NOOP_BLOCK_MASKS) == ["cpu"]
    rewritten = [n.target for n in decoder_for(composed, 2, 12).to_compile.graph.nodes]
    assert F.flex_grouped_attention in rewritten and F.grouped_attention not in rewritten


def test_grouped_attention_in_bf16_is_transformers_eager_attention():
    """In bf16, products in bf16 and the softmax in fp32, as transformers' eager attention computes it."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, t, 16, generator=g).bfloat16() for heads, t in ((8, 1), (2, 9), (2, 9)))
    allowed = torch.rand(2, 1, 1, 9, generator=g) > 0.3
    allowed[..., -1] = True
    additive = torch.zeros(allowed.shape, dtype=torch.bfloat16).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    module = nn.Module()
    module.num_key_value_groups, module.training = 4, False
    reference, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.25)
    got = F.grouped_attention(q, k, v, allowed, 0.25)
    torch.testing.assert_close(got.transpose(1, 2), reference, rtol=0, atol=0)
    exact = sdpa_repeated(*(t.double() for t in (q, k, v)), allowed, 0.25)
    torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=2e-2)       # bf16's rounding


def test_sdpa_over_repeated_kv_becomes_grouped_attention_and_a_tiling_or_dropout_is_left_alone():
    torch.manual_seed(0)
    args = (torch.randn(2, 4, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.rand(3, 5) > 0.3)
    args[3][:, -1] = True
    gm = exported(Grouped(), *args)
    assert F.grouped_attention_of(gm.graph) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert aten.expand.default not in [n.target for n in gm.graph.nodes]
    torch.testing.assert_close(gm(*args), Grouped()(*args), rtol=1e-6, atol=1e-6)
    for module in (Grouped(tiled=True), Grouped(dropout=0.1)):
        gm = exported(module, *args)
        before = str(gm.graph)
        assert F.grouped_attention_of(gm.graph) == 0 and str(gm.graph) == before


def test_a_gpt2_decode_graph_has_no_norm_or_rotary_to_rewrite():
    """GPT-2: LayerNorm, learned positions. Its norms and attention stay as traced."""
    composed = compose("gpt2", "prompt", fuse=False)
    graph = decoder_for(composed, 2, 12).module.graph
    root = decoder_for(composed, 2, 12).module
    before = str(graph)
    assert F.fuse_rms_norm(graph, root) == 0 and F.roll_rotary(graph) == 0
    assert str(graph) == before
    assert aten.layer_norm.default in [n.target for n in graph.nodes]


@pytest.mark.parametrize("mode", ["shared", "prompt"])
@pytest.mark.parametrize("anchor", ANCHORS)
def test_decode_graphs_of_identical_blocks_share_one_trace(anchor, mode, monkeypatch):
    """Each decoded model is traced with two blocks and the second copied for the rest, each copy reading
    and writing its own cache layer (keys, values, length): the same ops as the full trace, and the same
    logits bit for bit at every step."""
    taken = []
    def spy(*args):
        gm = shared.trace_shared(*args)
        taken.append(gm is not None)
        return gm
    monkeypatch.setattr(decode, "trace_shared", spy)
    composed = compose(anchor, mode)
    taken.clear()                                              # (compose may have built its decoder here)
    decode._traced(composed, "anchor", 2, 32)
    assert taken == [True]                                     # the anchor's 4 blocks: 2 traced, 2 copied

    full = compose(anchor, mode, share=False)
    ids, extra = ids_and_prompts(mode)
    once = steps(composed, ids, extra)
    assert torch.equal(once, steps(full, ids, extra))
    assert torch.equal(steps(composed, ids, extra), once)            # again from position 0: every counter reset
    assert targets(composed) == targets(full)
    module = decoder_for(composed, 2, 12).module
    written = [_attr(module, n.args[0].target).data_ptr() for n in module.graph.nodes
               if n.target == aten.index_copy_.default]
    assert len(written) == len(set(written)) >= 2 * 4                # every layer writes its own keys and values


def _attr(module, target):
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)

"""The GPU generation scripts, run on tiny shapes on the CPU: generate_scale.py's report, step_kernels.py's
linear rewrites (the tokens they decode), compile_cache.py's round trip, decode_trace_time.py's report."""
import json
import math
import statistics

import pytest
import torch

import calmgraph.generation.decode as decode
from benchmarks import compile_cache, decode_trace_time, generate_scale, step_kernels

TINY = ["--device", "cpu", "--dtype", "fp32", "--vocab", "300", "--prompt", "6", "--new", "24", "--every", "1",
        "--anchor", "64", "2", "4", "2", "128", "--augment", "32", "2", "4", "2", "64"]


def test_generate_scale_quick(tmp_path):
    out = tmp_path / "scale.json"
    generate_scale.main([*TINY, "--batch", "1", "2", "--modes", "shared", "--variants", "cached", "recompute",
                         "--rounds", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] and report["compile_cache_loaded_bytes"] == 0
    names = ["transformers_anchor_alone", "cached", "recompute"]
    assert [(r["batch"], r["variant"]) for r in report["first_calls"]] == [(b, n) for b in (1, 2) for n in names]
    assert [(r["batch"], r["variant"]) for r in report["results"]] == [(b, n) for b in (1, 2) for n in names]
    for r in report["results"]:
        assert r["tokens"] == 24 and len(r["seconds"]) == len(r["first_token_seconds"]) == 2
        # the rates are the rounds' medians (timings, so the test checks the arithmetic, not the speed)
        assert r["tokens_per_s_per_sequence"] == pytest.approx(24 / statistics.median(r["seconds"]), rel=0.01)
        after = statistics.median(s - f for s, f in zip(r["seconds"], r["first_token_seconds"]))
        if abs(after) > 1e-3:   # else the report's 4-decimal seconds cannot tell its sign
            decode = r["decode_tokens_per_s_per_sequence"]
            assert decode == pytest.approx(23 / after, rel=0.02) if after > 0 else math.isnan(decode)
        if r["variant"] == "transformers_anchor_alone":   # its decode rate is NaN where the rounds' timings tied
            assert r["vs_anchor_alone"] == 1.0
            assert r["decode_vs_anchor_alone"] == 1.0 or math.isnan(r["decode_tokens_per_s_per_sequence"])


def test_generate_scale_eos_variants_share_the_compiled_step(tmp_path):
    """The eos variants (dynamo's eager backend here) decode every token with an eos that no row emits."""
    out = tmp_path / "eos.json"
    generate_scale.main([*TINY, "--batch", "2", "--modes", "prompt", "--variants", "compiled", "compiled_eos",
                         "compiled_eos_at_once", "--step-options", '{"backend": "eager"}', "--rounds", "1",
                         "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["shapes"]["eos"] == 299
    tokens = {r["variant"]: r["tokens"] for r in report["results"]}
    assert tokens == {"transformers_anchor_alone": 24, "compiled": 24, "compiled_eos": 24, "compiled_eos_at_once": 24}


def test_generate_scale_alt_step_options_compile_a_second_step_beside(tmp_path):
    """compiled_alt: another compile of the step, on a twin composition, gives the compiled variant's tokens."""
    out = tmp_path / "alt.json"
    eager = '{"backend": "eager"}'
    generate_scale.main([*TINY, "--batch", "2", "--modes", "shared", "--variants", "compiled", "compiled_alt",
                         "--step-options", eager, "--alt-step-options", '{"backend": "aot_eager"}', "--rounds", "1",
                         "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["alt_step_options"] == {"backend": "aot_eager"}
    alt = next(f for f in report["first_calls"] if f["variant"] == "compiled_alt")
    assert alt["tokens"] == 24 and alt["tokens_equal_to_compiled"] == 1.0
    with pytest.raises(SystemExit):
        generate_scale.parse([*TINY, "--variants", "compiled_alt"])
    with pytest.raises(SystemExit):
        generate_scale.parse([*TINY, "--variants", "compiled", "--alt-concat-projections"])


def test_generate_scale_flex_attention_variant_decodes_the_compiled_tokens(tmp_path):
    """compiled_flex_attention: the step on a composition of its own, built and compiled with
    `decode.FLEX_ATTENTION` (AOTAutograd's eager backend here: CPU inductor cannot lower this flex_attention),
    gives the compiled variant's tokens; the flag is off again after."""
    out = tmp_path / "flex.json"
    generate_scale.main([*TINY, "--batch", "2", "--modes", "shared", "--variants", "compiled",
                         "compiled_flex_attention", "--step-options", '{"backend": "aot_eager"}', "--rounds", "1",
                         "--out", str(out)])
    flex = next(f for f in json.loads(out.read_text())["first_calls"] if f["variant"] == "compiled_flex_attention")
    assert flex["tokens"] == 24 and flex["tokens_equal_to_compiled"] == 1.0
    assert decode.FLEX_ATTENTION is False


def test_generate_scale_scale_past_products_variant_decodes_the_compiled_tokens(tmp_path):
    """compiled_scale_past_products: the step built with `decode.SCALE_PAST_PRODUCTS` on a composition of its
    own gives the compiled variant's tokens (fp32); the flag is off again after."""
    out = tmp_path / "scaled.json"
    generate_scale.main([*TINY, "--batch", "2", "--modes", "shared", "--variants", "compiled",
                         "compiled_scale_past_products", "--step-options", '{"backend": "aot_eager"}', "--rounds",
                         "1", "--out", str(out)])
    scaled = next(f for f in json.loads(out.read_text())["first_calls"]
                  if f["variant"] == "compiled_scale_past_products")
    assert scaled["tokens"] == 24 and scaled["tokens_equal_to_compiled"] == 1.0
    assert decode.SCALE_PAST_PRODUCTS is False


def test_a_variant_whose_first_call_fails_is_reported_and_the_rest_are_timed(tmp_path, monkeypatch):
    """A variant that cannot compile on the card (here one whose call raises) leaves its error in first_calls
    and no result; the other variants are still timed, and the report is complete."""
    def broken(*args, **flags):
        def call(n):
            raise RuntimeError("no kernel choice for these shapes")
        return call
    monkeypatch.setattr(generate_scale, "flagged", broken)
    out = tmp_path / "broken.json"
    generate_scale.main([*TINY, "--batch", "2", "--modes", "shared", "--variants", "cached",
                         "compiled_flex_attention", "--rounds", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"]
    failed = [f for f in report["first_calls"] if "error" in f]
    assert failed == [{"mode": "shared", "batch": 2, "variant": "compiled_flex_attention",
                       "error": "RuntimeError: no kernel choice for these shapes"}]
    assert [r["variant"] for r in report["results"]] == ["transformers_anchor_alone", "cached"]


def test_generate_scale_prefill_options_compile_the_prefill_so(tmp_path, monkeypatch):
    """--prefill-options: the compiled_prefill variant's prefill is compiled with them (here dynamo's eager
    backend, counted), recorded in the report, with the compiled variant's tokens."""
    import torch._dynamo.testing
    counter = torch._dynamo.testing.CompileCounter()
    registry = torch._dynamo.backends.registry                     # a backend by name, as JSON can give one
    monkeypatch.setitem(registry._BACKENDS, "counted", None)
    monkeypatch.setitem(registry._COMPILER_FNS, "counted", counter)
    out = tmp_path / "prefill.json"
    generate_scale.main([*TINY, "--batch", "2", "--modes", "prompt", "--variants", "compiled", "compiled_prefill",
                         "--step-options", '{"backend": "eager"}', "--prefill-options", '{"backend": "counted"}',
                         "--rounds", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["compile_prefill"] == {"backend": "counted"} and counter.frame_count >= 1
    prefill = next(f for f in report["first_calls"] if f["variant"] == "compiled_prefill")
    assert prefill["tokens"] == 24 and prefill["tokens_equal_to_compiled"] == 1.0


def test_generate_scale_alt_prefill_options_compile_the_alt_prefill_alone(tmp_path, capsys):
    """--alt-prefill-options: compiled_alt's prefill compiled so (here dynamo's eager backend, counted), beside
    compiled_prefill's own options, each on its own composition; the tokens are compiled's. Without compiled_alt
    among the variants it is refused, naming the flag."""
    import torch._dynamo.testing
    counters = {"prefill": torch._dynamo.testing.CompileCounter(), "alt": torch._dynamo.testing.CompileCounter()}
    registry = torch._dynamo.backends.registry
    with pytest.MonkeyPatch.context() as patch:
        for name, counter in counters.items():
            patch.setitem(registry._BACKENDS, f"counted_{name}", None)
            patch.setitem(registry._COMPILER_FNS, f"counted_{name}", counter)
        out = tmp_path / "alt_prefill.json"
        generate_scale.main([*TINY, "--batch", "2", "--modes", "shared", "--variants", "compiled", "compiled_prefill",
                             "compiled_alt", "--step-options", '{"backend": "eager"}', "--alt-step-options",
                             '{"backend": "eager"}', "--prefill-options", '{"backend": "counted_prefill"}',
                             "--alt-prefill-options", '{"backend": "counted_alt"}', "--rounds", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["alt_prefill_options"] == {"backend": "counted_alt"}
    assert counters["prefill"].frame_count >= 1 and counters["alt"].frame_count >= 1
    for name in ("compiled_prefill", "compiled_alt"):
        first = next(f for f in report["first_calls"] if f["variant"] == name)
        assert first["tokens"] == 24 and first["tokens_equal_to_compiled"] == 1.0
    with pytest.raises(SystemExit):
        generate_scale.parse([*TINY, "--variants", "compiled", "--alt-prefill-options", "true"])
    assert "--alt-prefill-options changes the compiled_alt variant" in capsys.readouterr().err


def test_step_kernels_refuses_two_attentions_at_once(capsys):
    """--fused-attention and --flex-attention name two attentions of the step: refused before any model is built."""
    with pytest.raises(SystemExit):
        step_kernels.main(["--fused-attention", "--flex-attention"])
    assert "--fused-attention and --flex-attention are two attentions of the step: give one" in capsys.readouterr().err


def test_generate_scale_alt_concat_projections_concatenate_the_alt_step_alone(tmp_path, monkeypatch):
    """--alt-concat-projections: compiled_alt's step computes each block's q/k/v and gate/up as one product
    each (fewer linears in the step it compiles), with the compiled step's tokens."""
    from calmgraph.generation import decode
    seen = []
    concatenated = decode._concatenated
    monkeypatch.setattr(decode, "_concatenated", lambda step, concat: seen.append(step) or concatenated(step, concat))
    out = tmp_path / "alt.json"
    eager = '{"backend": "eager"}'
    generate_scale.main([*TINY, "--batch", "1", "--modes", "shared", "--variants", "compiled", "compiled_alt",
                         "--step-options", eager, "--alt-step-options", eager, "--alt-concat-projections",
                         "--rounds", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["alt_concat_projections"] is True and report["concat_projections"] is False
    assert len(seen) == 1                                       # compiled_alt's decoder alone
    alt = next(f for f in report["first_calls"] if f["variant"] == "compiled_alt")
    assert alt["tokens_equal_to_compiled"] == 1.0


def test_generate_scale_ragged_rows(tmp_path):
    """--ragged: rows of 6, 4 and 2 prompt tokens, one decoder and a decoder per length, beside transformers
    given the same padding."""
    out = tmp_path / "ragged.json"
    generate_scale.main([*TINY, "--batch", "3", "--ragged", "2", "--modes", "shared", "--variants", "cached",
                         "cached_per_length", "--rounds", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] and report["shapes"]["ragged"] == 2
    assert {r["variant"]: r["tokens"] for r in report["results"]} == {
        "transformers_anchor_alone": 24, "cached": 24, "cached_per_length": 24}


def test_per_length_decodes_the_ragged_rows_tokens_with_a_decoder_per_length():
    from calmgraph.generation.generate import _entry
    anchor = generate_scale.llama([64, 2, 4, 2, 128], 300, torch.float32, "cpu", 0)
    augment = generate_scale.llama([32, 2, 4, 2, 64], 300, torch.float32, "cpu", 1)
    composed = generate_scale.compose(anchor, augment, "shared", 1)
    ids = torch.randint(3, 300, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(7) >= 2 * torch.arange(3)[:, None]).long()
    call = lambda n: composed.generate(ids, n, cache=True, attention_mask=mask)  # noqa: E731
    one = call(5)
    assert [key[:2] for key in _entry(composed)["decoders"]] == [(3, 32)]        # the three rows in one
    assert torch.equal(generate_scale.per_length(composed, call)(5), one)
    assert sorted(key[:2] for key in _entry(composed)["decoders"]) == [(1, 32)] * 3 + [(3, 32)]
    assert _entry(composed)["ragged"]                                            # restored after the call


def test_linear_rewrites_keep_the_tokens(monkeypatch, capsys):
    """Each linear of the compiled step rewritten as a bmm or a sum (the step run by dynamo's eager backend)
    decodes the tokens of the step as built."""
    anchor = generate_scale.llama([64, 2, 4, 2, 128], 300, torch.float32, "cpu", 0)
    augment = generate_scale.llama([32, 2, 4, 2, 64], 300, torch.float32, "cpu", 1)
    ids = torch.randint(3, 300, (3, 7), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    expected = generate_scale.compose(anchor, augment, "shared", 1).generate(ids, 6, cache=True)
    built = decode.Decoder.compiled
    rewrites = {f"linear_as_{how}: 29 linears": step_kernels.linears_as(how)   # 7 a block x 4 blocks + the head
                for how in step_kernels.REWRITES}
    for said, rewrite in rewrites.items():
        monkeypatch.setattr(decode.Decoder, "compiled", built)   # each rewrite alone; undone after the test
        step_kernels.with_step_rewrite(decode.Decoder, rewrite)
        torch.manual_seed(5)
        composed = generate_scale.compose(anchor, augment, "shared", 1)
        got = composed.generate(ids, 6, cache=True, compile_step={"backend": "eager"})
        assert said in capsys.readouterr().err
        assert torch.equal(got, expected)


def test_compile_cache_round_trip(tmp_path):
    """What one process compiled, saved in parts, loads in a fresh cache and is hit there."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    def f(x):
        return torch.sin(x) * 2 + 1
    x = torch.randn(8)
    with fresh_cache():
        torch._dynamo.reset()
        torch.compile(f)(x)
        saved = compile_cache.save(tmp_path)
    assert saved > 0 and list(tmp_path.glob(compile_cache.NAME + "*"))
    with pytest.raises(FileNotFoundError, match="no compile cache folder"):
        compile_cache.load(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    assert compile_cache.load(tmp_path / "empty") == 0
    with fresh_cache():
        torch._dynamo.reset()
        counters.clear()
        assert compile_cache.load(tmp_path) == saved
        torch.testing.assert_close(torch.compile(f)(x), f(x))
        assert counters["inductor"]["fxgraph_cache_hit"] == 1


@pytest.mark.parametrize("ragged, why", [("3", "row 2's prompt of 6 tokens would be all padding"),
                                         ("-1", "is not a number of tokens")])
def test_generate_scale_refuses_a_ragged_shift_it_cannot_run_before_building_anything(ragged, why, capsys):
    with pytest.raises(SystemExit) as exit:
        generate_scale.main([*TINY, "--batch", "1", "3", "--ragged", ragged])
    assert exit.value.code == 2
    assert f"--ragged {ragged}: {why}; give --ragged from 0 to 2" in capsys.readouterr().err


def test_decode_trace_time_builds_both_decoders(tmp_path, monkeypatch):
    """Its models' weights are real numbers: generate checks each decode trace against the model's forward."""
    monkeypatch.setitem(decode_trace_time.SHAPES, "tiny", (64, 4, 4, 2, 128))   # every 4th block read
    out = tmp_path / "trace.json"
    assert decode_trace_time.main(["--pair", "tiny+tiny", "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["decoded"] == ["augment", "anchor"]
    assert all(len(v) == 2 and all(s > 0 for s in v) for v in result["seconds"].values())

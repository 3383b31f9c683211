"""Generation at LLM scale: tokens/s per sequence of `composed.generate` beside transformers' `generate` of
the anchor alone, in the same process, greedy, no early stop.

    python benchmarks/generate_scale.py --device cuda --dtype bf16 --batch 1 8 --out benchmarks/results/generate_scale_gpu.json

The default shapes: a TinyLlama-1.1B-shaped anchor (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632) and a 0.25B Llama-shaped augment (hidden 1024, 16 layers, 16 heads, 4 KV heads,
intermediate 2816), random weights, every 4th augment block read, 128 new tokens after a 128-token prompt.
Both modes: the augment reading the anchor's tokens (`shared`, the paper's) and reading a prompt of its own
(`prompt`, here the same tokens). Variants: `cached` (the KV-cache decode graph, eager), `compiled`
(`compile_step=True`), `compiled_prefill` (the same with `compile_prefill=True`; it shares `compiled`'s
decoders, and so its compiled step), `compiled_fused_attention` (the same step with its attention left to
SDPA's fused kernels, `decode.MATH_ATTENTION` off, on a composition of its own), `compiled_flex_attention`
(likewise, with `decode.FLEX_ATTENTION`: torch's flex_attention), `compiled_scale_past_products` (likewise,
with `decode.SCALE_PAST_PRODUCTS`: each RMSNorm's scale applied past its products), `compiled_eos` (`compiled`
with `--eos` as eos_token_id: a row may finish, so whether all have is checked, a few steps late as generate
does with a compiled step on a GPU), `compiled_eos_at_once` (the same, each check read at once: the loop waits
for the GPU at every step), `recompute` (`cache=False`). The eos variants share `compiled`'s step; `--eos`
should be an id the rows do not emit (each variant's `tokens` says whether they did).
Each variant's first call is reported (it traces the decode graph, and compiles; one that raises is reported
with its `error` and left out of the rounds; `compile_caches`: the
hits and misses of torch's compile caches it made; beside `compiled`, the fraction of its tokens equal to
`compiled`'s), its time to the first token is timed warm, then the variants
and transformers alternate for `--rounds` rounds (a call for one token, then one for `--new`) and the medians are reported: tokens/s of the whole call (prefill included) and the
decode rate, `new - 1` tokens over the per-round difference of the two calls (the prefill excluded). The
JSON goes to stdout (and to `--out`, rewritten after each first call and each mode and batch, with `complete`
false until the end); a line per first call and per result to stderr as it comes. `--load-cache` and
`--save-cache` carry torch.compile's caches between processes (`compile_cache.py`). `--concat-projections`
passes `concat_projections=True` with every `compile_step`; `--prefill-options`, the `compiled_prefill`
variant's `compile_prefill`.
`compiled_alt`: the step compiled with `--alt-step-options` instead, on a second composition (decoders of its
own), timed beside `compiled` in the same rounds; `--alt-concat-projections` gives it `concat_projections=True`
alone (`--alt-step-options true`: the same compile options, so the pair measures the concatenation), and
`--alt-prefill-options` a `compile_prefill` (e.g. `compiled_prefill` with a CUDA-graphed prefill beside
`compiled_alt` with the dynamic one, the same step options for both).
`--ragged N`: row i's prompt is `--prompt` - i * N tokens, left-padded (an attention mask; transformers' run
gets it too), which generate decodes in one decoder where the models allow (`generation.generate.ragged_ok`);
the `*_per_length` variants decode the same rows with a decoder per prompt length, as generate did before.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config
import torch._inductor.config

import calmgraph as cg

sys.path.insert(0, str(Path(__file__).parent))
import compile_cache  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the variants run with `decode` flags of their own, each on a composition of its own
FLAGS = {"compiled_fused_attention": {"MATH_ATTENTION": False}, "compiled_flex_attention": {"FLEX_ATTENTION": True},
         "compiled_scale_past_products": {"SCALE_PAST_PRODUCTS": True}}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--anchor", type=int, nargs=5, default=[2048, 22, 32, 4, 5632],
                   metavar=("HIDDEN", "LAYERS", "HEADS", "KV_HEADS", "INTERMEDIATE"))
    p.add_argument("--augment", type=int, nargs=5, default=[1024, 16, 16, 4, 2816],
                   metavar=("HIDDEN", "LAYERS", "HEADS", "KV_HEADS", "INTERMEDIATE"))
    p.add_argument("--every", type=int, default=4, help="read every n-th augment block")
    p.add_argument("--modes", nargs="+", choices=["shared", "prompt"], default=["shared", "prompt"])
    p.add_argument("--variants", nargs="+",
                   choices=["cached", "compiled", "compiled_prefill", "compiled_fused_attention",
                            "compiled_flex_attention", "compiled_scale_past_products", "compiled_eos",
                            "compiled_eos_at_once", "recompute", "cached_per_length", "compiled_per_length",
                            "compiled_alt"],
                   default=["cached", "compiled", "recompute"])
    p.add_argument("--step-options", type=json.loads, default=None, metavar="JSON",
                   help='the compiled variant\'s compile_step (default true: STEP_COMPILE), e.g. '
                        '\'{"options": {"triton.cudagraphs": true, "combo_kernels": true}}\'')
    p.add_argument("--alt-step-options", type=json.loads, default=None, metavar="JSON",
                   help="the compiled_alt variant's compile_step: the step compiled another way, on a twin composition, "
                        "timed beside compiled")
    p.add_argument("--prefill-options", type=json.loads, default=None, metavar="JSON",
                   help='the compiled_prefill variant\'s compile_prefill (default true: PREFILL_COMPILE), e.g. '
                        '\'{"options": {"triton.cudagraphs": true}}\' (a CUDA graph for the one prompt length)')
    p.add_argument("--alt-prefill-options", type=json.loads, default=None, metavar="JSON",
                   help="the compiled_alt variant's compile_prefill (default: none, an eager prefill)")
    p.add_argument("--concat-projections", action="store_true",
                   help="concat_projections=True with every compile_step (a copy of those weights)")
    p.add_argument("--alt-concat-projections", action="store_true",
                   help="concat_projections=True with the compiled_alt variant's compile_step alone")
    p.add_argument("--eos", type=int, default=None, help="the eos variants' eos_token_id (default: vocab - 1)")
    p.add_argument("--ragged", type=int, default=0, metavar="N",
                   help="row i's prompt N * i tokens shorter, left-padded (default 0: one length)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--load-cache", type=Path, metavar="DIR",
                   help="torch.compile's caches a run saved (first calls are then warm)")
    p.add_argument("--save-cache", type=Path, metavar="DIR",
                   help="save torch.compile's caches here after each first call")
    args = p.parse_args(argv)
    if ("compiled_alt" in args.variants) != (args.alt_step_options is not None):
        p.error("the compiled_alt variant and --alt-step-options come together: give both or neither")
    for given, flag in ((args.alt_concat_projections, "--alt-concat-projections"),
                        (args.alt_prefill_options is not None, "--alt-prefill-options")):
        if given and "compiled_alt" not in args.variants:
            p.error(f"{flag} changes the compiled_alt variant: add it to --variants")
    last, most = max(args.batch) - 1, (args.prompt - 1) // max(max(args.batch) - 1, 1)
    if not 0 <= args.ragged <= most:
        why = "is not a number of tokens" if args.ragged < 0 else \
            f"row {last}'s prompt of {args.prompt} tokens would be all padding"
        p.error(f"--ragged {args.ragged}: {why}; give --ragged from 0 to {most}")
    return args


def llama(shape, vocab, dtype, device, seed):
    import transformers
    hidden, layers, heads, kv_heads, intermediate = shape
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, intermediate_size=intermediate,
                                      vocab_size=vocab, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None        # no early stop: every run makes `new` tokens
    return model


def compose(anchor, augment, mode, every):
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "augment", "input": mode}],
            "edges": [{"source": "augment", "target": "anchor", "layers": {"every": every}}]}
    composed = cg.compile(spec, models={"anchor": anchor, "augment": augment})
    with torch.no_grad():  # like a trained composition: the blocks change the logits
        for name, p in composed.named_new_parameters():
            if name.endswith("to_out.weight") or name.endswith("gate"):
                p.normal_(0, 0.02)
    return composed


def flagged(composed, ids, options, extra, **flags):
    """generate with `decode`'s `flags` set while it runs (what it reads when it builds a decoder and when
    its step compiles): `MATH_ATTENTION=False`, `FLEX_ATTENTION=True`, `SCALE_PAST_PRODUCTS=True`."""
    from calmgraph.generation import decode

    def call(n):
        previous = {name: getattr(decode, name) for name in flags}
        for name, value in flags.items():
            setattr(decode, name, value)
        try:
            with uncached() if flags.get("MATH_ATTENTION") is False else contextlib.nullcontext():
                return composed.generate(ids, n, **options, **extra)
        finally:
            for name, value in previous.items():
                setattr(decode, name, value)
    return call


def at_once(call):
    """`call` with generate reading whether every row has finished at each step (`stopping.finish_lag` 0)."""
    from calmgraph.generation import generate

    def read_at_once(n):
        previous, generate.finish_lag = generate.finish_lag, lambda device, compiled: 0
        try:
            return call(n)
        finally:
            generate.finish_lag = previous
    return read_at_once


def twin_of(composed, anchor, augment, mode, every):
    """A second composition of the same models with `composed`'s new parameters (decoders of its own)."""
    twin = compose(anchor, augment, mode, every)
    with torch.no_grad():
        for (name, p), (other, q) in zip(twin.named_new_parameters(), composed.named_new_parameters(), strict=True):
            assert name == other
            p.copy_(q)
    return twin


def per_length(composed, call):
    """`call` with generate decoding each prompt length in a decoder of its own (`ragged_ok` false meanwhile).
    Its one-token and `--new`-token calls need a decoder per length each (their caches differ in size): more
    than generate keeps (KEEP_DECODERS), which would then trace them again at each call; during its calls (the
    only ones that build this composition's decoders) generate keeps them all."""
    from calmgraph.generation import generate

    def each_length(n):
        generate.ragged_ok(composed)
        entry = generate._entry(composed)
        previous = entry["ragged"], generate.KEEP_DECODERS
        entry["ragged"], generate.KEEP_DECODERS = False, max(previous[1], 64)
        try:
            return call(n)
        finally:
            entry["ragged"], generate.KEEP_DECODERS = previous
    return each_length


@contextlib.contextmanager
def uncached():
    """torch.compile without its caches (AOTAutograd's, inductor's graphs): they do not key on SDPA's backend
    (pytorch/pytorch#185449), so a step compiled with its fused attention would otherwise load the math step
    compiled before it."""
    with torch._functorch.config.patch(enable_autograd_cache=False), torch._inductor.config.patch(fx_graph_cache=False):
        yield


def cache_counts() -> collections.Counter:
    """torch.compile's cache hits, misses and bypasses so far in this process (inductor's compiled graphs,
    AOTAutograd's): with `first_call_s`, whether a first call compiled or loaded what an earlier process left."""
    from torch._dynamo.utils import counters
    return collections.Counter({name: n for group in ("inductor", "aot_autograd")
                                for name, n in counters[group].items() if "cache" in name})


def timed(fn, sync):
    sync()
    started = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - started, out


def run(args, save=lambda report: None) -> dict:
    """The report; `save(report)` after each result, so that a run cut short keeps what it measured."""
    import transformers
    device, dtype = args.device, DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    loaded = compile_cache.load(args.load_cache)  # first: a missing folder fails before the models are built
    anchor = llama(args.anchor, args.vocab, dtype, device, 0)
    augment = llama(args.augment, args.vocab, dtype, device, 1)
    eos = args.vocab - 1 if args.eos is None else args.eos
    weights_gb = sum(p.numel() * p.element_size() for m in (anchor, augment) for p in m.parameters()) / 1e9
    results = []
    report = {
        "what": "tokens/s per sequence, greedy, no early stop; median of interleaved rounds",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "compile_step": "STEP_COMPILE" if args.step_options is None else args.step_options,
        "alt_step_options": args.alt_step_options,
        "compile_prefill": "PREFILL_COMPILE" if args.prefill_options is None else args.prefill_options,
        "concat_projections": args.concat_projections,
        "alt_concat_projections": args.alt_concat_projections,
        "alt_prefill_options": args.alt_prefill_options,
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "shapes": {"anchor": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate"), args.anchor)),
                   "augment": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate"), args.augment)),
                   "vocab": args.vocab, "every": args.every, "prompt": args.prompt, "ragged": args.ragged,
                   "new": args.new, "eos": eos,
                   "dtype": args.dtype, "weights_gb": round(weights_gb, 3)},  # read once a token: the bandwidth bound
        "compile_cache_loaded_bytes": loaded,  # 0: every first call compiled cold (inductor's own disk cache aside)
        "complete": False,  # until every mode and batch is measured
        "first_calls": [],  # each variant's first call, as it ends: what a run cut short spent its time on
        "results": results,
    }
    for mode in args.modes:
        started = time.perf_counter()
        composed = compose(anchor, augment, mode, args.every)
        compile_s = time.perf_counter() - started
        twin = None
        for batch in args.batch:
            ids = torch.randint(3, args.vocab, (batch, args.prompt), device=device,
                                generator=torch.Generator(device).manual_seed(batch))
            extra = {"augment_input_ids": ids} if mode == "prompt" else {}
            # row i's first ragged * i tokens are padding
            mask = (torch.arange(args.prompt, device=device) >= args.ragged * torch.arange(batch, device=device)[:, None])
            if args.ragged:
                extra["attention_mask"] = mask.long()
            calls = {"transformers_anchor_alone": lambda n: anchor.generate(
                ids, attention_mask=mask.long(), max_new_tokens=n, do_sample=False, pad_token_id=0)}
            for variant in args.variants:
                step = True if args.step_options is None else args.step_options
                options = {"cached": {"cache": True}, "compiled": {"cache": True, "compile_step": step},
                           "compiled_prefill": {"cache": True, "compile_step": step,
                                                "compile_prefill": True if args.prefill_options is None
                                                else args.prefill_options},
                           "compiled_fused_attention": {"cache": True, "compile_step": step},
                           "compiled_flex_attention": {"cache": True, "compile_step": step},
                           "compiled_scale_past_products": {"cache": True, "compile_step": step},
                           "compiled_eos": {"cache": True, "compile_step": step, "eos_token_id": eos},
                           "compiled_eos_at_once": {"cache": True, "compile_step": step, "eos_token_id": eos},
                           "recompute": {"cache": False}, "cached_per_length": {"cache": True},
                           "compiled_per_length": {"cache": True, "compile_step": step},
                           "compiled_alt": {"cache": True, "compile_step": args.alt_step_options,
                                            **({} if args.alt_prefill_options is None
                                               else {"compile_prefill": args.alt_prefill_options})}}[variant]
                if "compile_step" in options and (args.concat_projections or
                                                  (variant == "compiled_alt" and args.alt_concat_projections)):
                    options = {**options, "concat_projections": True}
                if variant in FLAGS:  # its own decoders, built and compiled with the flag
                    calls[variant] = flagged(twin_of(composed, anchor, augment, mode, args.every), ids, options,
                                             extra, **FLAGS[variant])
                else:
                    calls[variant] = (lambda o: lambda n: composed.generate(ids, n, **o, **extra))(options)
                if variant == "compiled_eos_at_once":
                    calls[variant] = at_once(calls[variant])
                if variant.endswith("_per_length") or variant == "compiled_alt":  # on a twin: decoders of its own
                    twin = twin or twin_of(composed, anchor, augment, mode, args.every)
                    calls[variant] = (lambda o, t: lambda n: t.generate(ids, n, **o, **extra))(options, twin)
                    if variant.endswith("_per_length"):
                        calls[variant] = per_length(twin, calls[variant])
            first, outs = {}, {}
            for name, call in list(calls.items()):  # the first call traces the decode graph (and compiles)
                before = cache_counts()
                try:
                    first_s, out = timed(lambda: call(args.new), sync)
                except Exception as error:  # a variant that cannot compile here is reported, not the run's end
                    if name == "transformers_anchor_alone":
                        raise
                    del calls[name]
                    report["first_calls"].append({"mode": mode, "batch": batch, "variant": name,
                                                  "error": f"{type(error).__name__}: {error}"[:2000]})
                    print(json.dumps(report["first_calls"][-1]), file=sys.stderr)
                    save(report)
                    continue
                caches = dict(cache_counts() - before)
                outs[name] = out[:, -args.new:]
                call(1)  # one new token: its own (smaller) cache bucket, built here, off the clock
                ttft_s, _ = timed(lambda: call(1), sync)
                first[name] = {"first_call_s": round(first_s, 3), "time_to_first_token_s": round(ttft_s, 4),
                               "tokens": int(out.shape[1] - args.prompt), **({"compile_caches": caches} if caches else {})}
                if name != "compiled" and "compiled" in outs and outs[name].shape == outs["compiled"].shape:
                    first[name]["tokens_equal_to_compiled"] = round(float((outs[name] == outs["compiled"]).float().mean()), 4)
                report["first_calls"].append({"mode": mode, "batch": batch, "variant": name, **first[name]})
                print(json.dumps(report["first_calls"][-1]), file=sys.stderr)  # a compile's time, as it ends
                save(report)
                compile_cache.save(args.save_cache)
            seconds = {name: [] for name in calls}
            first_token = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, call in calls.items():
                    first_token[name].append(timed(lambda: call(1), sync)[0])
                    seconds[name].append(timed(lambda: call(args.new), sync)[0])

            def decode_rate(name):  # the tokens after the first, over the time after it, per round
                after = statistics.median(s - f for s, f in zip(seconds[name], first_token[name]))
                return (args.new - 1) / after if after > 0 else float("nan")  # nan: under the timing noise
            alone = args.new / statistics.median(seconds["transformers_anchor_alone"])
            decode_alone = decode_rate("transformers_anchor_alone")
            for name in calls:
                tps, decode_tps = args.new / statistics.median(seconds[name]), decode_rate(name)
                results.append({"mode": mode, "batch": batch, "variant": name, "tokens_per_s_per_sequence": round(tps, 1),
                                "vs_anchor_alone": round(tps / alone, 3),
                                "decode_tokens_per_s_per_sequence": round(decode_tps, 1),
                                "decode_vs_anchor_alone": round(decode_tps / decode_alone, 3), **first[name],
                                "seconds": [round(s, 4) for s in seconds[name]],
                                "first_token_seconds": [round(s, 4) for s in first_token[name]],
                                "compose_s": round(compile_s, 1)})
                print(json.dumps(results[-1]), file=sys.stderr)
            save(report)
    report["complete"] = True
    return report


def main(argv=None):
    args = parse(argv)
    if args.out is not None and not args.out.parent.is_dir():
        sys.exit(f"--out: no folder {args.out.parent}")

    def save(report):
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    report = run(args, save)
    save(report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

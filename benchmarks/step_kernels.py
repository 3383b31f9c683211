"""Where a compiled decode step's GPU time goes: GPU microseconds and kernels a token, by kernel and by kind
(inductor's Triton kernels, cuBLAS products, fused attention, other), for `generate(compile_step=True)` on
generate_scale.py's models.

    python benchmarks/step_kernels.py --mode shared --batch 1 --out benchmarks/results/decode_kernels_gpu.json
    python benchmarks/step_kernels.py --mode shared --batch 1 --fused-attention    # the step as traced
    python benchmarks/step_kernels.py --mode shared --batch 1 --flex-attention     # decode.FLEX_ATTENTION

A token's share is the difference between a 48-token and a 16-token call, over 32, so that the prefill
and the call's own set-up cancel; each call is one torch.profiler trace (CUDA activity only).
`--fused-attention` compiles the step without `decode.MathAttention` (SDPA picks its fused kernel);
`--flex-attention` with `decode.FLEX_ATTENTION` (its attention as torch's flex_attention).
`--step-options` replaces STEP_COMPILE (e.g. `'{"options": {..., "max_autotune_gemm": true}}'`).
`--linear-as` measures candidates for steps of several rows, whose products inductor leaves as cuBLAS calls:
`bmm`, each linear of the step as a batched product of one row per batch entry, against the weight broadcast
(a view), which inductor's coordinate-descent decomposition turns into reductions as it does a one-row
product; `sum`, each linear as `sum(w[:, None] * x[None], -1)` in fp32, an (out features, rows) reduction in
which the rows that read a weight row are neighbours, so that a kernel reads each weight once.
`--concat-projections`: generate's `concat_projections=True`, the linears that read one input (a block's
q/k/v, its gate/up) as one product over their weights concatenated, split after: fewer cuBLAS calls at 8
rows, for a copy of those weights (inductor's `freezing` would make that copy, but it loses CUDA graphs on
this step, which mutates its caches).
With `--step-options '{"options": {"triton.cudagraphs": true}}'` (no tuning) both compile in a short time.
The report also gives the fraction of a 48-token call's greedy tokens equal to the eager cached step's (bf16:
rounding differs, so rows may part after some tokens).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import compile_cache  # noqa: E402
import generate_scale as gs  # noqa: E402 - the same models and composition
from calmgraph.generation import decode  # noqa: E402

KINDS = {"attention": ("cudnn", "fmha", "flash", "attention", "flex_decoding"),
         "gemm": ("gemv", "gemm", "nvjet", "cutlass", "sm90", "splitk")}


def kind(name: str) -> str:
    lower = name.lower()
    if lower.startswith("triton") and "flex" not in lower:   # a flex_attention template kernel is attention
        return "triton"
    return next((k for k, marks in KINDS.items() if any(m in lower for m in marks)), "other")


def rewrite_linears(graph: torch.fx.Graph, product) -> int:
    """Each `linear(x, w[, b])` of `graph` (x of 3 dims, w of 2) as `product(graph, x, w, dtype)` (+ b), built
    before it; the count rewritten."""
    aten, count = torch.ops.aten, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.linear.default or node.kwargs:
            continue
        x, w, *bias = node.args
        xv, wv = x.meta.get("val"), w.meta.get("val")
        if xv is None or wv is None or xv.ndim != 3 or wv.ndim != 2:
            continue
        with graph.inserting_before(node):
            out = product(graph, x, w, wv.shape, xv.dtype)
            if bias and bias[0] is not None:
                out = graph.call_function(aten.add.Tensor, (out, bias[0]))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    return count


def as_bmm(graph, x, w, shape, dtype):
    """`bmm(x.reshape(-1, 1, K), w.t().expand(R, K, N))`, reshaped (the sizes as graph values: the token
    count is symbolic)."""
    aten, (n, k) = torch.ops.aten, shape
    rows_x = graph.call_function(aten.reshape.default, (x, [-1, 1, k]))
    rows = graph.call_function(aten.sym_size.int, (rows_x, 0))
    wide = graph.call_function(aten.expand.default, (graph.call_function(aten.t.default, (w,)), [rows, k, n]))
    batch = graph.call_function(aten.sym_size.int, (x, 0))
    product = graph.call_function(aten.bmm.default, (rows_x, wide))
    return graph.call_function(aten.reshape.default, (product, [batch, -1, n]))


def as_sum(graph, x, w, shape, dtype):
    """`sum(w[:, None] * x.reshape(-1, K)[None], -1).t()` in fp32, reshaped and cast back."""
    aten, (n, k) = torch.ops.aten, shape

    def f32(t):
        return graph.call_function(aten._to_copy.default, (t,), {"dtype": torch.float32})
    rows = graph.call_function(aten.reshape.default, (x, [-1, k]))
    product = graph.call_function(aten.mul.Tensor, (graph.call_function(aten.unsqueeze.default, (f32(w), 1)),
                                                    graph.call_function(aten.unsqueeze.default, (f32(rows), 0))))
    summed = graph.call_function(aten.sum.dim_IntList, (product, [-1]))
    batch = graph.call_function(aten.sym_size.int, (x, 0))
    out = graph.call_function(aten.reshape.default, (graph.call_function(aten.t.default, (summed,)), [batch, -1, n]))
    return graph.call_function(aten._to_copy.default, (out,), {"dtype": dtype})


REWRITES = {"bmm": as_bmm, "sum": as_sum}


def _copy(step: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule over a copy of `step`'s graph (its weights and caches shared)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(step.graph, {}))
    return torch.fx.GraphModule(step, graph, class_name="Decoder")


def linears_as(how: str):
    """A step rewrite: each linear as `REWRITES[how]`."""
    def rewrite(step):
        step = _copy(step)
        count = rewrite_linears(step.graph, REWRITES[how])
        step.recompile()
        return step, f"linear_as_{how}: {count} linears"
    return rewrite


def with_step_rewrite(decoder_cls, rewrite):
    """Decoder.compiled, compiling `rewrite(step)` (a new GraphModule, and a line for stderr) instead of the step."""
    compiled = decoder_cls.compiled

    def patched(self, options, *cast, prefill=False, **others):
        if not prefill and "step" not in self._compiled:
            self.to_compile, said = rewrite(self.to_compile)
            print(said, file=sys.stderr)
        return compiled(self, options, *cast, prefill=prefill, **others)
    decoder_cls.compiled = patched


def kernels(call, new: int) -> dict[str, list]:
    """{kernel name: [launches, GPU us]} of one call making `new` tokens."""
    found = collections.defaultdict(lambda: [0, 0.0])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call(new)
        torch.cuda.synchronize()
    for event in prof.events():
        if event.device_type.name == "CUDA":
            found[event.name][0] += 1
            found[event.name][1] += event.device_time
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["shared", "prompt"], default="shared")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--fused-attention", action="store_true", help="compile the step without MathAttention")
    p.add_argument("--flex-attention", action="store_true", help="compile the step with decode.FLEX_ATTENTION")
    p.add_argument("--step-options", type=json.loads, default=None, metavar="JSON", help="compile_step (default True)")
    p.add_argument("--linear-as", choices=sorted(REWRITES), help="each linear of the step as a one-row bmm, or a sum")
    p.add_argument("--concat-projections", action="store_true",
                   help="generate's concat_projections=True (q/k/v and gate/up over a copy of their weights)")
    p.add_argument("--top", type=int, default=20, help="kernels listed")
    p.add_argument("--out", type=Path)
    p.add_argument("--load-cache", type=Path, metavar="DIR", help="torch.compile's caches a run saved")
    p.add_argument("--save-cache", type=Path, metavar="DIR",
                   help="save torch.compile's caches here after the first call")
    args = p.parse_args(argv)
    loaded = compile_cache.load(args.load_cache)
    if args.fused_attention and args.flex_attention:
        p.error("--fused-attention and --flex-attention are two attentions of the step: give one")
    decode.MATH_ATTENTION, decode.FLEX_ATTENTION = not args.fused_attention, args.flex_attention
    if args.linear_as and args.concat_projections:
        p.error("--linear-as and --concat-projections are two rewrites of the same linears: give one")
    if args.linear_as:
        with_step_rewrite(decode.Decoder, linears_as(args.linear_as))
    anchor = gs.llama([2048, 22, 32, 4, 5632], 32000, torch.bfloat16, "cuda", 0)
    augment = gs.llama([1024, 16, 16, 4, 2816], 32000, torch.bfloat16, "cuda", 1)
    ids = torch.randint(3, 32000, (args.batch, 128), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(args.batch))
    extra = {"augment_input_ids": ids} if args.mode == "prompt" else {}
    composed = gs.compose(anchor, augment, args.mode, 4)
    step = True if args.step_options is None else args.step_options
    concat = {"concat_projections": True} if args.concat_projections else {}
    call = lambda n: composed.generate(ids, n, cache=True, compile_step=step, **concat, **extra)  # noqa: E731
    started = time.perf_counter()
    with gs.uncached() if args.fused_attention else contextlib.nullcontext():
        call(128)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - started
    compile_cache.save(args.save_cache)
    short, long = kernels(call, 16), kernels(call, 48)
    eager = composed.generate(ids, 48, cache=True, **extra)  # greedy tokens of the eager cached step
    same = float((call(48) == eager).float().mean())
    per_token = {name: [(n - short.get(name, [0, 0])[0]) / 32, (us - short.get(name, [0, 0.0])[1]) / 32]
                 for name, (n, us) in long.items()}
    by_kind = collections.defaultdict(lambda: [0.0, 0.0])
    for name, (n, us) in per_token.items():
        by_kind[kind(name)][0] += us
        by_kind[kind(name)][1] += n
    top = sorted(per_token.items(), key=lambda item: -item[1][1])[:args.top]
    report = {
        "what": "GPU us and kernels a token of the compiled decode step (48 - 16 tokens, / 32)",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "mode": args.mode, "batch": args.batch,
        "attention": "fused" if args.fused_attention else "flex" if args.flex_attention else "math",
        "compile_step": "STEP_COMPILE" if args.step_options is None else args.step_options,
        "linear_as": args.linear_as, "concat_projections": args.concat_projections,
        "fraction_of_tokens_equal_to_eager": same,
        "first_call_s": round(first_s, 1), "compile_cache_loaded_bytes": loaded,
        "gpu_us_per_token": round(sum(us for _, us in per_token.values()), 1),
        "kernels_per_token": round(sum(n for n, _ in per_token.values()), 1),
        "by_kind": {k: {"us": round(us, 1), "kernels": round(n, 1)} for k, (us, n) in sorted(by_kind.items())},
        "top": [{"kernel": name[:120], "us": round(us, 1), "kernels": round(n, 1)} for name, (n, us) in top],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

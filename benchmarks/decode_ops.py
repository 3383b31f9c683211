"""ATen ops dispatched per decode token, a proxy for GPU kernel launches: transformers' own cached step of the
anchor alone beside calmgraph's cached decode step (shared and prompt modes), per block and by op name.

    python benchmarks/decode_ops.py --out benchmarks/results/decode_ops_cpu.json

Small Llama configs with the structure of benchmarks/generate_scale.py (anchor 22 layers, augment 16, 2 query
heads per KV head, every 4th augment block read, bf16): op counts do not depend on width. A `TorchDispatchMode`
counts every op of one decode step after a prefill, run under `torch.inference_mode` as generation runs it, in
three kinds:
- `launch`: an op that runs a kernel (on a GPU, about one launch each);
- `view`: an op whose result aliases its input (view, expand, slice, transpose; a `to` or `reshape` that
  copied is a launch): metadata, no kernel;
- `host`: allocation (empty) and reads of a value to the host.
Under inference mode composite ops reach the counter whole: `linear`, `scaled_dot_product_attention`,
`rms_norm` (on CUDA one `_fused_rms_norm` kernel), `to`. What the count misses: kernels that one op launches
several of (cuBLAS split-K, an attention backend's), and kernels a CUDA op launches for non-contiguous inputs;
both sides are counted the same way. transformers' step is the model's forward, as its `generate` calls it
per token (its logits processing around it is not counted, nor is calmgraph's). `--fuse off` builds the
decode graph without `calmgraph.generation.fuse`'s rewrites.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import sys
import warnings
from pathlib import Path

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

import calmgraph as cg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_scale import compose, llama  # noqa: E402 - the benchmark's models and composition

VOCAB = 256
FUSED = {torch.ops.aten.rms_norm.default, torch.ops.aten._fused_rms_norm.default}
HOST = {"empty", "empty_strided", "_local_scalar_dense", "sym_size", "sym_numel", "sym_stride"}


def kind(func, args, out) -> str:
    """An op that may alias its input (view, reshape, `to`) is a view only when it did: `to` of another dtype,
    or `reshape` of a non-contiguous tensor, copies."""
    if func.overloadpacket.__name__ in HOST:
        return "host"
    returns = func._schema.returns
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        first = args[0] if args else None
        if isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor):
            shared = out.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
            return "view" if shared else "launch"
        return "view"
    return "launch"


class Count(TorchDispatchMode):
    """(where, kind, op) -> count; `where` is set from outside (a block, a link, the rest)."""

    def __init__(self):
        super().__init__()
        self.counts, self.where, self.paused = collections.Counter(), "outside blocks", False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.counts[(self.where, kind(func, args, out), func.overloadpacket.__name__)] += 1
        return out

    def one(self, name: str) -> None:
        """An op counted as one launch whatever its CPU decomposition."""
        self.counts[(self.where, "launch", name)] += 1


def block_of(node: fx.Node) -> str:
    """'anchor block 3', 'augment block 0', 'link' or 'outside blocks' from what export recorded."""
    if node.op == "call_module" and node.target.startswith(("link_cache.", "attend.")):
        return "link"
    stack = node.meta.get("nn_module_stack") or {}
    model = node.meta.get("calmgraph_model") or "anchor"
    for path, _ in reversed(list(stack.values())):
        parts = str(path).split(".")
        if "layers" in parts and parts.index("layers") + 1 < len(parts):
            return f"{model} block {parts[parts.index('layers') + 1]}"
    return "outside blocks"


class Counted(fx.Interpreter):
    def __init__(self, module, counter: Count):
        super().__init__(module)
        self.counter = counter

    def run_node(self, node):
        self.counter.where = block_of(node)
        if node.op == "call_function" and node.target in FUSED:
            self.counter.one(node.target.overloadpacket.__name__)
            self.counter.paused = True
            try:
                return super().run_node(node)
            finally:
                self.counter.paused = False
        return super().run_node(node)


def transformers_step(anchor, batch, prompt, cache_kind) -> Count:
    """One cached step of the anchor alone, as transformers' generate calls it (model forward)."""
    from transformers.cache_utils import DynamicCache, StaticCache
    ids = torch.randint(3, anchor.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    config = anchor.config
    cache = StaticCache(config=config, max_cache_len=prompt + 32) if cache_kind == "static" else DynamicCache(config=config)
    counter = Count()
    hooks = []
    for i, layer in enumerate(anchor.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: setattr(counter, "where", f"anchor block {i}")))
        hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(counter, "where", "outside blocks")))
    with torch.inference_mode():
        out = anchor(input_ids=ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        with counter:
            anchor(input_ids=token, past_key_values=cache, use_cache=True,
                   cache_position=torch.tensor([prompt]))
    for h in hooks:
        h.remove()
    return counter


def calmgraph_step(composed, mode, batch, prompt) -> Count:
    from calmgraph.generation.generate import CachedSteps, stages_of
    ids = torch.randint(3, VOCAB, (batch, prompt), generator=torch.Generator().manual_seed(0))
    extra = {"augment_input_ids": ids} if mode == "prompt" else {}
    with torch.inference_mode():
        states = stages_of(composed).augment(**extra)
        steps = CachedSteps(composed, ids, torch.full((batch,), prompt), states, 8)
        token = steps.first().argmax(-1)
        group = steps.groups[0]
        counter = Count()
        with counter:
            Counted(group["step"], counter).run(token[:, None], group["positions"][:1], *group["ctx"], *group["kv"])
    return counter


def summary(counter: Count, blocks: dict[str, int]) -> dict:
    """Totals by kind; launches per block (averaged over each model's blocks), per link, outside; by op."""
    by_kind = collections.Counter()
    where = collections.defaultdict(collections.Counter)
    for (w, k, op), n in counter.counts.items():
        by_kind[k] += n
        if k == "launch":
            group = w.split(" block ")[0] + " block" if " block " in w else w
            where[group][op] += n
    out = {"total": dict(by_kind), "launches": by_kind["launch"], "launches_by_place": {}}
    for group, ops in sorted(where.items()):
        model = group.removesuffix(" block")
        per = blocks.get(model) if group.endswith(" block") else None
        entry = {"launches": sum(ops.values()), "by_op": dict(ops.most_common())}
        if per:
            entry["blocks"] = per
            entry["launches_per_block"] = round(sum(ops.values()) / per, 2)
        out["launches_by_place"][group] = entry
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--anchor-layers", type=int, default=22)
    p.add_argument("--augment-layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64, help="both models' width (op counts do not depend on it)")
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--fuse", choices=["on", "off", "both"], default="both")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def run(args) -> dict:
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    h = args.hidden
    anchor = llama([h, args.anchor_layers, 8, 4, 2 * h], VOCAB, dtype, "cpu", 0)   # grouped queries, as at
    augment = llama([h, args.augment_layers, 8, 4, 2 * h], VOCAB, dtype, "cpu", 1)  # LLM shapes: 2 per KV head
    results = {}
    for cache_kind in ("dynamic", "static"):
        results[f"transformers anchor alone, {cache_kind} cache"] = summary(
            transformers_step(anchor, args.batch, args.prompt, cache_kind), {"anchor": args.anchor_layers})
    import calmgraph.generation.decode as decode
    for fuse in (["on", "off"] if args.fuse == "both" else [args.fuse]):
        for mode in ("shared", "prompt"):
            decode.FUSE = fuse == "on"
            composed = compose(anchor, augment, mode, args.every)
            blocks = {"anchor": args.anchor_layers, "augment": args.augment_layers if mode == "shared" else 0}
            results[f"calmgraph {mode}, fuse {fuse}"] = summary(calmgraph_step(composed, mode, args.batch, args.prompt),
                                                               blocks)
    decode.FUSE = True
    return {
        "what": "ATen ops dispatched by one cached decode step (after a prefill), a proxy for GPU kernel launches; "
                "'launch' excludes views and host-side ops",
        "command": " ".join(["python", "benchmarks/decode_ops.py", *sys.argv[1:]]),
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "calmgraph": cg.__version__
                     if hasattr(cg, "__version__") else None, "python": platform.python_version()},
        "shapes": {"anchor_layers": args.anchor_layers, "augment_layers": args.augment_layers, "hidden": h,
                   "kv_heads": 4, "heads": 8, "every": args.every, "batch": args.batch, "prompt": args.prompt,
                   "dtype": args.dtype},
        "results": results,
    }


def main(argv=None):
    args = parse(argv)
    report = run(args)
    text = json.dumps(report, indent=1)
    print(json.dumps({k: v["launches"] for k, v in report["results"].items()}, indent=1), file=sys.stderr)
    if args.out is not None:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()

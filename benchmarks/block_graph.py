"""What the block-granular fused graph (passes/outline.py) costs, and what activation checkpointing saves.

1. Eager forward of the flat graph (the outline pass replaced by the identity) against the outlined one,
   in interleaved rounds, reporting the median ratio outlined / flat. The demo composition as compiled
   (fx front end: its blocks were already calls, so both graphs are the same: the noise floor), the demo
   through the torch.export front end, and a Llama + Qwen2 pair (hidden 256, 8 layers).
2. Bytes autograd keeps for backward in one forward, plain and with `checkpoint_blocks`.

    python benchmarks/block_graph.py            # CPU, fp32; --clock cpu counts this process's CPU time only
    python benchmarks/block_graph.py --quick    # small shapes, few rounds: it runs
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import calmgraph as cg  # noqa: E402
import calmgraph.compiler as compiler  # noqa: E402
import calmgraph.passes.trace as trace  # noqa: E402
from calmgraph.demo.models import demo_models  # noqa: E402
from calmgraph.demo.run import demo_spec_path  # noqa: E402
from calmgraph.parallel import checkpoint_blocks  # noqa: E402
from calmgraph.passes.outline import OutlineReport  # noqa: E402

EVERY_2 = {"anchor": {"name": "base"}, "augments": [{"name": "kv"}],
           "edges": [{"source": "kv", "target": "base", "layers": {"every": 2}}]}


def build(spec, models, outline: bool, frontend: str | None = None):
    saved = compiler.outline_blocks, trace.frontend_order
    if not outline:
        compiler.outline_blocks = lambda gm, blocks: OutlineReport(gm, {})
    if frontend:
        trace.frontend_order = lambda model: [frontend]
    try:
        return cg.compile(spec, models=models)
    finally:
        compiler.outline_blocks, trace.frontend_order = saved


def forward_ratio(name, spec, models, args, clock, rounds: int, reps: int, frontend=None) -> dict:
    flat, outlined = build(spec, models, False, frontend), build(spec, models, True, frontend)
    times = {"flat": [], "outlined": []}
    with torch.no_grad():
        assert torch.equal(flat(*args), outlined(*args))
        for _ in range(2):
            flat(*args), outlined(*args)
        for r in range(rounds):                    # alternate which goes first
            for key in (("flat", "outlined") if r % 2 == 0 else ("outlined", "flat")):
                module = flat if key == "flat" else outlined
                started = clock()
                for _ in range(reps):
                    module(*args)
                times[key].append((clock() - started) / reps)
    ratios = [o / f for o, f in zip(times["outlined"], times["flat"])]
    row = {"name": name, "flat_ms": 1e3 * statistics.median(times["flat"]),
           "outlined_ms": 1e3 * statistics.median(times["outlined"]), "median_ratio": statistics.median(ratios),
           "min_ratio": min(ratios), "max_ratio": max(ratios),
           "root_nodes": {"flat": len(flat.graph.nodes), "outlined": len(outlined.graph.nodes)}}
    print(f"{name}: flat {row['flat_ms']:.2f} ms, outlined {row['outlined_ms']:.2f} ms, median ratio "
          f"{row['median_ratio']:.3f} (rounds {min(ratios):.3f}..{max(ratios):.3f}); root nodes "
          f"{row['root_nodes']['flat']} -> {row['root_nodes']['outlined']}", flush=True)
    return row


def saved_for_backward(composed, ids) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        composed.loss(ids)
    return total


def llama_pair(dim: int, depth: int):
    import transformers as tr
    cfg = dict(hidden_size=dim, intermediate_size=int(2.6875 * dim), num_hidden_layers=depth, num_attention_heads=8,
               num_key_value_heads=4, vocab_size=1000, max_position_embeddings=512)
    torch.manual_seed(0)
    return {"base": tr.LlamaForCausalLM(tr.LlamaConfig(**cfg)).eval(), "kv": tr.Qwen2ForCausalLM(tr.Qwen2Config(**cfg)).eval()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    clock = time.process_time if opts.clock == "cpu" else time.perf_counter
    rounds, reps = (3, 1) if opts.quick else (31, 5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (4, 64), generator=g)
    notes = torch.randint(0, 96, (4, 20), generator=g)
    demo = (ids, notes, torch.ones_like(notes))
    forward_ratio("demo (fx front end)", str(demo_spec_path()), demo_models(), demo, clock, rounds, reps)
    forward_ratio("demo (torch.export front end)", str(demo_spec_path()), demo_models(), demo, clock, rounds, reps,
                  frontend="export")
    dim, depth, seq = (64, 2, 32) if opts.quick else (256, 8, 128)
    pair = llama_pair(dim, depth)
    forward_ratio(f"llama+qwen2 h{dim} x{depth}", EVERY_2, pair, (torch.randint(0, 1000, (4, seq), generator=g),),
                  clock, max(3, rounds // 2), reps)

    composed = cg.compile(EVERY_2, models=pair)
    with torch.no_grad():
        for p in composed.new_parameters():
            p.normal_(0, 0.02, generator=g)
    ids = torch.randint(0, 1000, (4, 2 * seq), generator=g)
    plain = saved_for_backward(composed, ids)
    checkpointed = saved_for_backward(checkpoint_blocks(copy.deepcopy(composed)), ids)
    print(f"saved for backward, batch 4 x {2 * seq}: plain {plain / 2**20:.1f} MiB, checkpointed "
          f"{checkpointed / 2**20:.1f} MiB ({checkpointed / plain:.2f}x)")


if __name__ == "__main__":
    main()

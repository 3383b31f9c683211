"""What the `schedule` pass buys an eager forward: the fused graph as compiled (each augment just before the
first link reading it) against the same graph in merge order (every augment first) and against the parts
(`calmgraph.bench.baselines.Parts`: anchor alone, then the augment to its deepest tapped block, then the
cross-attention blocks). One process, interleaved rounds, medians of per-round ratios.

    python benchmarks/schedule_overhead.py --device cuda --rounds 40 --out benchmarks/results/schedule_gpu.json

The composition of `benchmarks/specs/xt_1024_512_*.yaml`: an x-transformers anchor (dim 1024, 12 layers)
reading an x-transformers augment (dim 512, 12 layers) every 4th block, batch 8 x 1024, bf16 autocast.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import calmgraph as cg
import calmgraph.compiler as compiler
from calmgraph.bench.baselines import Parts
from calmgraph.bench.inputs import forward_inputs, make_inputs
from calmgraph.passes.schedule import Schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "specs"))
from factories import xt_decoder  # noqa: E402


def merge_order(spec, models):
    """The composition compiled without the schedule pass."""
    saved = compiler.PIPELINE
    compiler.PIPELINE = tuple(p for p in saved if not isinstance(p, Schedule))
    try:
        return cg.compile(spec, models=models)
    finally:
        compiler.PIPELINE = saved


def measure(mode: str, models, device: str, batch: int, seq: int, rounds: int) -> dict:
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "augment", "input": mode}],
            "edges": [{"source": "augment", "target": "anchor", "layers": {"every": 4}}]}
    fused, unscheduled = cg.compile(spec, models=models).eval(), merge_order(spec, models).eval()
    inputs = forward_inputs(make_inputs(fused, models, batch=batch, seq=seq))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        parts = Parts(fused, models, inputs)
        if not torch.equal(fused(**inputs), unscheduled(**inputs)):
            raise SystemExit("the scheduled graph computes something else than the merge order")
        fns = {"fused": lambda: fused(**inputs), "fused_merge_order": lambda: unscheduled(**inputs),
               "parts": lambda: parts(**inputs), "anchor": lambda: parts.model("anchor", inputs),
               "augment": lambda: parts.model("augment", inputs), "cross_attention": parts.cross_attention}
        started = time.perf_counter()
        while time.perf_counter() - started < 2:       # warm-up
            for f in fns.values():
                f()
        ms = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                sync()
                t = time.perf_counter()
                f()
                sync()
                ms[k].append((time.perf_counter() - t) * 1e3)

    def ratio(a, b):
        return round(statistics.median(x / y for x, y in zip(ms[a], ms[b])), 4)

    alone = [a + b + x for a, b, x in zip(ms["anchor"], ms["augment"], ms["cross_attention"])]
    return {"median_ms": {k: round(statistics.median(v), 2) for k, v in ms.items()},
            "quartiles_ms": {k: [round(x, 2) for x in statistics.quantiles(v, n=4)] for k, v in ms.items()},
            "fused_over_parts": ratio("fused", "parts"),
            "merge_order_over_parts": ratio("fused_merge_order", "parts"),
            "fused_over_merge_order": ratio("fused", "fused_merge_order"),
            "fused_over_each_alone": round(statistics.median(f / s for f, s in zip(ms["fused"], alone)), 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    models = {"anchor": xt_decoder(32000, args.seq, 1024, 12, 16).to(args.device).eval(),
              "augment": xt_decoder(32000, args.seq, 512, 12, 8).to(args.device).eval()}
    results = {}
    for mode in ("shared", "prompt"):
        results[mode] = measure(mode, models, args.device, args.batch, args.seq, args.rounds)
        print(mode, json.dumps(results[mode]), file=sys.stderr, flush=True)
    out = {"question": "fused eager forward, scheduled and in merge order, against the parts",
           "command": "python benchmarks/schedule_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
           "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "results": results}
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""What fusion costs, side by side in one process: the fused graph, the sum of its parts, an eager hook-based
composition, CALM-pytorch, and torch.compile; scaling with augments, depth and sequence length; pruning;
concurrent CUDA streams for independent augments; compile (trace + splice) time on the `meta` device.

    python benchmarks/overhead.py --device cuda --out benchmarks/results/overhead_gpu.json   # H100, bf16
    python benchmarks/overhead.py --device cpu  --out benchmarks/results/overhead_cpu.json   # fp32
    python benchmarks/overhead.py --quick --out /tmp/quick.json                              # CI: it runs

Targets are reported under "targets", never asserted.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import calmgraph as cg  # noqa: E402
from calmgraph.bench import (QUICK, Budget, Parts, bench_composition, dynamo_report, environment,  # noqa: E402
                             forward_inputs, make_inputs, time_round_robin)
from benchmarks.compositions import calm_models, calm_spec, llama, xt_decoder  # noqa: E402


@dataclass(frozen=True)
class Preset:
    autocast: torch.dtype | None   # mixed precision (fp32 weights): x-transformers' masked attention
                                   # returns fp32 from bf16 weights, so pure bf16 fails
    dim: int
    depth: int
    heads: int
    vocab: int
    batch: int
    seq: int
    augments: tuple[int, ...]      # scaling: number of augments
    depths: tuple[int, ...]        # scaling: depth of every model
    seqs: tuple[int, ...]          # scaling: sequence length
    prune_at: tuple[int, ...]      # pruning: the one augment block attended to
    compile_depths: tuple[int, ...]  # compile time: depth of each of three models on `meta`
    compile_families: tuple[str, ...]
    budget: Budget
    sweep_budget: Budget


PRESETS = {
    # The shapes of an earlier H100 measurement of the seed (CALM-pytorch 0.2.x): bf16, batch 8, 1024 tokens,
    # 12-layer anchor and augment; its forward took 1.55x the anchor and augment run apart.
    "cuda": Preset(torch.bfloat16, 768, 12, 12, 32000, 8, 1024, (1, 2, 4, 8), (6, 12, 24), (256, 512, 1024, 2048),
                   (1, 5, 11), (), (), Budget(warmup_s=1.0, rounds=25, max_s=6.0), Budget(warmup_s=1.0, rounds=12, max_s=2.0)),
    "cpu": Preset(None, 256, 8, 4, 4096, 2, 128, (1, 2, 4, 8), (4, 8, 16), (64, 128, 256),
                  (1, 3, 7), (4, 8, 16, 32), ("x-transformers", "llama"), Budget(warmup_s=0.5, rounds=25, max_s=20.0),
                  Budget(warmup_s=0.2, rounds=11, max_s=6.0)),
    "quick": Preset(None, 32, 2, 2, 64, 1, 8, (1, 2), (2,), (8,), (0,), (1, 2), ("x-transformers",), QUICK, QUICK),
}


def composition(p: Preset, device: str, *, n: int = 1, depth: int | None = None, spec: dict | None = None):
    depth = depth or p.depth
    models = calm_models(n, dim=p.dim, depth=depth, heads=p.heads, vocab=p.vocab, device=device)
    composed = cg.compile(spec or calm_spec(n, depth, depth), models=models)
    torch.manual_seed(1)  # zero-initialised output projections make every delta 0: give them weights
    for param in composed.new_parameters():
        torch.nn.init.normal_(param, std=0.02)
    return composed, models


def sweep_row(key: str, value: int, result: dict) -> dict:
    fwd = result["times"]["forward"]
    return {key: value, **{name: t["median_ms"] for name, t in fwd.items()}, "ratios": result["ratios"],
            "compile_seconds": result["compile_seconds"], "blocks_kept": result["fused_graph"]["blocks_kept"]}


def scaling(p: Preset, device: str, log) -> dict:
    variants = ("parts", "hooks", "calm_pytorch")
    out = {"augments": [], "depth": [], "seq_len": []}
    for n in p.augments:
        composed, models = composition(p, device, n=n)
        out["augments"].append(sweep_row("augments", n, bench_composition(
            composed, models, batch=p.batch, seq=p.seq, budget=p.sweep_budget, variants=variants, autocast=p.autocast)))
        log(f"augments={n}", out["augments"][-1])
    for depth in p.depths:
        composed, models = composition(p, device, depth=depth)
        out["depth"].append(sweep_row("depth", depth, bench_composition(
            composed, models, batch=p.batch, seq=p.seq, budget=p.sweep_budget, variants=variants, autocast=p.autocast)))
        log(f"depth={depth}", out["depth"][-1])
    composed, models = composition(p, device)
    for seq in p.seqs:
        out["seq_len"].append(sweep_row("seq_len", seq, bench_composition(
            composed, models, batch=p.batch, seq=seq, budget=p.sweep_budget, variants=variants, autocast=p.autocast)))
        log(f"seq={seq}", out["seq_len"][-1])
    return out


def pruning(p: Preset, device: str, log) -> list[dict]:
    """One augment attended to only at block k: the fused graph should cost what its first k+1 blocks and
    the anchor cost (parts), and less than the graph with pruning off."""
    rows = []
    for k in p.prune_at:
        spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "aug0", "input": "prompt"}],
                "edges": [{"source": "aug0", "target": "anchor", "layers": [[k, p.depth - 1]]}]}
        composed, models = composition(p, device, spec=spec)
        result = bench_composition(composed, models, batch=p.batch, seq=p.seq, budget=p.sweep_budget,
                                   variants=("parts", "unpruned"), autocast=p.autocast)
        rows.append(sweep_row("tapped_block", k, result))
        log(f"prune at {k}", rows[-1])
    return rows


def streams(p: Preset, device: str, log) -> list[dict]:
    """Independent augments on their own CUDA streams vs one after another (augment parts only: the
    upper bound of what streams could save inside the fused graph)."""
    rows = []
    composed, models = composition(p, device, n=4)
    for batch, seq in ((1, 256), (p.batch, p.seq)):
        inputs = forward_inputs(make_inputs(composed, models, batch=batch, seq=seq))
        parts = Parts(composed, models, inputs)
        names = [a.name for a in composed.spec.augments]
        side = [torch.cuda.Stream() for _ in names]

        def sequential():
            for name in names:
                parts.model(name, inputs)

        def concurrent():
            main = torch.cuda.current_stream()
            for stream, name in zip(side, names):
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    parts.model(name, inputs)
            for stream in side:
                main.wait_stream(stream)

        with torch.no_grad(), torch.autocast("cuda", dtype=p.autocast, enabled=p.autocast is not None):
            t = time_round_robin({"sequential": sequential, "streams": concurrent}, torch.device(device), p.budget)
        rows.append({"augments": len(names), "batch": batch, "seq": seq,
                     **{k: v["median_ms"] for k, v in t.items()},
                     "speedup": t["sequential"]["median_ms"] / t["streams"]["median_ms"]})
        log("streams", rows[-1])
    return rows


def compile_time(p: Preset, log) -> list[dict]:
    """cg.compile of an anchor and two augments, all of one depth, built on `meta` (no weights): x-transformers
    (fx front end) and HF Llama from a config (torch.export front end)."""
    rows = []
    families = {"x-transformers": ("x-transformers (fx)", lambda d: xt_decoder(1024, d, 16, 32000, device="meta")),
                "llama": ("llama (torch.export)", lambda d: llama(d))}
    for family, build in (families[f] for f in p.compile_families):
        for depth in p.compile_depths:
            spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "aug0"}, {"name": "aug1"}],
                    "edges": [{"source": a, "target": "anchor", "layers": {"every": min(4, depth)}} for a in ("aug0", "aug1")]}
            models = {n: build(depth) for n in ("anchor", "aug0", "aug1")}
            started = time.perf_counter()
            composed = cg.compile(spec, models=models)
            rows.append({"family": family, "depth": depth, "total_depth": 3 * depth,
                         "seconds": time.perf_counter() - started, "nodes": len(composed.graph.nodes)})
            log("compile", rows[-1])
    return rows


def linear_fit(rows: list[dict]) -> dict:
    """Least-squares seconds = a + b * total_depth per family, with R^2: is growth linear?"""
    fits = {}
    for family in sorted({r["family"] for r in rows}):
        xs = [r["total_depth"] for r in rows if r["family"] == family]
        ys = [r["seconds"] for r in rows if r["family"] == family]
        if len(xs) < 2:
            continue
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = my - b * mx
        ss = sum((y - my) ** 2 for y in ys)
        r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / ss if ss else 1.0
        fits[family] = {"seconds_at_0": a, "seconds_per_block": b, "r2": r2}
    return fits


def targets(report: dict) -> dict:
    main = report["main"]
    r = main["ratios"]
    out = {"fusion_overhead_pct (target <= 3)": 100 * (r["fused/parts"] - 1),
           "input_checks: fused vs fused_no_checks, % (noise-limited)":
               100 * (1 / r["fused_no_checks/fused"] - 1) if r.get("fused_no_checks/fused") else None,
           "input_checks: us per forward, timed alone": main["notes"].get("input_checks_us"),
           "input_checks: % of fused forward": (main["notes"]["input_checks_us"] / 10 / main["times"]["forward"]["fused"]["median_ms"]
                                                if "input_checks_us" in main["notes"] else None),
           "calm_pytorch/compiled forward (target >= 1.5)": r.get("calm_pytorch/compiled"),
           "calm_pytorch/compiled train step (target >= 1.5)": r.get("train.calm_pytorch/compiled"),
           "calm_pytorch/cudagraphs forward": r.get("calm_pytorch/cudagraphs"),
           "graph_breaks (target 0)": report.get("dynamo", {}).get("graph_breaks"),
           "recompiles_same_shapes (target 0)": report.get("dynamo", {}).get("recompiles_same_shapes")}
    if report.get("pruning"):
        out["pruning: fused/parts at each tapped block (target <= 1.03)"] = {
            row["tapped_block"]: row["ratios"]["fused/parts"] for row in report["pruning"]}
        out["pruning: unpruned/fused (> 1 means pruning saves)"] = {
            row["tapped_block"]: row["ratios"]["fused_unpruned/fused"] for row in report["pruning"]}
    if report.get("streams"):
        out["streams: speedup over sequential augments"] = {f"batch {s['batch']}": s["speedup"] for s in report["streams"]}
    if report.get("compile_time_fit"):
        out["compile_time: linear fit r2"] = {k: v["r2"] for k, v in report["compile_time_fit"].items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few rounds: checks that everything runs")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                    help="time torch.compile (auto: on GPU only; inductor on 2 CPU cores takes many minutes)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["scaling", "pruning", "streams", "compile_time"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p = PRESETS["quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")]
    with_compile = args.compile == "yes" or (args.compile == "auto" and args.device.startswith("cuda"))
    out = Path(args.out)

    def log(what, row):
        print(f"[{time.strftime('%H:%M:%S')}] {what}: {json.dumps(row, default=str)[:400]}", flush=True)

    report = {**environment(["python", *sys.argv] if argv is None else ["python", "benchmarks/overhead.py", *argv]),
              "device": args.device, "preset": {k: str(v) for k, v in p.__dict__.items()}}
    if hasattr(__import__("os"), "getloadavg"):
        report["machine"]["load_average_at_start"] = __import__("os").getloadavg()
    def section(name, fn):  # one failing section is recorded, not fatal; the file is written as it grows
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001
            import traceback
            report.setdefault("errors", {})[name] = traceback.format_exc()[-3000:]
            log(f"{name} FAILED", {"error": f"{type(e).__name__}: {e}"})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))

    composed, models = composition(p, args.device, n=1)
    variants = ("parts", "part_detail", "hooks", "no_checks", "unpruned", "calm_pytorch", "train") + (("compiled",) if with_compile else ())
    def main_composition():
        result = bench_composition(composed, models, batch=p.batch, seq=p.seq, budget=p.budget, variants=variants,
                                   autocast=p.autocast)
        log("main", result["ratios"])
        return {**result, "spec": calm_spec(1, p.depth, p.depth)}

    inputs = make_inputs(composed, models, batch=p.batch, seq=p.seq)
    section("main", main_composition)
    def dynamo():
        with torch.autocast(args.device.split(":")[0], dtype=p.autocast, enabled=p.autocast is not None):
            return dynamo_report(composed, inputs, other_seq=p.seq // 2, backend="eager")

    section("dynamo", dynamo)
    log("dynamo", report.get("dynamo"))
    if "scaling" not in args.skip:
        section("scaling", lambda: scaling(p, args.device, log))
    if "pruning" not in args.skip:
        section("pruning", lambda: pruning(p, args.device, log))
    if "streams" not in args.skip and args.device.startswith("cuda"):
        section("streams", lambda: streams(p, args.device, log))
    if "compile_time" not in args.skip and p.compile_depths:
        section("compile_time", lambda: compile_time(p, log))
        section("compile_time_fit", lambda: linear_fit(report["compile_time"]))
    section("targets", lambda: targets(report))
    print(json.dumps(report.get("targets"), indent=2, default=str))
    return 1 if report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())

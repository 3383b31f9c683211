"""Plot and tabulate benchmark results: scaling with augments and sequence length, and the main table.

    python benchmarks/plot.py benchmarks/results/overhead_gpu.json benchmarks/results/overhead_cpu.json \
        --png benchmarks/results/scaling.png          # also prints the README's markdown tables
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

VARIANTS = {"fused": "calmgraph fused (eager)", "parts": "sum of parts", "hooks": "eager hooks",
            "calm_pytorch": "CALM-pytorch"}
STYLE = {"fused": dict(color="C0", marker="o", lw=2), "parts": dict(color="k", marker="", ls="--"),
         "hooks": dict(color="C1", marker="s"), "calm_pytorch": dict(color="C3", marker="^")}


def label(report: dict) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"CPU ({m['cpu_count']} cores)"
    return f"{where}, {report['main'].get('autocast') or 'fp32'}"


def plot(reports: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(reports), 2, figsize=(11, 4.2 * len(reports)), squeeze=False)
    for row, report in zip(axes, reports):
        preset = report["preset"]
        for ax, key, xlabel in ((row[0], "augments", "number of augments"), (row[1], "seq_len", "sequence length")):
            rows = report["scaling"][key]
            xs = [r[key] for r in rows]
            for name, text in VARIANTS.items():
                if all(name in r for r in rows):
                    ax.plot(xs, [r[name] for r in rows], label=text, **STYLE[name])
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("forward, median ms")
            fixed = (f"batch {preset['batch']}, seq {preset['seq']}" if key == "augments"
                     else f"batch {preset['batch']}, 1 augment")
            ax.set_title(f"{label(report)}\n{preset['depth']}-layer models, dim {preset['dim']}, {fixed}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def markdown(report: dict) -> str:
    main = report["main"]
    fwd, train = main["times"]["forward"], main["times"].get("train", {})
    mem_f, mem_t = main["memory_mb"]["forward"], main["memory_mb"].get("train", {})
    names = ["fused", "parts", "fused_no_checks", "fused_unpruned", "hooks", "calm_pytorch", "compiled", "cudagraphs"]
    lines = ["| variant | forward ms | x fused | train step ms | x fused | peak MB fwd / train |", "|---|---|---|---|---|---|"]
    for name in names:
        if name not in fwd and name not in train:
            continue
        f = fwd.get(name, {}).get("median_ms")
        t = train.get(name, {}).get("median_ms")
        cells = [f"{f:.2f}" if f else "", f"{f / fwd['fused']['median_ms']:.3f}" if f else "",
                 f"{t:.2f}" if t else "", f"{t / train['fused']['median_ms']:.3f}" if t else ""]
        mf, mt = mem_f.get(name), mem_t.get(name)
        mem = " / ".join(f"{m:.0f}" if m is not None else "-" for m in (mf, mt)) if (mf or mt) else "n/a"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--png", required=True)
    args = ap.parse_args(argv)
    reports = [json.loads(Path(p).read_text()) for p in args.results]
    plot([r for r in reports if "scaling" in r], Path(args.png))
    for path, report in zip(args.results, reports):
        print(f"\n### {label(report)} ({path})\n\n{markdown(report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

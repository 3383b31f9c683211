"""Inspect a composition: each model's blocks and the layer pairs of every edge, as text, as a picture
(SVG or PNG, matplotlib) and as a Mermaid block for Markdown.

Everything here reads a compiled `ComposedModel` (`composed.taps`, `composed.links`, `composed.pruned`);
compiling on the `meta` device is enough, so a spec can be inspected without real weights.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import networkx as nx

from .graph import composition_graph
from .report import role as _role, table


def blocks_run(composed, name: str) -> int:
    kept = composed.pruned.blocks_kept.get(name)
    return len(composed.taps[name]) if kept is None or not composed.pruned.nodes_removed else kept


def edge_pairs(composed) -> dict[int, list[tuple[int, int]]]:
    pairs = defaultdict(list)
    for link in composed.links:
        pairs[link.edge].append((link.source_layer, link.target_layer))
    return pairs


# -- text ----------------------------------------------------------------------------------------------
def report(composed) -> str:
    """Per model, its blocks (index, qualified name, hidden size) and what each is wired to; then the edges."""
    wired = defaultdict(list)  # (model, block) -> ["-> base[2]", "<- arith[1]"]
    for link in composed.links:
        wired[link.source, link.source_layer].append(f"-> {link.target}[{link.target_layer}]")
        wired[link.target, link.target_layer].append(f"<- {link.source}[{link.source_layer}]")
    parts = []
    for m in composed.spec.models:
        taps, run = composed.taps[m.name], blocks_run(composed, m.name)
        rows = [[t.index, t.name, t.dim, " ".join(wired[m.name, t.index]) or ("(pruned)" if t.index >= run else "")]
                for t in taps]
        parts.append(f"{m.name}: {_role(composed.spec, m.name)}, {len(taps)} blocks, {composed.frontends[m.name]} front end\n"
                     + table(rows, ["index", "block", "hidden", "cross-attention"]))
    pairs = edge_pairs(composed)
    edges = [[f"edges[{i}]", f"{e.source} -> {e.target}", _layers(e.layers),
              ", ".join(f"{s}->{t}" for s, t in pairs[i])] for i, e in enumerate(composed.spec.edges)]
    parts.append(table(edges, ["edge", "models", "layers (spec)", "resolved pairs (source->target)"]))
    return "\n\n".join(parts)


def _layers(layers) -> str:
    return f"every {layers.every}" if hasattr(layers, "every") else json.dumps([list(p) for p in layers])


# -- Mermaid -------------------------------------------------------------------------------------------
def mermaid(composed) -> str:
    """A ```mermaid block: models as nodes (the anchor stands out), edges labelled with their layer pairs."""
    lines = ["```mermaid", "flowchart LR"]
    for m in composed.spec.models:
        taps = composed.taps[m.name]
        label = f"<b>{m.name}</b><br/>{_role(composed.spec, m.name)}<br/>{len(taps)} blocks, d={taps[0].dim}"
        lines.append(f'    {m.name}["{label}"]')
    pairs = edge_pairs(composed)
    for i, e in enumerate(composed.spec.edges):
        label = ", ".join(f"{s}→{t}" for s, t in pairs[i])
        arrow = "-.->" if composed.spec.model(e.source).input == "prompt" else "-->"
        lines.append(f'    {e.source} {arrow}|"{label}"| {e.target}')
    lines += ["    classDef anchor fill:#d6e6f7,stroke:#1f5fa8,stroke-width:2px,color:#0b2545",
              "    classDef shared fill:#fde7cf,stroke:#c26a09,color:#4a2a04",
              "    classDef prompt fill:#dcf1e1,stroke:#2f8a4c,color:#12391f",
              f"    class {composed.spec.anchor.name} anchor"]
    for kind in ("shared", "prompt"):
        names = [a.name for a in composed.spec.augments if a.input == kind]
        if names:
            lines.append(f"    class {','.join(names)} {kind}")
    lines.append("```")
    return "\n".join(lines)


# -- picture -------------------------------------------------------------------------------------------
STYLE = {  # fill, edge colour, text colour
    "anchor": ("#d6e6f7", "#1f5fa8", "#0b2545"),
    "shared": ("#fde7cf", "#c26a09", "#4a2a04"),
    "prompt": ("#dcf1e1", "#2f8a4c", "#12391f"),
}
EDGE_COLOURS = ["#c2410c", "#15803d", "#7c3aed", "#be185d", "#0e7490", "#a16207"]
CELL_H, CELL_W, COL_GAP, ROW_GAP, HEADER = 0.36, 1.9, 1.9, 0.9, 0.95  # inches


def _kind(composed, name) -> str:
    return "anchor" if name == composed.spec.anchor.name else composed.spec.model(name).input


def _layout(composed) -> dict[str, tuple[float, float]]:
    """(x, y of the bottom block) per model: the anchor in the right column, each augment one column further
    left per edge between it and the anchor; the models of a column stacked, the column centred."""
    g = composition_graph(composed.spec)
    anchor = composed.spec.anchor.name
    depth = {n: max((len(p) - 1 for p in nx.all_simple_paths(g, n, anchor)), default=0) for n in g if n != anchor}
    depth[anchor] = 0
    columns = defaultdict(list)
    for m in composed.spec.models:
        columns[depth[m.name]].append(m.name)
    height = {n: len(composed.taps[n]) * CELL_H + HEADER for n in depth}
    total = {c: sum(height[n] for n in names) + ROW_GAP * (len(names) - 1) for c, names in columns.items()}
    tallest = max(total.values())
    n_cols = max(columns) + 1
    pos = {}
    for c, names in columns.items():
        x = (n_cols - 1 - c) * (CELL_W + COL_GAP)
        y = (tallest - total[c]) / 2
        for n in reversed(names):  # first-listed model on top
            pos[n] = (x, y)
            y += height[n] + ROW_GAP
    return pos


def _on_arc(start, end, rad: float, t: float) -> tuple[float, float]:
    """The point at `t` on matplotlib's arc3 connection (a quadratic Bezier with this control point)."""
    (x1, y1), (x2, y2) = start, end
    cx, cy = (x1 + x2) / 2 + rad * (y2 - y1), (y1 + y2) / 2 - rad * (x2 - x1)
    return ((1 - t) ** 2 * x1 + 2 * t * (1 - t) * cx + t ** 2 * x2,
            (1 - t) ** 2 * y1 + 2 * t * (1 - t) * cy + t ** 2 * y2)


def draw(composed, path: str | Path, title: str | None = None) -> Path:
    """Draw the composition to `path` (.svg, .png or .pdf): each model a stack of its blocks (block 0 at the
    bottom), every cross-attention pair an arrow from the source block to the target block."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

    path = Path(path)
    pos = _layout(composed)
    width = max(x for x, _ in pos.values()) + CELL_W
    height = max(y + len(composed.taps[n]) * CELL_H + HEADER for n, (_, y) in pos.items())
    fig = plt.figure(figsize=(width + 1.2, height + 1.7))  # axes in inches: arcs and text keep their shape
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.6, width + 0.6)
    ax.set_ylim(-1.1, height + 0.6)
    ax.axis("off")

    def cell_centre(name, index):
        x, y = pos[name]
        return x + CELL_W / 2, y + (index + 0.5) * CELL_H

    for m in composed.spec.models:
        kind = _kind(composed, m.name)
        fill, line, text = STYLE[kind]
        x, y = pos[m.name]
        taps = composed.taps[m.name]
        run = blocks_run(composed, m.name)
        box_h = len(taps) * CELL_H + HEADER
        ax.add_patch(FancyBboxPatch((x - 0.08, y - 0.08), CELL_W + 0.16, box_h + 0.08,
                                    boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=fill, edgecolor=line,
                                    linewidth=2.4 if kind == "anchor" else 1.4,
                                    linestyle="--" if kind == "prompt" else "-", zorder=1))
        for t in taps:
            pruned = t.index >= run
            ax.add_patch(FancyBboxPatch((x + 0.12, y + t.index * CELL_H + 0.04), CELL_W - 0.24, CELL_H - 0.08,
                                        boxstyle="round,pad=0,rounding_size=0.05",
                                        facecolor="#f1f1f1" if pruned else "white",
                                        edgecolor="#bdbdbd" if pruned else line, linewidth=0.9,
                                        linestyle=":" if pruned else "-", zorder=2))
            ax.text(x + CELL_W / 2, y + (t.index + 0.5) * CELL_H, f"block {t.index}" + ("  (pruned)" if pruned else ""),
                    ha="center", va="center", fontsize=8.5, color="#9e9e9e" if pruned else text, zorder=3)
        top = y + len(taps) * CELL_H
        ax.text(x + CELL_W / 2, top + HEADER * 0.62, m.name, ha="center", va="center", fontsize=13,
                fontweight="bold", color=text)
        detail = "anchor" if m.name == composed.spec.anchor.name else f"augment · {m.input}"
        ax.text(x + CELL_W / 2, top + HEADER * 0.25, f"{detail} · d={taps[0].dim}", ha="center", va="center",
                fontsize=8.5, color=text)

    for k, link in enumerate(composed.links):
        colour = EDGE_COLOURS[link.edge % len(EDGE_COLOURS)]
        (sx, sy), (tx, ty) = cell_centre(link.source, link.source_layer), cell_centre(link.target, link.target_layer)
        start, end = (sx + CELL_W / 2 - 0.12, sy), (tx - CELL_W / 2 + 0.12, ty)
        rad = 0.0 if abs(sy - ty) < 1e-6 else (-0.12 if ty > sy else 0.12)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>,head_length=7,head_width=4", color=colour,
                                     linewidth=1.8, connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2, zorder=4))
        mx, my = _on_arc(start, end, rad, (0.6, 0.45, 0.75)[k % 3])  # staggered: crossing labels stay apart
        ax.text(mx, my, f"{link.source_layer}→{link.target_layer}", ha="center", va="center", fontsize=8.5,
                color=colour, fontweight="bold", zorder=5,
                bbox={"boxstyle": "round,pad=0.18", "facecolor": "white", "edgecolor": colour, "linewidth": 0.8})

    n_new = sum(p.numel() for p in composed.new_parameters())
    n_all = sum(p.numel() for p in composed.parameters())
    ax.text(width / 2, height + 0.3, title or f"{len(composed.links)} cross-attention blocks · "
            f"{n_new:,} new parameters ({100 * n_new / max(1, n_all):.1f}% of all)",
            ha="center", va="center", fontsize=10, color="#333333")
    # the legend names only what the picture shows
    kinds = {_kind(composed, m.name) for m in composed.spec.models}
    any_pruned = any(blocks_run(composed, n) < len(composed.taps[n]) for n in pos)
    legend = [Patch(facecolor=STYLE["anchor"][0], edgecolor=STYLE["anchor"][1], linewidth=2, label="anchor (frozen)")]
    if "shared" in kinds:
        legend.append(Patch(facecolor=STYLE["shared"][0], edgecolor=STYLE["shared"][1],
                            label="augment, same tokens (causal)"))
    if "prompt" in kinds:
        legend.append(Patch(facecolor=STYLE["prompt"][0], edgecolor=STYLE["prompt"][1], linestyle="--",
                            label="augment, own prompt"))
    if any_pruned:
        legend.append(Patch(facecolor="#f1f1f1", edgecolor="#bdbdbd", linestyle=":", label="pruned (never computed)"))
    ax.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False,
              fontsize=8.5, handlelength=1.6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=160, facecolor="white")
    plt.close(fig)
    return path

"""Plain-text tables describing a composition (what `calmgraph demo` prints)."""
from __future__ import annotations

from collections import defaultdict


def role(spec, name: str) -> str:
    """`anchor`, or `augment (shared)` / `augment (prompt)`."""
    return "anchor" if spec.role(name) == "anchor" else f"augment ({spec.model(name).input})"


def table(rows: list[list], header: list[str]) -> str:
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def parameter_counts(composed) -> tuple[int, int]:
    """(new, total): the new cross-attention parameters and all parameters, each tensor counted once."""
    new = sum(p.numel() for p in composed.new_parameters())
    return new, sum(p.numel() for p in composed.parameters())


def trainable_parameters(composed) -> str:
    """The line PEFT's `print_trainable_parameters` prints: new over total (frozen models included)."""
    new, total = parameter_counts(composed)
    return f"trainable params: {new:,} || all params: {total:,} || trainable%: {100 * new / max(1, total):.4f}"


def summary(composed) -> str:
    spec, pruned = composed.spec, composed.pruned
    frozen = defaultdict(int)
    for name, p in composed.named_parameters():
        if not p.requires_grad:
            frozen[name.split(".")[0]] += p.numel()
    models = []
    for m in spec.models:
        kept = (f"{pruned.blocks_kept[m.name]}/{pruned.blocks_total[m.name]}" if m.name in pruned.blocks_kept
                else "all")
        head = "removed" if pruned.head_removed.get(m.name) else "kept"
        models.append([m.name, role(spec, m.name), composed.frontends[m.name], f"{frozen[m.name]:,}", kept, head,
                       pruned.nodes_before.get(m.name, 0) - pruned.nodes_after.get(m.name, 0)])
    pairs = defaultdict(list)
    params = defaultdict(int)
    for link in composed.links:
        pairs[link.edge].append(f"{link.source_layer}->{link.target_layer}")
        block = composed.get_submodule(link.qualified_name)
        params[link.edge] += sum(p.numel() for p in block.parameters())
    heads = {link.edge: link.heads for link in composed.links}
    edges = [[f"{e.source} -> {e.target}", " ".join(pairs[i]) or "none (pruned: it feeds nothing the anchor reads)",
              heads.get(i, "-"), f"{params[i]:,}"] for i, e in enumerate(spec.edges)]
    seconds = f"{composed.compile_seconds:.2f} s" if composed.compile_seconds is not None else "n/a"
    return "\n\n".join([
        table(models, ["model", "role", "front end", "frozen params", "blocks run", "head", "nodes pruned"]),
        table(edges, ["edge", "layer pairs (source->target)", "heads", "new params"]),
        f"{trainable_parameters(composed)}\n"
        f"fused graph: {len(composed.graph.nodes)} nodes, {pruned.nodes_removed} pruned; compiled in {seconds}",
    ])

"""Pass 2, resolve: every edge's layer references -> concrete (source block, target block) links.

Runs on the traced models, before anything is built: every reference that does not fit its model is
reported at once, with its location in the spec, a "did you mean", and the model's tap points.
"""
from __future__ import annotations

import difflib
import math

from ..errors import LayerRefError, Problem, TraceError
from ..plan import Link
from ..spec import CompositionSpec, CrossAttentionSpec, EdgeSpec, Every
from .base import CompileState, Pass, PassResult, TracedModel


def every_pairs(k: int, n_source: int, n_target: int) -> list[tuple[int, int]]:
    """The paper's choice: source layers k-1, 2k-1, ... (n = n_source // k) with n target layers spread
    uniformly, the last pair at the target's last block (target i = round((i+1) * n_target / n) - 1)."""
    n = n_source // k
    return [((i + 1) * k - 1, max(0, math.floor((i + 1) * n_target / n + 0.5) - 1)) for i in range(n)]


def _tap_list(model: TracedModel) -> str:
    names = [b.name for b in model.blocks]
    shown = names if len(names) <= 8 else [*names[:3], "...", *names[-3:]]
    return f"{len(names)} blocks: {', '.join(shown)}"


def _resolve_ref(ref, model: TracedModel, loc: str, problems: list[Problem]) -> int | None:
    n = len(model.blocks)
    if isinstance(ref, int):
        if -n <= ref < n:
            return ref % n
        problems.append(Problem(loc, f"layer {ref} is out of range for {model.name!r}, which has {n} blocks "
                                     f"(0..{n - 1}, or -{n}..-1 from the end)"))
        return None
    for block in model.blocks:
        if block.name == ref:
            return block.index
    close = difflib.get_close_matches(ref, [b.name for b in model.blocks], n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    problems.append(Problem(loc, f"{ref!r} is not a block of {model.name!r}; {hint}tap points: {_tap_list(model)}"))
    return None


def _heads(config: CrossAttentionSpec, target: TracedModel) -> tuple[int, int]:
    heads = config.heads or (target.heads if target.heads and target.dim % target.heads == 0 else None)
    heads = heads or max(1, target.dim // 64)
    return heads, config.dim_head or max(1, target.dim // heads)


def _where(edge: EdgeSpec, i: int, field: str) -> str:
    """Where a cross-attention field of edge i was set: the edge's override, else the spec-wide default."""
    own = edge.cross_attention is not None and getattr(edge.cross_attention, field) is not None
    return f"edges[{i}].cross_attention.{field}" if own else f"cross_attention.{field}"


def resolve(spec: CompositionSpec, traced: dict[str, TracedModel]) -> list[Link]:
    problems: list[Problem] = []
    links: list[Link] = []
    inputs = {m.name: "prompt" if m.is_prompt else "shared" for m in spec.models}
    for i, edge in enumerate(spec.edges):
        source, target = traced[edge.source], traced[edge.target]
        config = spec.cross_attention_for(edge)
        if not config.project_context and source.dim != target.dim:
            problems.append(Problem(f"edges[{i}].cross_attention.project_context",
                                    f"false needs equal hidden sizes, but {source.name!r} has {source.dim} and "
                                    f"{target.name!r} {target.dim}; set it to true"))
        rotary = config.positions == "rotary"
        for field, used, off in (("positions", rotary, "positions: none"), ("window", config.window, "window: null")):
            if used and inputs[edge.source] != "shared":
                problems.append(Problem(_where(edge, i, field), f"{field} needs the source to read the anchor's tokens, "
                                        f"but {edge.source!r} has input: {inputs[edge.source]} (its positions are not "
                                        f"the anchor's); use {off} for this edge"))
        if config.writes == "masked" and inputs[edge.target] != "shared":
            problems.append(Problem(_where(edge, i, "writes"), f"masked writes follow `write_mask` over the anchor's "
                                    f"tokens, but the target {edge.target!r} reads a prompt of its own; use "
                                    "writes: all for this edge"))
        if isinstance(edge.layers, Every):
            if edge.layers.every > len(source.blocks):
                problems.append(Problem(f"edges[{i}].layers.every",
                                        f"{edge.layers.every} exceeds the depth of {source.name!r} ({len(source.blocks)} blocks)"))
                continue
            pairs = every_pairs(edge.layers.every, len(source.blocks), len(target.blocks))
        else:
            pairs = []
            for j, (s, t) in enumerate(edge.layers):
                rs = _resolve_ref(s, source, f"edges[{i}].layers[{j}][0]", problems)
                rt = _resolve_ref(t, target, f"edges[{i}].layers[{j}][1]", problems)
                if rs is not None and rt is not None:
                    pairs.append((rs, rt))
        heads, dim_head = _heads(config, target)
        if rotary and dim_head % 2:
            problems.append(Problem(_where(edge, i, "positions"), f"rotary positions turn channel pairs, but "
                                    f"dim_head is {dim_head} (odd); set cross_attention.dim_head to an even number"))
        for s, t in pairs:
            links.append(Link(i, edge.source, edge.target, s, t, source.dim, target.dim, heads, dim_head,
                              config, causal=inputs[edge.source] == "shared"))
    seen: dict[tuple, int] = {}
    for link in links:
        key = (link.source, link.target, link.source_layer, link.target_layer)
        if key in seen:
            problems.append(Problem(f"edges[{link.edge}].layers",
                                    f"layer pair ({link.source_layer}, {link.target_layer}) of {link.source!r} -> "
                                    f"{link.target!r} is also given by edges[{seen[key]}]"))
        seen.setdefault(key, link.edge)
    if problems:
        raise LayerRefError(problems)
    refuse_looped(spec, traced, links)
    return links


def refuse_looped(spec: CompositionSpec, traced: dict[str, TracedModel], links: list[Link]) -> None:
    """A tap holds one value per forward: a block that runs several times (a looped middle, a shared
    block) has no single output to read or add to, so a link that taps one is refused, not composed."""
    found: dict[tuple[str, int], list[str]] = {}
    for link in links:
        for name, layer, role in ((link.source, link.source_layer, "source"), (link.target, link.target_layer, "target")):
            block, runs = traced[name].tap_runs(layer, spec.model(name).tap)
            if runs > 1:
                found.setdefault((name, layer), []).append(f"edges[{link.edge}].layers ({role})")
    if not found:
        return
    lines = []
    for (name, layer), where in found.items():
        model, tap = traced[name], spec.model(name).tap
        block, runs = model.tap_runs(layer, tap)
        what = (f"tap: input of block {model.blocks[layer].name!r} reads the output of block "
                f"{model.blocks[block].name!r}, which" if block != layer else f"block {model.blocks[block].name!r}")
        once = [b.name for i, b in enumerate(model.blocks) if model.tap_runs(i, tap)[1] == 1]
        shown = once if len(once) <= 6 else [*once[:3], "...", *once[-2:]]
        lines.append(f"  - {name!r}: {what} runs {runs} times in one forward (tapped by {', '.join(dict.fromkeys(where))}); "
                     + (f"blocks of {name!r} that run once: {', '.join(shown)}" if once
                        else f"no block of {name!r} runs once"))
    raise TraceError(
        "a tapped block runs more than once in one forward (a looped or shared block):\n" + "\n".join(lines) +
        "\na tap holds one value per forward, so a cross-attention cannot be added to (or read from) every run; "
        "composing one run would silently differ from the model. Tap blocks that run once in `layers:`, or name "
        "a block list whose blocks each run once with `blocks:`")


class Resolve(Pass):
    """Layer references -> the plan: one `Link` per cross-attention block."""

    requires = ("traced",)
    ensures = ("links",)

    def call(self, state: CompileState) -> PassResult:
        state.links = resolve(state.spec, state.traced)
        return PassResult(state, False)

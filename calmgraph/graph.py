"""The composition graph: models as nodes, edges from the model read to the model it feeds (networkx).

It decides what a spec may say about its models as a whole: one anchor, unique names, no cycles, every
augment reaching the anchor, no way for the future of the shared sequence to leak into the past.
"""
from __future__ import annotations

import keyword

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from .errors import Problem

# The functions take a `CompositionSpec` (`spec`); spec.py imports this module to check itself, so this
# module does not import it back.


# A model's name becomes an attribute of the composed model (a torch.fx GraphModule: `composed.kv`) and a
# prefix of its graph's names. These are ComposedModel's own names beyond a GraphModule's (composed.py,
# splice.ROOT); a test checks that every public name of a compiled composition is reserved.
COMPOSED_NAMES = ("spec", "links", "pruned", "frontends", "input_names", "signature", "taps", "compile_seconds",
                  "compile_log", "from_state", "print_trainable_parameters", "anchor_model", "traced_model",
                  "source_dir", "recorded_spec",
                  "new_parameters", "named_new_parameters", "loss", "generate", "export", "save_new", "summary", "xattn")
# Added to nn.Module itself by a library once it builds a model (transformers: `smart_apply`): reserved
# even before that happens in this process.
PATCHED_NAMES = ("smart_apply",)


def reserved_names() -> frozenset[str]:
    """Names no model may have: Python's keywords and every public name of a GraphModule instance
    (nn.Module's methods, `graph`, `code`, `meta`, `training`, ...) or of a ComposedModel. Computed at each
    call: libraries add names to nn.Module at run time."""
    module = fx.GraphModule(nn.Module(), fx.Graph())
    return (frozenset(n for n in dir(module) if not n.startswith("_")) | frozenset(COMPOSED_NAMES)
            | frozenset(PATCHED_NAMES) | frozenset(keyword.kwlist))


def name_problem(name: str) -> str | None:
    if keyword.iskeyword(name):
        return f"{name!r} is a Python keyword; a model's name becomes an attribute of the composed model"
    if name in reserved_names():
        return (f"{name!r} is the name of an attribute or method of the composed model (a torch.fx GraphModule); "
                "choose another name")
    return None


def composition_graph(spec) -> nx.DiGraph:
    """Node attributes: `role` (anchor | augment), `input` (shared | prompt). Edge attribute: `index` list."""
    g = nx.DiGraph()
    g.add_node(spec.anchor.name, role="anchor", input="shared")
    for aug in spec.augments:
        g.add_node(aug.name, role="augment", input=aug.input)
    for i, edge in enumerate(spec.edges):
        if g.has_edge(edge.source, edge.target):
            g.edges[edge.source, edge.target]["index"].append(i)
        else:
            g.add_edge(edge.source, edge.target, index=[i])
    return g


def build_order(spec) -> list[str]:
    """Models in an order where every model comes after all it reads; the anchor last."""
    return list(nx.lexicographical_topological_sort(composition_graph(spec)))


def graph_problems(spec) -> list[Problem]:
    problems: list[Problem] = []
    anchor = spec.anchor.name
    names = {anchor: "anchor.name"}
    for loc, model in [("anchor", spec.anchor), *((f"augments[{i}]", a) for i, a in enumerate(spec.augments))]:
        problem = name_problem(model.name)
        if problem:
            problems.append(Problem(f"{loc}.name", problem))
    for i, aug in enumerate(spec.augments):
        if aug.name == anchor:
            problems.append(Problem(f"augments[{i}].name", f"{aug.name!r} is the anchor; a model cannot be both anchor and augment"))
        elif aug.name in names:
            problems.append(Problem(f"augments[{i}].name", f"duplicate model name {aug.name!r} (also at {names[aug.name]})"))
        else:
            names[aug.name] = f"augments[{i}].name"
    for i, aug in enumerate(spec.augments):
        if aug.prompt_input != "input_ids" and aug.input != "prompt":
            problems.append(Problem(f"augments[{i}].prompt_input", f"{aug.prompt_input} is the form of a prompt, but "
                                    f"{aug.name!r} reads the shared sequence; set input: prompt"))
    known = ", ".join(names)
    inputs = {anchor: "shared", **{a.name: a.input for a in spec.augments}}

    for i, edge in enumerate(spec.edges):
        for end in ("source", "target"):
            name = getattr(edge, end)
            if name not in names:
                problems.append(Problem(f"edges[{i}].{end}", f"unknown model {name!r} (models: {known})"))
        if edge.source == edge.target:
            problems.append(Problem(f"edges[{i}]", f"self-loop: {edge.source!r} cannot attend to itself"))
        elif edge.source == anchor:
            problems.append(Problem(f"edges[{i}].source", f"the anchor {anchor!r} is what the composition computes; it cannot feed another model"))
        elif inputs.get(edge.source) == "shared" and inputs.get(edge.target) == "prompt":
            problems.append(Problem(
                f"edges[{i}]",
                f"{edge.source!r} reads the shared sequence and {edge.target!r} a prompt: the prompt model would "
                f"see the whole shared sequence and leak its future into the anchor; make {edge.source!r} a prompt "
                f"augment or {edge.target!r} a shared one"))
        if isinstance(edge.layers, list):
            seen: dict[tuple, int] = {}
            for j, pair in enumerate(edge.layers):
                if pair in seen:
                    problems.append(Problem(f"edges[{i}].layers[{j}]", f"duplicate layer pair {list(pair)} (also at layers[{seen[pair]}])"))
                seen.setdefault(pair, j)
    if problems:
        return problems  # the graph checks below assume known, distinct names

    g = composition_graph(spec)
    try:
        cycle = nx.find_cycle(g)
        path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        problems.append(Problem("edges", f"cycle {path}: a model cannot (indirectly) attend to itself"))
    except nx.NetworkXNoCycle:
        pass
    for i, aug in enumerate(spec.augments):
        if not nx.has_path(g, aug.name, anchor):
            problems.append(Problem(f"augments[{i}]", f"augment {aug.name!r} reaches the anchor {anchor!r} through no edge; add an edge or remove it"))
    return problems

"""`calmgraph validate`: every problem a spec file has, in one run.

A spec is checked in three stages: its shape (pydantic), its composition graph (names, cycles, reach)
and its layer references against the models' structure. A stage's problems do not stop the next ones
where the spec can be repaired enough to go on: a key that is unknown or wrong and optional is dropped
(its default applies), an edge with a wrong required field is left out, and the later stages check what
remains. Problems that only follow from such a repair are not reported.

    problems, spec, n_pairs = check("composition.yaml")
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import yaml

from .errors import CalmGraphError, LayerRefError, Problem, SpecError
from .graph import graph_problems
from .limits import check_data, load_json, load_yaml
from .spec import CHECK_GRAPH, CompositionSpec, Every, load_spec

EDGE_REQUIRED = {"source", "target", "layers"}
UNREACHED = "through no edge"  # graph_problems' words for an augment that feeds nothing


def check(path: str | Path, *, models: bool = True, progress: Callable | None = None, trust_code: bool = False,
          flag: str = "trust_code=True") -> tuple[list[Problem], CompositionSpec | None, int | None]:
    """(problems, the spec if it is valid, the number of layer pairs if the models were checked). A `python:`
    source is built only with `trust_code`; without it, it is a problem naming `flag` (nothing is imported)."""
    path = Path(path)
    trust = (trust_code, flag)
    try:
        return _check_valid(load_spec(path), path, models, progress, trust)
    except SpecError as e:
        first = e.problems
    try:
        data = _read(path)
    except (OSError, ValueError, yaml.YAMLError):  # no file, not YAML/JSON: said by the first stage
        return first, None, None
    if not isinstance(data, dict):
        return first, None, None
    repair = _repair(data, first)
    if repair is None:
        return first, None, None
    repaired, edges, dropped, unsure = repair
    shape_only = CHECK_GRAPH.set(False)
    try:
        spec = CompositionSpec.from_dict(repaired)
    except SpecError:
        return first, None, None  # not valid enough to go on
    finally:
        CHECK_GRAPH.reset(shape_only)
    later = [_at_edge(p, edges) for p in graph_problems(spec) if not _follows(p, spec, dropped, unsure)]
    bad_edges = {int(m.group(1)) for p in later if (m := re.match(r"edges\[(\d+)\]", p.loc))}
    if models and all(m.source is not None for m in spec.models):
        later += _layer_problems(spec, path, edges, bad_edges, progress, trust)
    return first + later, None, None


def _check_valid(spec: CompositionSpec, path: Path, models: bool, progress, trust: tuple[bool, str]
                 ) -> tuple[list[Problem], CompositionSpec, int | None]:
    """A valid spec: compile it on the meta device, which checks the layer references and the models."""
    if not models or any(m.source is None for m in spec.models):
        return [], spec, None
    built, problems = _build(spec, path, progress, trust)
    if problems:
        return problems, spec, None
    from .compiler import compile
    with _step(progress, f"checking the layer references against the {len(spec.models)} models"):
        try:
            composed = compile(spec, models=built)
        except LayerRefError as e:
            return e.problems, spec, None
        except CalmGraphError as e:
            return [Problem("", str(e))], spec, None
    return [], spec, len(composed.links)


# -- repair: what a later stage needs, without what was wrong ------------------------------------------
def _read(path: Path) -> Any:
    """The file's data through the same bounds as `load_spec` (size, depth, alias expansion): a SpecError
    (a ValueError) where the first stage already said what is wrong."""
    text = path.read_text(encoding="utf-8")
    data = load_json(text) if path.suffix.lower() == ".json" else load_yaml(text)
    check_data(data)
    return data


def _parts(loc: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", loc)]


def _repair(data: dict, problems: list[Problem]) -> tuple[dict, list[int], list[Any], set] | None:
    """(the spec's data with each problem's optional key or edge taken out, the original index of every edge
    kept, the `source:` of every edge taken out, the models whose input was taken out), or None where a
    problem is in what cannot be taken out."""
    fixed = copy.deepcopy(data)
    drop_edges: set[int] = set()
    unsure: set = set()  # models whose `input:` was wrong: what the graph says of their input is not known
    for p in problems:
        parts = _parts(p.loc)
        if parts[:1] == ["edges"] and len(parts) >= 2 and isinstance(parts[1], int):
            if len(parts) == 2 or parts[2] in EDGE_REQUIRED:
                drop_edges.add(parts[1])
                continue
            key = parts[:3]
        elif parts[:1] == ["augments"] and len(parts) >= 3 and isinstance(parts[1], int):
            key = parts[:3]
        elif parts[:1] in (["anchor"], ["cross_attention"]) and len(parts) >= 2:
            key = parts[:2]
        elif parts == ["cross_attention"]:
            key = parts
        else:
            return None  # the anchor, the lists themselves: nothing to go on with
        if key[-1] in ("input", "prompt_input"):
            unsure.add(_get(fixed, key[:-1]).get("name"))
        if key[-1] == "name" or not _delete(fixed, key):
            return None
    edges = fixed.get("edges")
    if not isinstance(edges, list):
        return None
    kept = [i for i in range(len(edges)) if i not in drop_edges]
    dropped = [e.get("source") if isinstance(e, dict) else None for i, e in enumerate(edges) if i in drop_edges]
    fixed["edges"] = [edges[i] for i in kept]
    return fixed, kept, dropped, unsure


def _get(data: Any, path: list) -> Any:
    for part in path:
        if isinstance(data, dict) and part in data or isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return {}
    return data


def _delete(data: Any, key: list) -> bool:
    """Take out the key at `key` (a path); False where there is none."""
    *path, last = key
    data = _get(data, path)
    if isinstance(data, dict) and last in data:
        del data[last]
        return True
    return False


def _follows(p: Problem, spec: CompositionSpec, dropped: list[Any], unsure: set) -> bool:
    """Whether a graph problem may only follow from the repair: an edge left out (its augment then reaches
    nothing), a wrong `input:` taken out (what the graph says of that model's input)."""
    if any(f"{name!r}" in p.msg for name in unsure if isinstance(name, str)):
        return True
    if UNREACHED not in p.msg or not dropped:
        return False
    name = next((a.name for i, a in enumerate(spec.augments) if p.loc == f"augments[{i}]"), None)
    return name in dropped or any(not isinstance(s, str) for s in dropped)


def _at_edge(p: Problem, edges: list[int]) -> Problem:
    """A problem of the repaired spec, located in the file as written (edges left out shift the indices)."""
    m = re.match(r"edges\[(\d+)\]", p.loc)
    return Problem(f"edges[{edges[int(m.group(1))]}]{p.loc[m.end():]}", p.msg) if m else p


# -- layer references, without compiling (the spec has problems, so there is nothing to compile) ------
def _layer_problems(spec: CompositionSpec, path: Path, edges: list[int], bad_edges: set[int], progress,
                    trust: tuple[bool, str]) -> list[Problem]:
    from .blocks import BlockListError, find_blocks
    from .passes.resolve import _resolve_ref
    built, problems = _build(spec, path, progress, trust)
    blocks, locs = {}, _model_locs(spec)
    for name, model in built.items():
        try:
            blocks[name] = SimpleNamespace(name=name, blocks=find_blocks(model, spec.model(name).blocks))
        except BlockListError as e:
            problems.append(Problem(f"{locs[name]}.blocks", str(e)))
    for i, edge in enumerate(spec.edges):
        where = edges[i]
        if where in bad_edges or edge.source not in blocks or edge.target not in blocks:
            continue
        source, target = blocks[edge.source], blocks[edge.target]
        if isinstance(edge.layers, Every):
            if edge.layers.every > len(source.blocks):
                problems.append(Problem(f"edges[{where}].layers.every", f"{edge.layers.every} exceeds the depth "
                                        f"of {source.name!r} ({len(source.blocks)} blocks)"))
            continue
        for j, (s, t) in enumerate(edge.layers):
            _resolve_ref(s, source, f"edges[{where}].layers[{j}][0]", problems)
            _resolve_ref(t, target, f"edges[{where}].layers[{j}][1]", problems)
    return problems


def _model_locs(spec: CompositionSpec) -> dict[str, str]:
    return {spec.anchor.name: "anchor", **{a.name: f"augments[{i}]" for i, a in enumerate(spec.augments)}}


def _build(spec: CompositionSpec, path: Path, progress, trust: tuple[bool, str]) -> tuple[dict, list[Problem]]:
    """Each model's structure from its source, on the meta device (no weights); a model that fails is a problem,
    and so is a `python:` source without consent (`trust`: trust_code and the flag that gives it)."""
    import torch

    from .sources import load_model, untrusted_sources
    trust_code, flag = trust
    built, locs = {}, _model_locs(spec)
    problems = [] if trust_code else untrusted_sources(spec, flag=flag)  # said before any model is built
    if problems:
        return built, problems
    with _step(progress, f"building {len(spec.models)} models from their sources (meta device, no weights)"):
        for m in spec.models:
            if m.name in built:
                continue  # a duplicate name: reported by the graph stage
            try:
                with torch.device("meta"):
                    built[m.name] = load_model(m, path.parent, trust_code=trust_code)
            except CalmGraphError as e:
                problems.append(Problem(f"{locs[m.name]}.source", str(e)))
    return built, problems


def _step(progress, message: str):
    import contextlib
    return progress(message) if progress else contextlib.nullcontext()

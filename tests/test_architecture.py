"""The package's shape: layers import only downwards, no import circles (lazy imports included), and
`compile` is the list of passes, each keeping its contract."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import calmgraph
from calmgraph.compiler import PIPELINE

PACKAGE = Path(calmgraph.__file__).parent

# Lower layers first. A module may import (at module level) from its own layer or a lower one.
LAYERS = [
    {"errors", "families", "graph", "device", "extras", "files", "limits", "weights"},
    {"spec", "blocks", "cross_attention", "signature"},
    {"plan", "sources", "tracing"},
    {"passes"},
    {"composed"},
    {"compiler", "checkpoint", "export", "inspect", "report", "generation", "train", "parallel", "validate", "load"},
    {"bench", "demo", "cli", "__init__", "__main__"},
]
# The convenience methods of ComposedModel (loss, generate, export, save_new, summary) import these
# lazily, inside the method; none of them imports composed back.
LAZY_UP = {("composed", m) for m in ("train", "generation", "export", "checkpoint", "report")}


def _layer(top: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported calmgraph module, at module level?) for every import in a file, TYPE_CHECKING blocks too."""
    package = name.split(".")[:-1] if not path.name == "__init__.py" else name.split(".")
    found = []
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif (node.module or "").startswith("calmgraph"):
                target = node.module.removeprefix("calmgraph").lstrip(".")
            else:
                continue
            found.append((target, id(node) in top_level))
    return found


def _top(module: str) -> str:
    return module.split(".")[0] if module else "__init__"


def test_no_import_circles():
    g = nx.DiGraph()
    for name, path in _modules().items():
        for target, _ in _imports(name, path):
            if _top(target) != _top(name):
                g.add_edge(_top(name), _top(target))
    assert list(nx.simple_cycles(g)) == []


def test_layers_import_downwards():
    upward = []
    for name, path in _modules().items():
        for target, module_level in _imports(name, path):
            src, dst = _top(name), _top(target)
            if src != dst and _layer(dst) > _layer(src) and not (not module_level and (src, dst) in LAZY_UP):
                upward.append(f"{name} -> {target}")
    assert upward == []


def test_every_module_has_a_layer():
    tops = {_top(n) for n in _modules()}
    assert tops <= set().union(*LAYERS), tops - set().union(*LAYERS)


def test_pipeline_contracts_chain():
    """Each pass needs only what an earlier pass (or the initial state) guarantees."""
    have = set()
    for p in PIPELINE:
        assert set(p.requires) <= have, f"{p.name} needs {set(p.requires) - have}"
        have |= set(p.ensures)
    assert {"module", "links", "signature", "pruned", "verified"} <= have


def test_out_of_order_pass_is_an_internal_error():
    from calmgraph.demo.models import TinyLM
    from calmgraph.errors import InternalError
    from calmgraph.passes.base import CompileState
    from calmgraph.passes.splice import Splice
    spec = calmgraph.CompositionSpec.from_dict({"anchor": {"name": "a"}, "augments": [{"name": "b"}],
                                                "edges": [{"source": "b", "target": "a", "layers": [[0, 0]]}]})
    state = CompileState(spec, {"a": TinyLM(depth=2), "b": TinyLM(depth=2)})
    with pytest.raises(InternalError, match=r"'splice' needs \['merged', 'links', 'order'\]"):
        Splice()(state)

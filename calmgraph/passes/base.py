"""The pass contract. A `CompileState` flows through the passes; each pass names the fields it needs
(`requires`) and the ones it guarantees (`ensures`), and returns a `PassResult` saying whether it changed
anything: torch.fx's `passes/infra/pass_base.py` (requires -> call -> ensures), on a state that also holds
what exists before there is a graph (models, block lists, links).

    state = CompileState(spec, models)
    for p in PIPELINE:                 # compiler.py
        state = p(state).state
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn as nn
from torch.fx._lazy_graph_module import _LazyGraphModule

from ..blocks import Block
from ..errors import InternalError
from ..plan import Link
from ..signature import InputSignature
from ..spec import CompositionSpec


@dataclass(frozen=True)
class TapPoint:
    index: int
    name: str    # qualified module name of the block
    dim: int     # hidden size of what the block reads/writes
    runs: int = 1  # times the block runs in one forward; a block that runs more (looped) cannot be tapped


@dataclass
class TracedModel:
    """One model as a graph: placeholders (its `signature`) -> one tensor output."""

    name: str
    module: nn.Module          # the frozen alias copy; every get_attr/call_module target is relative to it
    graph: fx.Graph
    blocks: list[Block]
    taps: list[fx.Node]        # per block, the node holding the tapped hidden states (B, T, dim)
    dim: int
    heads: int | None
    frontend: str              # "fx" or "export"
    example: tuple             # the inputs it was traced with, in the order of its placeholders
    runs: list[int]            # per block, how many times it runs in one forward (more than 1: looped)

    def tap_runs(self, i: int, tap: str) -> tuple[int, int]:
        """(block, runs) behind tap i: block i itself, or with tap: input block i-1, whose output the tap
        reads (a looped predecessor leaves it unclear which of its runs feeds block i)."""
        if tap == "input" and i > 0 and self.runs[i - 1] > self.runs[i]:
            return i - 1, self.runs[i - 1]
        return i, self.runs[i]

    def tap_points(self) -> list[TapPoint]:
        return [TapPoint(b.index, b.name, int(n.meta["val"].shape[-1]), r)
                for b, n, r in zip(self.blocks, self.taps, self.runs)]


@dataclass
class Merged:
    """The fused graph while it is built: every model inlined, namespaced under its name."""

    graph: fx.Graph
    root: nn.Module                              # holds each model's frozen copy under its name
    taps: dict[str, list[fx.Node]]               # per model, per block: tap node in the fused graph
    outputs: dict[str, fx.Node]                  # per model: its output node (the anchor's is the result)
    masks: dict[str, fx.Node] = field(default_factory=dict)  # per token prompt augment: its padding mask
    write_mask: fx.Node | None = None            # the checked `write_mask` input (`writes: masked` blocks)


@dataclass(frozen=True)
class PruneReport:
    nodes_before: dict[str, int]
    nodes_after: dict[str, int]
    blocks_kept: dict[str, int]      # per augment: blocks still computed
    blocks_total: dict[str, int]
    head_removed: dict[str, bool]    # per augment: its output (LM head) no longer computed

    @property
    def nodes_removed(self) -> int:
        return sum(self.nodes_before.values()) - sum(self.nodes_after.values())


@dataclass
class CompileState:
    spec: CompositionSpec
    models: dict[str, nn.Module]                       # the user's, by spec name (never modified)
    prune: bool = True
    leaf_modules: tuple = ()                           # the user's extra fx leaves (`families.leaf_predicate`)
    source_dir: Path | None = None                     # where the spec's relative source paths start
    blocks: dict[str, list[Block]] | None = None       # gather: each model's blocks
    traced: dict[str, TracedModel] | None = None       # trace
    links: list[Link] | None = None                    # resolve: the plan; prune: the links that survive
    order: list[str] | None = None                     # merge: sources before targets, the anchor last
    signature: InputSignature | None = None            # merge: the fused graph's inputs
    merged: Merged | None = None                       # merge
    module: fx.GraphModule | None = None               # splice: the fused graph, as a module
    pruned: PruneReport | None = None                  # prune
    outlined: Any = None                               # outline: its OutlineReport (block paths, what stayed flat)
    scheduled: bool = False                            # schedule
    verified: bool = False                             # verify
    log: list[dict[str, Any]] = field(default_factory=list)  # per pass: name, modified, seconds


@dataclass(frozen=True)
class PassResult:
    state: CompileState
    modified: bool


def flat_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """The flat fused graph as a module between passes. Its Python code is generated when it is first run or
    read (torch.fx's lazy GraphModule, as torch.compile's own passes use): the next pass changes the graph
    again, and at 7B + 1.1B code generation costs 0.3 s a time for 4,000 nodes."""
    return _LazyGraphModule(root, graph)


class Pass(ABC):
    """A compile stage. Subclasses set `requires`/`ensures` (CompileState fields) and define `call`."""

    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    @abstractmethod
    def call(self, state: CompileState) -> PassResult:
        """The stage itself: read the fields in `requires`, set those in `ensures`."""

    def __call__(self, state: CompileState) -> PassResult:
        self._check(state, self.requires, "needs")
        started = time.perf_counter()
        result = self.call(state)
        self._check(result.state, self.ensures, "promised")
        result.state.log.append({"pass": self.name, "modified": result.modified,
                                 "seconds": round(time.perf_counter() - started, 4)})
        return result

    def _check(self, state: CompileState, fields: tuple[str, ...], what: str) -> None:
        missing = [f for f in fields if getattr(state, f) in (None, False)]
        if missing:  # a pipeline in the wrong order: calmgraph's own bug, never the user's
            raise InternalError(f"compile pass {self.name!r} {what} {missing}, which the state does not hold; "
                                "the passes ran out of order")

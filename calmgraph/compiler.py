"""`compile`: spec + models -> one fused torch.fx GraphModule, as a list of passes (`passes/`)."""
from __future__ import annotations

import functools
import gc
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch.nn as nn

from .blocks import BlockListError, find_blocks
from .composed import ComposedModel
from .errors import LayerRefError, Problem
from .passes.base import CompileState, TapPoint
from .passes.gather import Gather
from .passes.merge import Merge
from .passes.outline import Outline
from .passes.prune import Prune
from .passes.resolve import Resolve
from .passes.schedule import Schedule
from .passes.splice import Splice
from .passes.trace import Trace, trace_model
from .passes.verify import Verify
from .sources import load_models
from .spec import CompositionSpec, load_spec
from .tracing.purity import unchanged

PIPELINE = (
    Gather(),    # models checked against the spec, blocks found              passes/gather.py
    Trace(),     # each model -> an fx graph with its taps                      passes/trace.py
    Resolve(),   # layer refs -> the plan: one Link per cross-attention block   passes/resolve.py
    Merge(),     # one graph, namespaced per model; the input signature         passes/merge.py
    Splice(),    # a cross-attention node per link                              passes/splice.py
    Prune(),     # what no edge reads goes; the links that survive              passes/prune.py
    Outline(),   # each block one submodule, called once (FSDP, checkpointing)  passes/outline.py
    Schedule(),  # each augment just before the first link reading it           passes/schedule.py
    Verify(),    # lint + a shape check on fake tensors at other sizes          passes/verify.py
)


@contextmanager
def gc_paused():
    """Tracing makes some 10^5 objects in reference cycles (fx nodes, fake tensors); the cyclic collector's
    passes over them took 0.3-0.7 s of a 7B + 1.1B compile (about 5%). They are collected after it, in the
    next pass of the collector (compiling on the meta device then holds 5 MB more at its peak)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def compile(spec: CompositionSpec | str | Path | dict, models: dict[str, nn.Module] | None = None, *,
            prune: bool = True, trust_code: bool = False, leaf_modules: Iterable[type | str] = ()) -> ComposedModel:
    """Compile a composition. The models are not modified; see the README for what this means for
    `requires_grad`. Every problem with the spec or the models is raised before anything is built.
    `trust_code=True` lets the spec's `python:` sources run (calmgraph's own factories need no consent).
    `leaf_modules`: module classes (or class or qualified names) the fx front end keeps whole."""
    started = time.perf_counter()
    base_dir = Path(spec).parent if isinstance(spec, (str, Path)) else None
    spec = load_spec(spec)
    models = load_models(spec, models, base_dir=base_dir, trust_code=trust_code)  # given, or from `source:`
    state = CompileState(spec, models, prune=prune, leaf_modules=tuple(leaf_modules),
                         source_dir=(base_dir or Path.cwd()).resolve())  # relative sources start here
    with unchanged(models), gc_paused():                            # a forward that writes a weight: refused
        for p in PIPELINE:
            state = p(state).state
    again = functools.partial(compile, prune=prune, leaf_modules=tuple(leaf_modules))  # what a cast calls
    return ComposedModel.from_state(state, compile_seconds=time.perf_counter() - started, recompile=again)


def tap_points(model: nn.Module, blocks: str | None = None, *, tap: str = "output",
               prompt: bool = False, prompt_input: str = "input_ids",
               leaf_modules: Iterable[type | str] = ()) -> list[TapPoint]:
    """The blocks of `model` an edge can tap, in order, with their hidden sizes (from tracing)."""
    try:
        found = find_blocks(model, blocks)
    except BlockListError as e:
        raise LayerRefError([Problem("blocks", str(e))]) from None
    reads = "ids" if not prompt else "pixels" if prompt_input == "pixel_values" else "prompt"
    return trace_model(type(model).__name__, model, found, reads=reads, tap=tap,
                               leaf_modules=tuple(leaf_modules)).tap_points()


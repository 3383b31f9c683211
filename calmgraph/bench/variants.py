"""The table of variants: each names what it times, says why it cannot run here (or None), and builds the
functions to time. `bench_composition` times every selected variant that can run, round-robin."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
import torch.nn as nn

from ._internals import ROOT, ComposedModel, compile_composition, model_device
from .baselines import HookComposition, Parts, input_checks_us, train_step, without_checks
from .calm_pytorch import calm_leak_mb, calm_pytorch_call, calm_pytorch_composition, calm_pytorch_unfit
from .inputs import forward_inputs, make_inputs
from .progress import Progress
from .timing import Budget, paired_ratio, peak_memory_mb, time_round_robin

Fn = Callable[[], object]


@dataclass
class Bench:
    """One composition on one input batch: what every variant is built from. Builders add to `notes`."""

    composed: ComposedModel
    models: dict[str, nn.Module]
    inputs: dict[str, torch.Tensor]   # seq + 1 tokens: the training step's labels
    train: bool                       # whether the training step is timed too
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def spec(self):
        return self.composed.spec

    @property
    def device(self) -> torch.device:
        return model_device(self.models[self.spec.anchor.name])

    @cached_property
    def fwd(self) -> dict[str, torch.Tensor]:
        return forward_inputs(self.inputs)

    @cached_property
    def params(self) -> list[nn.Parameter]:
        return list(self.composed.new_parameters())

    @cached_property
    def parts(self) -> Parts:  # shared by "parts" and "part_detail"
        return Parts(self.composed, self.models, self.fwd)


@dataclass(frozen=True)
class Timed:
    """The functions a variant contributes to the forward and training-step timings, by result name."""

    forward: dict[str, Fn] = field(default_factory=dict)
    train: dict[str, Fn] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    name: str                                                 # as passed in `variants=`
    what: str                                                 # one line, said as it is built
    build: Callable[[Bench], Timed]
    skip_reason: Callable[[Bench], str | None] = lambda b: None
    selected_by: str | None = None                            # selected with another variant (default: its name)
    finish: Callable[[Bench], None] | None = None             # after timing: notes, cleanup

    def selected(self, variants: tuple[str, ...]) -> bool:
        return (self.selected_by or self.name) in variants


# -- builders ------------------------------------------------------------------------------------------
def _parts(b: Bench) -> Timed:
    return Timed({"parts": lambda: b.parts(**b.fwd)})


def _part_detail(b: Bench) -> Timed:
    return Timed(b.parts.functions(b.fwd))


def _hooks(b: Bench) -> Timed:
    hooks = HookComposition(b.composed, b.models)
    return Timed({"hooks": lambda: hooks(**b.fwd)}, {"hooks": lambda: train_step(hooks, b.inputs, b.params)})


def _no_checks(b: Bench) -> Timed:
    bare = without_checks(b.composed)
    b.notes["input_checks_us"] = input_checks_us(b.composed, b.fwd)
    return Timed({"fused_no_checks": lambda: bare(**b.fwd)})


def _nothing_pruned(b: Bench) -> str | None:
    return None if b.composed.pruned.nodes_removed else "nothing was pruned: every augment block is attended to"


def _unpruned(b: Bench) -> Timed:
    unpruned = compile_composition(b.spec, models=b.models, prune=False)
    unpruned.get_submodule(ROOT).load_state_dict(b.composed.get_submodule(ROOT).state_dict())
    return Timed({"fused_unpruned": lambda: unpruned(**b.fwd)})


def _calm_pytorch(b: Bench) -> Timed:
    calm = calm_pytorch_composition(b.composed, b.models)
    b.notes["calm_pytorch_leak_mb_per_call"] = calm_leak_mb(calm, b.spec, b.inputs)
    params = list(calm.parameters())

    def train():
        calm_pytorch_call(calm, b.spec, b.inputs, train=True).backward()
        for p in params:
            p.grad = None
    return Timed({"calm_pytorch": lambda: calm_pytorch_call(calm, b.spec, b.inputs, train=False)},
                 {"calm_pytorch": train})


def _first_call(b: Bench, name: str, fn: Fn) -> bool:
    """The first call compiles: time it, and keep a failure as a note rather than losing the run."""
    started = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - any backend error is a finding to report
        b.notes[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        return False
    b.notes[f"{name}_first_call_seconds"] = time.perf_counter() - started
    return True


def _compiled_forward(b: Bench, name: str, **options) -> dict[str, Fn]:
    compiled = torch.compile(b.composed, **options)

    def forward():
        with torch.no_grad():
            return compiled(**b.fwd)
    return {name: lambda: compiled(**b.fwd)} if _first_call(b, name, forward) else {}


def _compiled(b: Bench) -> Timed:
    forward = _compiled_forward(b, "compiled")
    if not b.train:
        return Timed(forward)
    trained = torch.compile(b.composed)
    step = lambda: train_step(trained, b.inputs, b.params)  # noqa: E731
    return Timed(forward, {"compiled": step} if _first_call(b, "train_compiled", step) else {})


def _cudagraphs(b: Bench) -> Timed:
    return Timed(_compiled_forward(b, "cudagraphs", mode="reduce-overhead"))


def _needs_gpu(b: Bench) -> str | None:
    return None if b.device.type == "cuda" else "CUDA graphs need a GPU"


def _compiled_finish(b: Bench) -> None:
    from torch._dynamo.utils import counters
    b.notes["cudagraph_skips"] = dict(counters["inductor"]).get("cudagraph_skips", 0)
    torch._dynamo.reset()


VARIANTS: tuple[Variant, ...] = (
    Variant("parts", "each model alone (augments to their deepest tapped block), the cross-attention alone",
            _parts),
    Variant("part_detail", "each of the parts timed alone too", _part_detail),
    Variant("hooks", "the same models and blocks wired with forward hooks (the seed's way)", _hooks),
    Variant("no_checks", "the fused graph without its call-time input checks", _no_checks),
    Variant("unpruned", "the composition compiled with prune=False", _unpruned, _nothing_pruned),
    Variant("calm_pytorch", "CALM-pytorch's own CALM on copies of the models", _calm_pytorch,
            lambda b: calm_pytorch_unfit(b.composed, b.models)),
    Variant("compiled", "torch.compile of the fused graph (its first calls compile: minutes on a CPU)", _compiled,
            finish=_compiled_finish),
    Variant("cudagraphs", "torch.compile with CUDA graphs (mode='reduce-overhead')", _cudagraphs, _needs_gpu,
            selected_by="compiled"),
)
TRAIN = "train"  # not a variant: times the training step of every variant that has one
NAMES = tuple(v.name for v in VARIANTS if v.selected_by is None) + (TRAIN,)
MEMORY_FORWARD = ("fused", "hooks", "calm_pytorch", "compiled")  # peak memory of these forwards


# -- one composition, every variant --------------------------------------------------------------------
def bench_composition(composed: ComposedModel, models: dict[str, nn.Module], *, batch: int, seq: int,
                      prompt_len: int | None = None, budget: Budget = Budget(), variants: tuple[str, ...] = NAMES,
                      seed: int = 0, autocast: torch.dtype | None = None, progress: Progress | None = None) -> dict:
    """Every selected variant of one composition on one input batch. Returns times (ms), ratios and memory;
    a skipped variant's reason is in `notes` under its name. `autocast`: run everything under
    torch.autocast to this dtype (mixed precision; weights as they are)."""
    unknown = sorted(set(variants) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown benchmark variants {unknown}; known: {', '.join(NAMES)}")
    device = model_device(models[composed.spec.anchor.name])
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        result = _bench(composed, models, batch=batch, seq=seq, prompt_len=prompt_len, budget=budget,
                        variants=tuple(variants), seed=seed, progress=progress or Progress())
    return {**result, "autocast": str(autocast) if autocast else None}


def _bench(composed, models, *, batch, seq, prompt_len, budget, variants, seed, progress) -> dict:
    inputs = make_inputs(composed, models, batch=batch, seq=seq, prompt_len=prompt_len, seed=seed)
    b = Bench(composed, models, inputs, train=TRAIN in variants)
    composed.eval()
    forward: dict[str, Fn] = {"fused": lambda: composed(**b.fwd)}
    train: dict[str, Fn] = {"fused": lambda: train_step(composed, inputs, b.params)}
    ran = []
    for variant in (v for v in VARIANTS if v.selected(variants)):
        reason = variant.skip_reason(b)
        if reason:
            b.notes[variant.name] = reason
            progress.skipped(variant.name, reason)
            continue
        with progress.step(f"building {variant.name}: {variant.what}"):
            timed = variant.build(b)
        forward.update(timed.forward)
        train.update(timed.train)
        ran.append(variant)

    times, memory = {}, {}
    with torch.no_grad(), progress.timing("forward", list(forward), budget) as observe:
        times["forward"] = time_round_robin(forward, b.device, budget, observe)
    with torch.no_grad():
        memory["forward"] = {n: peak_memory_mb(fn, b.device) for n, fn in forward.items() if n in MEMORY_FORWARD}
    if b.train:
        with progress.timing("train", list(train), budget) as observe:
            times["train"] = time_round_robin(train, b.device, budget, observe)
        memory["train"] = {n: peak_memory_mb(fn, b.device) for n, fn in train.items()}
    for variant in ran:
        if variant.finish:
            variant.finish(b)
    return {"batch": batch, "seq": seq, "prompt_len": prompt_len or seq, "times": times, "memory_mb": memory,
            "ratios": ratios(times), "compile_seconds": composed.compile_seconds, "notes": b.notes,
            "fused_graph": {"nodes": len(composed.graph.nodes), "nodes_pruned": composed.pruned.nodes_removed,
                            "blocks_kept": composed.pruned.blocks_kept, "blocks_total": composed.pruned.blocks_total}}


def ratios(times: dict) -> dict:
    """Each a/b: the median of the per-round ratios (`timing.paired_ratio`)."""
    def r(section, a, b):
        t = times.get(section, {})
        return paired_ratio(t[a], t[b]) if a in t and b in t else None
    return {"fused/parts": r("forward", "fused", "parts"), "hooks/fused": r("forward", "hooks", "fused"),
            "fused_no_checks/fused": r("forward", "fused_no_checks", "fused"),
            "fused_unpruned/fused": r("forward", "fused_unpruned", "fused"),
            "calm_pytorch/fused": r("forward", "calm_pytorch", "fused"),
            "calm_pytorch/compiled": r("forward", "calm_pytorch", "compiled"),
            "calm_pytorch/cudagraphs": r("forward", "calm_pytorch", "cudagraphs"),
            "train.hooks/fused": r("train", "hooks", "fused"),
            "train.calm_pytorch/fused": r("train", "calm_pytorch", "fused"),
            "train.calm_pytorch/compiled": r("train", "calm_pytorch", "compiled")}

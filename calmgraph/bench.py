"""`calmgraph bench`: what fusion costs, measured beside what it replaces, in one process on the same
weights and inputs.

    fused          the compiled composition (one torch.fx GraphModule), eager
    parts          the anchor alone + each augment alone up to its deepest tapped block + the cross-attention
                   blocks alone on the states they read: what the fused graph must at least do
    hooks          the same models and blocks wired with forward hooks and mutable state (the seed's way)
    calm_pytorch   CALM-pytorch's own `CALM` on copies of the models (x-transformers models only)
    compiled       the fused graph under torch.compile (and CUDA graphs, mode="reduce-overhead", on GPU)

Timing follows nanoGPT's bench.py: warm up (a second or more on GPU), synchronise, time each call with CUDA
events (perf_counter on CPU), report medians. Variants are timed round-robin, one call each per round, so
that clock and thermal drift hit them alike.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .blocks import find_blocks
from .compiler import compile as compile_composition
from .composed import ComposedModel
from .errors import ModelError, SpecError
from .graph import build_order
from .passes.merge import check_token_ids, prompt_mask
from .passes.splice import ROOT
from .passes.trace import Entry, PromptEntry, frozen_alias, model_device
from .spec import load_spec


# -- timing -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    """How long to measure. GPU clocks need a second or more of load before they settle."""

    warmup_s: float = 1.0
    rounds: int = 30
    max_s: float = 20.0          # stop early once this much time went into the timed rounds
    min_rounds: int = 5


QUICK = Budget(warmup_s=0.0, rounds=3, max_s=2.0, min_rounds=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict[str, Callable[[], object]], device: torch.device, budget: Budget) -> dict[str, dict]:
    """Median (and quartiles) of each function's time in ms; each round calls every function once."""
    for fn in fns.values():  # first call: lazy allocation, cuDNN/kernel choice, compilation
        fn()
    _sync(device)
    started = time.perf_counter()
    while time.perf_counter() - started < budget.warmup_s:
        for fn in fns.values():
            fn()
        _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    for i in range(budget.rounds):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
        if i + 1 >= budget.min_rounds and time.perf_counter() - started > budget.max_s:
            break
    return {name: _stats(ts) for name, ts in times.items()}


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - began)


def _stats(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return {"median_ms": statistics.median(ts), "q1_ms": q[0], "q3_ms": q[2], "rounds": len(ts)}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one call allocates beyond what was allocated before it (GPU only; None on CPU)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# -- inputs -------------------------------------------------------------------------------------------
def vocab_size(model: nn.Module) -> int:
    """The size of the model's first token embedding (inputs are drawn below it)."""
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.num_embeddings
    raise ModelError(f"{type(model).__name__} has no nn.Embedding; cannot draw token ids for it")


def make_inputs(composed: ComposedModel, models: dict[str, nn.Module], *, batch: int, seq: int,
                prompt_len: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids for every input of the fused graph, valid for every model that reads them; the
    last prompt is padded past half its length so the masks matter."""
    spec, device = composed.spec, model_device(models[composed.spec.anchor.name])
    g = torch.Generator().manual_seed(seed)
    shared = [spec.anchor.name, *[a.name for a in spec.augments if a.input == "shared"]]
    inputs = {"input_ids": torch.randint(0, min(vocab_size(models[n]) for n in shared), (batch, seq + 1), generator=g)}
    for aug in spec.augments:
        if aug.input == "prompt":
            length = prompt_len or seq
            inputs[f"{aug.name}_input_ids"] = torch.randint(0, vocab_size(models[aug.name]), (batch, length), generator=g)
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[-1, length // 2:] = 0
            inputs[f"{aug.name}_mask"] = mask
    return {k: v.to(device) for k, v in inputs.items()}


def forward_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`make_inputs` holds seq + 1 tokens (for the training step's labels); a forward reads the first seq."""
    return {**inputs, "input_ids": inputs["input_ids"][:, :-1]}


# -- the eager baselines ------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by a forward hook to end a model's forward after a given block."""


def _hook_module(model: nn.Module, member: str) -> nn.Module:
    """The module whose call produces a block's output. An x-transformers entry is a ModuleList that its
    owner iterates (never calls): its last child, the residual, returns the block's output."""
    module = model.get_submodule(member)
    while isinstance(module, nn.ModuleList):
        module = module[-1]
    return module


def _entry(model: nn.Module, prompt: bool) -> nn.Module:
    return PromptEntry(model) if prompt else Entry(model)


def _model_inputs(name: str, prompt: bool, inputs: dict[str, torch.Tensor]) -> tuple:
    if prompt:
        ids = inputs[f"{name}_input_ids"]
        mask = inputs.get(f"{name}_mask")
        return ids, torch.ones_like(ids) if mask is None else mask
    return (inputs["input_ids"],)


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_hidden(out, new):
    return (new, *out[1:]) if isinstance(out, tuple) else new


class HookComposition:
    """The composition wired with forward hooks on (aliases of) the user's models, as the seed did: every
    model runs in full, source states are recorded in a dict, target blocks add the cross-attention deltas
    of the fused model's own blocks. Computes what the fused graph computes (blocks with tap="output")."""

    def __init__(self, composed: ComposedModel, models: dict[str, nn.Module]):
        spec = composed.spec
        self.order = build_order(spec)
        self.prompts = {a.name for a in spec.augments if a.input == "prompt"}
        self.entries = {n: _entry(frozen_alias(models[n]), n in self.prompts) for n in self.order}
        self.states: dict[tuple[str, int], torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        sources = {(l.source, l.source_layer) for l in composed.links}
        for name in self.order:
            if spec.model(name).tap != "output":
                raise ModelError(f"the hook baseline taps block outputs only; {name!r} has tap: input")
            model = self.entries[name].model
            for block in find_blocks(model, spec.model(name).blocks):
                into = [(l, composed.get_submodule(".".join((ROOT, *l.module_path)))) for l in composed.links
                        if l.target == name and l.target_layer == block.index]
                if into or (name, block.index) in sources:
                    _hook_module(model, block.members[-1]).register_forward_hook(self._hook(name, block.index, into))

    def _hook(self, name: str, layer: int, into: list):
        def hook(module, args, out):
            h = _hidden(out)
            total = h
            for link, block in into:  # every delta reads the block's own output; summed in link order
                context = self.states[link.source, link.source_layer]
                extra = (self.masks[link.source],) if link.source in self.masks else ()
                total = total + block(h, context, *extra)
            self.states[name, layer] = total
            return _replace_hidden(out, total) if into else None
        return hook

    def __call__(self, **inputs):
        self.states.clear()
        for name in self.prompts:
            self.masks[name] = _model_inputs(name, True, inputs)[1]
        for name in self.order:
            out = self.entries[name](*_model_inputs(name, name in self.prompts, inputs))
        self.states.clear()
        return out


class Parts:
    """The sum of the parts: each model alone (augments stopped after their deepest tapped block) and the
    cross-attention blocks alone on the very states they read in the fused graph."""

    def __init__(self, composed: ComposedModel, models: dict[str, nn.Module], inputs: dict[str, torch.Tensor]):
        spec = composed.spec
        self.prompts = {a.name for a in spec.augments if a.input == "prompt"}
        self.entries = {m.name: _entry(frozen_alias(models[m.name]), m.name in self.prompts) for m in spec.models}
        self.deepest = {a.name: max(l.source_layer for l in composed.links if l.source == a.name) for a in spec.augments}
        for name, layer in self.deepest.items():
            model = self.entries[name].model
            block = find_blocks(model, spec.model(name).blocks)[layer]
            _hook_module(model, block.members[-1]).register_forward_hook(_raise_stop)
        self.anchor = spec.anchor.name
        self.blocks = self._capture(composed, inputs)

    @staticmethod
    def _capture(composed: ComposedModel, inputs) -> list[tuple[nn.Module, tuple]]:
        captured, handles = [], []
        for link in composed.links:
            block = composed.get_submodule(".".join((ROOT, *link.module_path)))
            handles.append(block.register_forward_pre_hook(lambda m, args: captured.append((m, args))))
        with torch.no_grad():
            composed(**inputs)
        for h in handles:
            h.remove()
        return captured

    def model(self, name: str, inputs) -> None:
        try:
            self.entries[name](*_model_inputs(name, name in self.prompts, inputs))
        except _Stop:
            pass

    def cross_attention(self) -> None:
        for block, args in self.blocks:
            block(*args)

    def functions(self, inputs) -> dict[str, Callable[[], object]]:
        parts = {f"parts.{name}": (lambda n=name: self.model(n, inputs)) for name in self.entries}
        return {**parts, "parts.cross_attention": self.cross_attention}

    def __call__(self, **inputs) -> None:
        for name in self.entries:
            self.model(name, inputs)
        self.cross_attention()


def _raise_stop(module, args, out):
    raise _Stop


def without_checks(composed: ComposedModel) -> fx.GraphModule:
    """The fused graph with its call-time input checks removed: token ids pass straight through and a
    prompt mask is used as given (ones when none). To measure what the checks cost."""
    graph = copy.deepcopy(composed.graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is check_token_ids:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is prompt_mask:
            node.target, node.args = _mask_unchecked, node.args[:2]
    graph.lint()
    return fx.GraphModule(composed, graph)


def _mask_unchecked(input_ids, mask):
    return torch.ones_like(input_ids) if mask is None else mask


def input_checks_us(composed: ComposedModel, inputs: dict[str, torch.Tensor], calls: int = 2000) -> float:
    """Host time (us) the fused graph's call-time input checks take per forward, timed alone: too small
    for the difference of two forward timings to resolve. They launch no kernel when masks are given."""
    env = {n: inputs.get(n.target) for n in composed.graph.nodes if n.op == "placeholder"}
    checks = [n for n in composed.graph.nodes if n.op == "call_function" and n.target in (check_token_ids, prompt_mask)]

    def run():
        for n in checks:
            env[n] = n.target(*fx.node.map_arg(n.args, env.__getitem__))
    run()
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return 1e6 * (time.perf_counter() - started) / calls


# -- CALM-pytorch -------------------------------------------------------------------------------------
def calm_pytorch_composition(composed: ComposedModel, models: dict[str, nn.Module]):
    """CALM-pytorch's `CALM` on copies of the models, wired by the spec's layer pairs, with cross-attention
    heads sized like the fused model's (everything else its defaults). Returns None when CALM-pytorch is not
    installed; raises ModelError for compositions it cannot express."""
    try:
        from CALM_pytorch import CALM, AugmentParams
        from x_transformers import TransformerWrapper
    except ImportError:
        return None
    spec = composed.spec
    not_xt = [n for n, m in models.items() if not isinstance(m, TransformerWrapper)]
    if not_xt or any(e.target != spec.anchor.name for e in spec.edges) or len(spec.edges) != len(spec.augments):
        raise ModelError("CALM-pytorch takes x-transformers TransformerWrapper models with one edge from each "
                         f"augment to the anchor (not x-transformers: {not_xt})")
    link = composed.links[0]
    device, dtype = model_device(models[spec.anchor.name]), next(models[spec.anchor.name].parameters()).dtype
    cpu = {n: copy.deepcopy(m).to("cpu", torch.float32) for n, m in models.items()}  # CALM builds on the CPU
    augments = [AugmentParams(model=cpu[e.source], mask_kwarg="mask",
                              connections=tuple((l.source_layer + 1, l.target_layer + 1)  # its indices are 1-based
                                                for l in composed.links if l.edge == i))
                for i, e in enumerate(spec.edges)]
    calm = CALM(cpu[spec.anchor.name], augments, attn_kwargs=dict(linear_project_context=True, pre_rmsnorm=True,
                                                                 flash=True, heads=link.heads, dim_head=link.dim_head))
    return calm.to(device, dtype)


def calm_pytorch_leak(calm) -> list:
    """The lists CALM-pytorch's anchor recorder hooks append every block output to, never emptied."""
    from CALM_pytorch.CALM import Recorder
    return [h.output for m in calm.anchor_llm.modules() for h in m._forward_hooks.values() if isinstance(h, Recorder)]


def calm_pytorch_call(calm, spec, inputs: dict[str, torch.Tensor], train: bool):
    prompts = tuple(inputs[f"{a.name}_input_ids"] if a.input == "prompt" else inputs["input_ids"] for a in spec.augments)
    masks = tuple(inputs[f"{a.name}_mask"].bool() if a.input == "prompt" else torch.ones_like(inputs["input_ids"]).bool()
                  for a in spec.augments)
    seq = inputs["input_ids"] if train else inputs["input_ids"][:, :-1]  # its loss drops the last token itself
    out = calm(seq, prompt=prompts, prompt_mask=masks, return_loss=train)
    for leak in calm_pytorch_leak(calm):  # keep its memory leak out of long benchmarks (reported apart)
        leak.clear()
    return out


# -- torch.compile ------------------------------------------------------------------------------------
def dynamo_report(composed: nn.Module, inputs: dict[str, torch.Tensor], other_seq: int, backend: str = "inductor") -> dict:
    """Graph breaks (torch._dynamo.explain) and recompiles of the fused graph under torch.compile: across
    calls with the same shapes, and when the sequence length changes once. Recompiles are decided by
    dynamo's guards, before any backend runs: backend="eager" counts them without inductor's compile time."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    with torch.no_grad():
        explained = dynamo.explain(composed)(**forward_inputs(inputs))
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(composed, backend=backend)
    fwd = forward_inputs(inputs)
    with torch.no_grad():
        compiled(**fwd)
        first = counters["stats"]["unique_graphs"]
        for _ in range(3):
            compiled(**fwd)
        same = counters["stats"]["unique_graphs"] - first
        shorter = {k: (v[:, :other_seq] if k == "input_ids" else v) for k, v in fwd.items()}
        compiled(**shorter)
        new_seq = counters["stats"]["unique_graphs"] - first - same
    dynamo.reset()
    return {"backend": backend, "graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "break_reasons": [str(r.reason) for r in explained.break_reasons],
            "recompiles_same_shapes": same, "recompiles_new_seq_len": new_seq}


# -- one composition, every variant --------------------------------------------------------------------
def train_step(model: Callable, inputs: dict[str, torch.Tensor], params: list[nn.Parameter]) -> None:
    """Forward, next-token loss, backward into the cross-attention parameters (no optimiser step)."""
    logits = model(**forward_inputs(inputs))
    loss = F.cross_entropy(logits.flatten(0, 1).float(), inputs["input_ids"][:, 1:].flatten())
    loss.backward()
    for p in params:
        p.grad = None


def bench_composition(composed: ComposedModel, models: dict[str, nn.Module], *, batch: int, seq: int,
                      prompt_len: int | None = None, budget: Budget = Budget(), variants: tuple[str, ...] = (
                          "parts", "part_detail", "hooks", "no_checks", "unpruned", "calm_pytorch", "compiled", "train"),
                      seed: int = 0, autocast: torch.dtype | None = None) -> dict:
    """Every variant of one composition on one input batch. Returns times (ms), ratios and memory.
    `autocast`: run everything under torch.autocast to this dtype (mixed precision; weights as they are)."""
    device = model_device(models[composed.spec.anchor.name])
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        result = _bench(composed, models, batch=batch, seq=seq, prompt_len=prompt_len, budget=budget,
                        variants=variants, seed=seed)
    return {**result, "autocast": str(autocast) if autocast else None}


def _bench(composed, models, *, batch, seq, prompt_len, budget, variants, seed) -> dict:
    spec = composed.spec
    device = model_device(models[spec.anchor.name])
    inputs = make_inputs(composed, models, batch=batch, seq=seq, prompt_len=prompt_len, seed=seed)
    fwd_in = forward_inputs(inputs)
    composed.eval()
    forward: dict[str, Callable[[], object]] = {"fused": lambda: composed(**fwd_in)}
    notes: dict[str, object] = {}
    if "parts" in variants:
        parts = Parts(composed, models, fwd_in)
        forward["parts"] = lambda: parts(**fwd_in)
        if "part_detail" in variants:  # each part timed alone too
            forward.update(parts.functions(fwd_in))
    if "hooks" in variants:
        hooks = HookComposition(composed, models)
        forward["hooks"] = lambda: hooks(**fwd_in)
    if "no_checks" in variants:
        bare = without_checks(composed)
        forward["fused_no_checks"] = lambda: bare(**fwd_in)
        notes["input_checks_us"] = input_checks_us(composed, fwd_in)
    if "unpruned" in variants and composed.pruned.nodes_removed:
        unpruned = compile_composition(spec, models=models, prune=False)
        unpruned.get_submodule(ROOT).load_state_dict(composed.get_submodule(ROOT).state_dict())
        forward["fused_unpruned"] = lambda: unpruned(**fwd_in)
    calm = None
    if "calm_pytorch" in variants:
        try:
            calm = calm_pytorch_composition(composed, models)
        except ModelError as e:
            notes["calm_pytorch"] = str(e)
        if calm is not None:
            forward["calm_pytorch"] = lambda: calm_pytorch_call(calm, spec, inputs, train=False)
            notes["calm_pytorch_leak_mb_per_call"] = _calm_leak_mb(calm, spec, inputs)
    compiled = {}
    if "compiled" in variants:
        compiled["compiled"] = torch.compile(composed)
        if device.type == "cuda":
            compiled["cudagraphs"] = torch.compile(composed, mode="reduce-overhead")
        for name, fn in compiled.items():
            started = time.perf_counter()
            try:  # the first call compiles: time it, and keep a failure as a note rather than losing the run
                with torch.no_grad():
                    fn(**fwd_in)
            except Exception as e:  # noqa: BLE001 - any backend error is a finding to report
                notes[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:500]}"
                continue
            notes[f"{name}_first_call_seconds"] = time.perf_counter() - started
            forward[name] = lambda fn=fn: fn(**fwd_in)

    with torch.no_grad():
        times = {"forward": time_round_robin(forward, device, budget)}
        memory = {"forward": {name: peak_memory_mb(fn, device) for name, fn in forward.items()
                              if name in ("fused", "hooks", "calm_pytorch", "compiled")}}
    if "train" in variants:
        params = list(composed.new_parameters())
        train = {"fused": lambda: train_step(composed, inputs, params)}
        if "hooks" in variants:
            train["hooks"] = lambda: train_step(hooks, inputs, params)
        if calm is not None:
            calm_params = list(calm.parameters())
            train["calm_pytorch"] = lambda: (calm_pytorch_call(calm, spec, inputs, train=True).backward(),
                                             [setattr(p, "grad", None) for p in calm_params])
        if "compiled" in variants:
            trained = torch.compile(composed)
            started = time.perf_counter()
            try:
                train_step(trained, inputs, params)
                notes["train_compiled_first_call_seconds"] = time.perf_counter() - started
                train["compiled"] = lambda: train_step(trained, inputs, params)
            except Exception as e:  # noqa: BLE001
                notes["train_compiled_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        times["train"] = time_round_robin(train, device, budget)
        memory["train"] = {name: peak_memory_mb(fn, device) for name, fn in train.items()}
    if "compiled" in variants:
        from torch._dynamo.utils import counters
        notes["cudagraph_skips"] = dict(counters["inductor"]).get("cudagraph_skips", 0)
        torch._dynamo.reset()
    return {"batch": batch, "seq": seq, "prompt_len": prompt_len or seq, "times": times, "memory_mb": memory,
            "ratios": ratios(times), "compile_seconds": composed.compile_seconds, "notes": notes,
            "fused_graph": {"nodes": len(composed.graph.nodes), "nodes_pruned": composed.pruned.nodes_removed,
                            "blocks_kept": composed.pruned.blocks_kept, "blocks_total": composed.pruned.blocks_total}}


def _calm_leak_mb(calm, spec, inputs) -> float:
    """Memory CALM-pytorch's recorder hooks keep after one forward (it never frees them)."""
    with torch.no_grad():
        calm(inputs["input_ids"][:, :-1], prompt=tuple(inputs[f"{a.name}_input_ids"] if a.input == "prompt"
                                                         else inputs["input_ids"][:, :-1] for a in spec.augments),
             return_loss=False)
    leaks = calm_pytorch_leak(calm)
    kept = sum(t.numel() * t.element_size() for leak in leaks for t in leak)
    for leak in leaks:
        leak.clear()
    return kept / 2**20


def ratios(times: dict) -> dict:
    def r(section, a, b):
        t = times.get(section, {})
        return t[a]["median_ms"] / t[b]["median_ms"] if a in t and b in t else None
    return {"fused/parts": r("forward", "fused", "parts"), "hooks/fused": r("forward", "hooks", "fused"),
            "fused_no_checks/fused": r("forward", "fused_no_checks", "fused"),
            "fused_unpruned/fused": r("forward", "fused_unpruned", "fused"),
            "calm_pytorch/fused": r("forward", "calm_pytorch", "fused"),
            "calm_pytorch/compiled": r("forward", "calm_pytorch", "compiled"),
            "calm_pytorch/cudagraphs": r("forward", "calm_pytorch", "cudagraphs"),
            "train.hooks/fused": r("train", "hooks", "fused"),
            "train.calm_pytorch/fused": r("train", "calm_pytorch", "fused"),
            "train.calm_pytorch/compiled": r("train", "calm_pytorch", "compiled")}


# -- environment --------------------------------------------------------------------------------------
def environment(command: list[str] | None = None) -> dict:
    """Machine, date, versions and the exact command: what makes a result file reproducible."""
    from importlib.metadata import PackageNotFoundError, version
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "calmgraph", "x-transformers", "CALM-Pytorch", "transformers", "einops"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        machine.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    versions["calmgraph_commit"] = os.environ.get("CALMGRAPH_COMMIT") or _git_commit()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "versions": versions, "command": " ".join(command or sys.argv)}


def _git_commit() -> str | None:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- command line -------------------------------------------------------------------------------------
def _load_models(spec_path: str, factory: str | None, trust_code: bool = False) -> dict[str, nn.Module]:
    if factory:
        import importlib
        module, _, attr = factory.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)()
        except (ImportError, AttributeError) as e:
            raise ModelError(f"--models {factory!r}: {e}; expected 'package.module:function' returning "
                             "{name: nn.Module} for the spec's models") from None
    try:
        from .sources import load_models  # specs whose models name their `source:`
    except ImportError:
        raise ModelError("pass --models package.module:function returning {name: nn.Module} for the spec's "
                         "models") from None
    from .sources import untrusted_sources
    problems = [] if trust_code else untrusted_sources(load_spec(spec_path), flag="--trust-code")
    if problems:
        raise SpecError(problems, header="the spec runs code from its sources")
    return load_models(spec_path, trust_code=trust_code)


def table(result: dict) -> str:
    from .report import table as text_table
    rows = []
    for section, times in result["times"].items():
        fused = times["fused"]["median_ms"]
        for name, t in times.items():
            rows.append([section, name, f"{t['median_ms']:.3f}", f"{t['median_ms'] / fused:.3f}", t["rounds"]])
    return text_table(rows, ["step", "variant", "median ms", "x fused", "rounds"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="calmgraph bench", description=__doc__.split("\n\n")[0].replace("`", ""))
    add_arguments(p)
    return run(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="composition spec (.yaml or .json)")
    p.add_argument("--models", help="package.module:function returning {name: nn.Module} (default: the spec's sources)")
    p.add_argument("--trust-code", action="store_true", help="let the spec's `python:` sources run their code")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast to this dtype (default: bfloat16 on GPU, none on CPU)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=None, help="prompt augments' length (default: --seq)")
    p.add_argument("--quick", action="store_true", help="no warm-up, 3 rounds: checks that it runs, not speed")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    models = _load_models(args.spec, args.models, args.trust_code)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else None)
    models = {n: m.to(args.device).eval() for n, m in models.items()}  # weights as given, compute under autocast
    composed = compile_composition(spec, models=models)
    torch.manual_seed(0)  # the zero-initialised output projections would make every delta 0: randomise them
    for p in composed.new_parameters():
        nn.init.normal_(p, std=0.02)
    variants = ("parts", "part_detail", "hooks", "no_checks", "unpruned", "calm_pytorch", "train") + (() if args.no_compile else ("compiled",))
    result = bench_composition(composed, models, batch=args.batch, seq=args.seq, prompt_len=args.prompt_len,
                               budget=QUICK if args.quick else Budget(), variants=variants,
                               autocast=getattr(torch, dtype) if dtype and dtype != "float32" else None)
    result = {**environment(["calmgraph", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else None),
              "spec": spec.to_dict(), "device": args.device, "dtype": dtype or "as given", **result}
    print(table(result))
    print("\n" + "\n".join(f"{k}: {v:.3f}" for k, v in result["ratios"].items() if v is not None))
    print(f"compile (trace + splice): {result['compile_seconds']:.2f} s")
    if args.json:
        from .files import write_text
        write_text(args.json, json.dumps(result, indent=2, default=str), overwrite=args.overwrite, flag="--overwrite")
    return 0


if __name__ == "__main__":
    sys.exit(main())

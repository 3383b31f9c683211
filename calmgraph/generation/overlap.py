"""A decode step whose shared augments run on a CUDA stream of their own, beside the anchor.

In shared mode each step runs every decoded augment for the new token too. Its kernels are small (a 0.25B
augment's products at 8 rows use a few of an H200's 132 processors) and, in one compiled graph, run one
after another on the anchor's stream: at batch 8 the shared step took 2.03 ms against 1.44 for the anchor's
step with the same links over a fixed prompt (benchmarks/README.md, "At LLM shapes"). Here the step is cut
at its links into segments:

- the prologue: what reads only the step's inputs (positions, masks), on the main stream;
- the side's segments: the decoded augments' nodes, cut after each value a link into the anchor reads;
- the anchor's segments: cut before each link that reads the side.

Each segment is compiled on its own; the side's run on a second stream, and each anchor segment waits only
for the side segment it reads (`Overlapped`). `Captured` replays the whole step as one CUDA graph (both
streams), as `compile_step`'s CUDA graphs would. On a CPU the segments run in order: the step's ops, the same
results (tested).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from ..plan import LINK_KEY, MODEL_KEY

PROLOGUE = 0


def _side_of(node: fx.Node, side: set[str]) -> bool:
    link = node.meta.get(LINK_KEY)
    if link is not None:                  # a link computes for its target model
        return link.target in side
    return node.meta.get(MODEL_KEY) in side


def segments(graph: fx.Graph, side: set[str]) -> dict[fx.Node, int] | None:
    """Each compute node's segment: PROLOGUE, 2 i + 1 for the side's i-th, 2 i + 2 for the anchor's i-th
    (so the ids count up the order they may run in). None where the graph does not split so: no link from the
    side into the anchor, an anchor node reading a side node other than through a link, or a side node
    reading one of the anchor's."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    inputs_only: set[fx.Node] = set()   # positions and masks: read by both sides, made once before them
    for n in nodes:
        if all(a.op == "placeholder" or a in inputs_only for a in n.all_input_nodes):
            inputs_only.add(n)
    on_side = {n for n in nodes if n not in inputs_only and _side_of(n, side)}
    crossings = [n for n in nodes if n not in on_side and n not in inputs_only
                 and any(a in on_side for a in n.all_input_nodes)]
    if not crossings or not all(LINK_KEY in n.meta and n.op == "call_module" for n in crossings):
        return None
    if any(a.op not in ("placeholder", "get_attr") and a not in on_side and a not in inputs_only
           for n in on_side for a in n.all_input_nodes):
        return None                   # the side would wait for the anchor's stream: nothing to overlap
    # the side's i-th segment: what the i-th crossing link reads and no earlier one
    segment: dict[fx.Node, int] = {n: PROLOGUE for n in inputs_only}
    for i, link in enumerate(crossings):
        todo = [a for a in link.all_input_nodes if a in on_side]
        while todo:
            n = todo.pop()
            if n not in segment:
                segment[n] = 2 * i + 1
                todo.extend(a for a in n.all_input_nodes if a in on_side)
    for n in nodes:               # the rest of the side (its cache writes): with the latest input it reads
        if n in on_side and n not in segment:
            segment[n] = max([segment[a] for a in n.all_input_nodes if a in on_side], default=1)
    crossed = 0
    for n in nodes:
        if n in segment:
            continue
        if crossed < len(crossings) and n is crossings[crossed]:
            crossed += 1
        segment[n] = 2 * crossed + 2
    return segment


def split(step: fx.GraphModule, side: set[str]) -> fx.GraphModule | None:
    """`step` as a graph of segment submodules (`submod_<segment>`), or None (`segments`)."""
    segment = segments(step.graph, side)
    return None if segment is None else split_module(step, step, segment.__getitem__)


def is_side(name: str) -> bool:
    return int(name.rsplit("_", 1)[1]) % 2 == 1


class Overlapped:
    """Runs a `split` step, each segment through `compile_segment(submodule)`; on a GPU the side's segments on a
    stream of their own, each anchor segment after the side segment it reads (events), both joined at the end."""

    def __init__(self, parts: fx.GraphModule, compile_segment=lambda module: module):
        self.parts = parts
        self.run = {name: compile_segment(module) for name, module in parts.named_children()}
        self.side = None

    def __call__(self, *args):
        cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        main = torch.cuda.current_stream() if cuda else None
        if cuda and self.side is None:
            self.side = torch.cuda.Stream()
        env: dict[fx.Node, object] = {}
        ready: dict[fx.Node, torch.cuda.Event] = {}   # a side value -> the event after the segment made it
        inputs = iter(args)
        fork, events = None, []    # fork: when the side may start (the inputs, then the prologue, written)
        if cuda:
            fork = torch.cuda.Event()
            fork.record(main)
        for node in self.parts.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(inputs)
            elif node.op == "get_attr":       # split_module passes the weights and caches to the segments
                env[node] = operator.attrgetter(node.target)(self.parts)
            elif node.op == "call_module":
                values = [env[a] for a in node.args]
                if not cuda:
                    env[node] = self.run[node.target](*values)
                elif is_side(node.target):
                    if fork is not None:   # once: the side's segments follow each other on its stream
                        self.side.wait_event(fork)
                        fork = None
                    with torch.cuda.stream(self.side):
                        env[node] = self.run[node.target](*values)
                    events.append(torch.cuda.Event())
                    events[-1].record(self.side)
                    ready[node] = events[-1]
                else:
                    for a in node.args:
                        event = ready.get(a)
                        if event is not None:
                            main.wait_event(event)
                            for t in _tensors(env[a]):
                                t.record_stream(main)
                    env[node] = self.run[node.target](*values)
                    if node.target == f"submod_{PROLOGUE}" and fork is not None:
                        fork.record(main)   # the split runs it before the anchor's first segment
            elif node.op == "call_function" and node.target is operator.getitem:
                env[node] = env[node.args[0]][node.args[1]]
                if node.args[0] in ready:
                    ready[node] = ready[node.args[0]]
            elif node.op == "output":
                if events:
                    main.wait_event(events[-1])   # the side's last segment: every side write done
                return fx.node.map_arg(node.args[0], lambda n: env[n])
            else:
                raise AssertionError(f"split step: unexpected {node.op} {node.target}")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


class Captured:
    """`step` (an `Overlapped`) replayed as one CUDA graph: the first two calls run it (the first compiles),
    the third captures it over static copies of the inputs; later calls copy their inputs in and replay. The
    output lives until the next replay."""

    def __init__(self, step):
        self.step, self.calls, self.graph = step, 0, None

    def __call__(self, *args):
        self.calls += 1
        if self.calls < 3:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self.step(*args)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self.inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.step(*self.inputs)
        for static, a in zip(self.inputs, args):
            if isinstance(a, torch.Tensor):
                static.copy_(a)
        self.graph.replay()
        return self.out


def uncaptured(options: dict) -> dict:
    """torch.compile's keywords without CUDA graphs (`Captured` records the whole step as one)."""
    options = dict(options)
    if options.get("mode") in ("reduce-overhead", "max-autotune"):
        options["mode"] = "default" if options["mode"] == "reduce-overhead" else "max-autotune-no-cudagraphs"
    if "options" in options:
        options["options"] = {**options["options"], "triton.cudagraphs": False}
    return options

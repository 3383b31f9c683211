"""A compiled decode step that runs its shared augments on a second CUDA stream, beside the anchor.

In shared mode a step runs every decoded model over one token. The augments do not read the anchor, and the
anchor reads an augment only at its links, so most of the two models' work is independent; yet one compiled
graph launches it all on one stream, one small kernel after another (at one row a step is bound by its
kernels' latency, not by the weights it reads). Here the step graph is cut into segments, each of one
model's nodes on one stream (`segments`): an augment's segment ends at a tap a link reads, the anchor's
begins anew at each link. Each segment is compiled on its own (inductor, without its CUDA graphs), and one
CUDA graph records them all, the augments' on a side stream, with an event for each tap a link waits on
(`SideStreamStep`). Off a GPU the segments run in order, with the same results.

    step = SideStreamStep(decoder.to_compile, side={"augment"}, options=...)
    logits = step(token, position, *contexts, *kv)      # replays the recorded graph after the first call
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from ..passes.merge import MODEL_KEY
from ..tracing.frontends import get_attr
from . import decode   # a module import: decode imports this one

TABLE = 1 << 16


@dataclass
class Segment:
    """Nodes of one stream that run together: `module` takes `inputs` and returns `outputs` (a tuple)."""
    side: bool                                  # on the side stream (an augment's) or the main one
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[fx.Node] = field(default_factory=list)     # made elsewhere: placeholders, other segments
    outputs: list[fx.Node] = field(default_factory=list)    # read by later segments or the step's output
    waits: list[int] = field(default_factory=list)          # the other stream's segments it reads, by index
    module: fx.GraphModule | None = None


def _prologue(graph: fx.Graph, root: torch.nn.Module) -> set[fx.Node]:
    """The nodes computed from the step's inputs and small tables alone (positions, masks, rotary angles):
    the main stream runs them first, for both streams (`fuse` shares them between the models). A table is
    a tensor attribute that is no parameter, has under `TABLE` elements and is not written in the step."""
    written = {base for node in graph.nodes if (base := decode._written_base(node)) is not None}

    def table(node: fx.Node) -> bool:
        value = get_attr(root, node.target)
        return (node not in written and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
                and value.numel() < TABLE)
    made: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("call_function", "call_method") and all(
                n.op == "placeholder" or n in made or (n.op == "get_attr" and table(n)) for n in node.all_input_nodes):
            made.add(node)
    return made


def segments(graph: fx.Graph, root: torch.nn.Module, side: set[str]) -> list[Segment]:
    """`graph`'s computing nodes cut into segments, in an order that runs each after those it reads. The
    prologue comes first; then, in the graph's order, an augment's node (`side`) goes to the side stream, any
    other (the anchor's, a link, a residual sum) to the main one. A node starts a new segment of its stream
    where it reads the other stream's, or where the node before it there was read by the other. Each stream's
    nodes keep the graph's order, so a cache written in place before it is read stays so. `get_attr` nodes
    are copied into each segment that reads them."""
    prologue = _prologue(graph, root)
    order = [n for n in graph.nodes if n not in prologue and n.op in ("call_function", "call_method", "call_module")]
    placed = {n: n.meta.get(MODEL_KEY) in side for n in order}
    found = [Segment(False, [n for n in graph.nodes if n in prologue])] if prologue else []
    of = {n: 0 for n in found[0].nodes} if prologue else {}
    placed.update(dict.fromkeys(prologue, False))
    open_: dict[bool, int | None] = {False: None, True: None}
    for node in order:
        on_side = placed[node]
        read = [of[n] for n in node.all_input_nodes if n in of and n not in prologue]  # the fork follows it
        if open_[on_side] is None or any(found[i].side != on_side for i in read):
            found.append(Segment(on_side))
            open_[on_side] = len(found) - 1
        segment = found[open_[on_side]]
        segment.nodes.append(node)
        of[node] = open_[on_side]
        for i in read:
            if found[i].side != on_side and i not in segment.waits:
                segment.waits.append(i)
        if any(placed[user] != on_side for user in node.users if user in placed):
            open_[on_side] = None   # its reader on the other stream waits for what came before, not more
    output = next(n for n in graph.nodes if n.op == "output")
    for index, segment in enumerate(found):
        inside = set(segment.nodes)
        for node in segment.nodes:
            for n in node.all_input_nodes:
                if n.op != "get_attr" and n not in inside and n not in segment.inputs:
                    segment.inputs.append(n)
            if any(user is output or of.get(user, index) != index for user in node.users):
                segment.outputs.append(node)
    return found


def _module(root: torch.nn.Module, segment: Segment) -> fx.GraphModule:
    graph, env = fx.Graph(), {}
    for node in segment.inputs:
        env[node] = graph.placeholder(node.name)
    for node in segment.nodes:
        for n in node.all_input_nodes:
            if n.op == "get_attr" and n not in env:
                env[n] = graph.get_attr(n.target)
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[n] for n in segment.outputs))
    graph.lint()
    return fx.GraphModule(root, graph, class_name="Segment")


class SideStreamStep:
    """`step` (a decode step's graph module) cut into `segments`, each compiled with `options` (torch.compile's
    keywords; inductor's CUDA graphs are left out, since one graph records the whole step here). On CUDA the
    first call runs the segments twice (compiling them), then records them in a CUDA graph on two streams;
    later calls copy their inputs into the recorded ones and replay it. Its output lives until the next call, as a CUDA graph's does."""

    def __init__(self, step: fx.GraphModule, side: set[str], options: dict):
        self.segments = segments(step.graph, step, side)
        options = dict(options)
        inductor = {k: v for k, v in options.pop("options", {}).items() if k != "triton.cudagraphs"}
        if inductor:
            options["options"] = inductor
        for segment in self.segments:
            segment.module = torch.compile(_module(step, segment), **options)
        self.fork = next(i for i, segment in enumerate(self.segments) if segment.side or i == len(self.segments) - 1)
        self.placeholders = [n for n in step.graph.nodes if n.op == "placeholder"]
        self.output = next(n for n in step.graph.nodes if n.op == "output").args[0]
        self.graph = None

    def _run(self, args, streams=None, events=None):
        env = dict(zip(self.placeholders, args))
        for index, segment in enumerate(self.segments):
            if streams is None:
                env.update(zip(segment.outputs, segment.module(*(env[n] for n in segment.inputs))))
                continue
            stream = streams[segment.side]
            if index == self.fork:   # the side stream starts once the main one has run the prologue
                streams[True].wait_stream(streams[False])
            with torch.cuda.stream(stream):
                for i in segment.waits:
                    stream.wait_event(events[i])
                env.update(zip(segment.outputs, segment.module(*(env[n] for n in segment.inputs))))
                events[index].record(stream)
        return fx.node.map_arg(self.output, env.__getitem__)

    def _streamed(self, args):
        """Runs the segments on the two streams (from and back to the current one), returning the output."""
        main, side = torch.cuda.current_stream(), torch.cuda.Stream()
        events = [torch.cuda.Event() for _ in self.segments]
        out = self._run(args, {False: main, True: side}, events)
        main.wait_stream(side)
        return out

    def __call__(self, *args):
        if not (args and args[0].is_cuda):
            return self._run(args)
        if self.graph is None:
            for _ in range(2):   # compile and tune outside the recording, as inductor's CUDA graphs do
                self._streamed(args)
            torch.cuda.synchronize()
            self.inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._streamed(self.inputs)
        for arg, static in zip(args, self.inputs):   # as inductor's CUDA graphs do with inputs not its own
            if isinstance(arg, torch.Tensor):
                static.copy_(arg)
        self.graph.replay()
        return self.out


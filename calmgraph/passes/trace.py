"""Pass 1, trace: each model -> a torch.fx graph with its blocks' tap nodes and hidden size found.

Two front ends, tried in turn (`tracing/frontends.py`, order from `families.frontend_order`); the graph's
taps come from `tracing/taps.py`, and a forward that writes its own weights is refused
(`tracing/purity.py`). The model traced is a frozen alias of the user's (`tracing/entry.py`).
"""
from __future__ import annotations

import logging
import time

from ..blocks import Block, block_list_candidates, head_count
from ..errors import TraceError
from ..families import frontend_order
from ..signature import InputSignature
from ..tracing.entry import entry_for, frozen_alias, image_shape, model_device
from ..tracing.frontends import FRONTENDS, check_dynamic, propagate_shapes, reason, strip_entry
from ..tracing.purity import refuse_weight_writes
from ..tracing.taps import block_inputs, block_outputs, block_runs, check_layout, hidden_of
from .base import CompileState, Pass, PassResult, TracedModel

log = logging.getLogger(__name__)  # under "calmgraph": the CLI shows its INFO lines
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 7  # distinct sizes, so the tracer cannot mistake one for the other


def example_inputs(model, reads: str) -> tuple:
    """The inputs a model is traced with, from its own signature (`InputSignature.of_model`)."""
    image, dtype = None, None
    if reads == "pixels":
        image = image_shape(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return InputSignature.of_model(reads, image, dtype).examples(EXAMPLE_BATCH, EXAMPLE_SEQ, model_device(model))


def trace_model(name: str, model, blocks: list[Block], *, reads: str = "ids", tap: str = "output",
                leaf_modules=()) -> TracedModel:
    inputs = example_inputs(model, reads)
    alias = frozen_alias(model)
    entry = entry_for(alias, reads)
    reasons = {}
    for frontend in frontend_order(model):
        try:
            gm = FRONTENDS[frontend](entry, blocks, inputs, leaf_modules)
        except Exception as e:  # noqa: BLE001 - every front end's reason goes into the final error
            reasons[frontend] = reason(e)
            continue
        refuse_weight_writes(gm, name, model)  # the model's own doing: another front end would not undo it
        try:
            if frontend == "export":
                check_dynamic(gm, inputs)
            else:
                propagate_shapes(gm, inputs)
            outputs = block_outputs(gm.graph, blocks)
            taps = outputs if tap == "output" else block_inputs(gm.graph, blocks, outputs)
            check_layout(gm.graph, blocks, taps, tokens=reads != "pixels")
            runs = block_runs(gm.graph, blocks)  # before the targets lose their entry prefix
            break
        except Exception as e:  # noqa: BLE001
            reasons[frontend] = reason(e)
    else:
        detail = "\n".join(f"  - {k}: {v}" for k, v in reasons.items())
        raise TraceError(
            f"could not trace model {name!r} ({type(model).__name__}) with any front end:\n{detail}\n"
            "hint: a model must run as model(input_ids) (prompt augments: also attention_mask=; image prompts: "
            "model(pixel_values=...)) and return a tensor, an HF output or a tuple, and each block must return "
            f"(batch, seq, dim) hidden states; name its block list with `blocks:` if the wrong one was picked "
            f"(blocks used: {blocks[0].name.rpartition('.')[0] or blocks[0].name}; lists found: "
            f"{', '.join(block_list_candidates(model)[:5]) or 'none'}); a module the fx tracer cannot follow "
            "can be kept whole with compile(..., leaf_modules=[its class])")
    graph = strip_entry(gm, alias)
    return TracedModel(name, alias, graph, blocks, taps, int(hidden_of(taps[0]).shape[-1]),
                       head_count(alias, blocks), frontend, inputs, runs)


class Trace(Pass):
    requires = ("blocks",)
    ensures = ("traced",)

    def call(self, state: CompileState) -> PassResult:
        state.traced = {}
        for m in state.spec.models:  # a large model takes seconds a block: one line each, as it finishes
            started = time.perf_counter()
            traced = trace_model(m.name, state.models[m.name], state.blocks[m.name], reads=m.reads, tap=m.tap,
                                 leaf_modules=state.leaf_modules)
            state.traced[m.name] = traced
            log.info("traced %s: %d blocks, %s front end, %.1f s", m.name, len(traced.blocks), traced.frontend,
                     time.perf_counter() - started)
        return PassResult(state, True)

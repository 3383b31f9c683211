"""Everything the harness takes from calmgraph, in one place: the public API, and the few internals a
baseline must share with the fused graph (the entry wrappers that trace a model, the call-time check
functions, where the cross-attention blocks live). When those move, only this file changes."""
from .. import ComposedModel, ModelError, load_models, load_spec
from .. import compile as compile_composition
from ..blocks import find_blocks
from ..graph import build_order
from ..passes.merge import check_token_ids, prompt_mask, write_mask
from ..passes.splice import masked
from ..plan import ROOT
from ..signature import WRITE_MASK, writes_masked
from ..tracing.entry import Entry, PromptEntry, frozen_alias, model_device
from ..report import table as text_table

__all__ = ["ComposedModel", "ModelError", "compile_composition", "load_models", "load_spec", "find_blocks", "build_order",
           "check_token_ids", "prompt_mask", "write_mask", "masked", "ROOT", "WRITE_MASK", "Entry", "PromptEntry",
           "frozen_alias", "model_device", "text_table", "writes_masked"]

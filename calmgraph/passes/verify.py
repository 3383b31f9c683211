"""Pass 6, verify: the fused graph is well formed and runs shape-correctly, checked on fake tensors
(no real compute, works for models on the `meta` device)."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import InternalError, TraceError
from ..signature import InputSignature
from ..tracing.entry import model_device
from .base import CompileState, Pass, PassResult
from .trace import EXAMPLE_BATCH, EXAMPLE_SEQ

# Checked at sizes other than the ones the models were traced with: a graph that torch.export specialised
# to its example's batch or length fails here instead of at the user's first call.
VERIFY_BATCH, VERIFY_SEQ = EXAMPLE_BATCH + 1, EXAMPLE_SEQ + 3


def _propagate(gm: fx.GraphModule, args: tuple[torch.Tensor, ...]):
    # a shape environment lets data-dependent values (a mixture of experts' .tolist() of its expert sizes:
    # jetmoe) propagate as unbacked symbols instead of failing the check
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)
    for node in gm.graph.nodes:  # symbols of the tracer's shape environment, whose names the new one reuses
        node.meta.pop("unbacked_bindings", None)
    return FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(a) for a in args])


def verify(gm: fx.GraphModule, signature: InputSignature, device: torch.device, expected_out: torch.Size) -> None:
    gm.graph.lint()
    try:
        out = _propagate(gm, signature.examples(VERIFY_BATCH, VERIFY_SEQ, device))
    except Exception as e:
        try:
            _propagate(gm, signature.examples(EXAMPLE_BATCH, EXAMPLE_SEQ, device))
        except Exception:  # fails at the traced sizes too: a bug in calmgraph, not the user's: say so plainly
            raise InternalError(f"the fused graph failed its shape check: {type(e).__name__}: {e}") from e
        raise TraceError(
            f"the fused graph runs only at the batch and sequence length its models were traced with "
            f"({EXAMPLE_BATCH}, {EXAMPLE_SEQ}), not at ({VERIFY_BATCH}, {VERIFY_SEQ}): torch.export specialised a "
            "model to its example's size (its forward fixes a size, e.g. a state-space scan or a shape-dependent "
            f"branch); such a model cannot be composed. Cause: {type(e).__name__}: {str(e)[:200]}") from None
    if tuple(out.shape[:-1]) != (VERIFY_BATCH, VERIFY_SEQ) or out.shape[-1] != expected_out[-1]:
        raise InternalError(f"the fused graph returns shape {tuple(out.shape)}; the anchor returns {tuple(expected_out)}")


class Verify(Pass):
    requires = ("module", "signature", "merged")
    ensures = ("verified",)

    def call(self, state: CompileState) -> PassResult:
        anchor = state.spec.anchor.name
        expected = state.merged.outputs[anchor].meta["val"].shape
        verify(state.module, state.signature, model_device(state.models[anchor]), expected)
        state.verified = True
        return PassResult(state, False)

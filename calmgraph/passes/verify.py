"""Pass 6, verify: the fused graph is well formed and runs shape-correctly, checked on fake tensors
(no real compute, works for models on the `meta` device).

A model's blocks are mostly copies of one another (the same ops on weights of the same shapes), and a copy
given inputs of the same shapes gives outputs of the same shapes: each distinct block is run once, and its
copies take its output's shapes (a 7B anchor's 32 blocks cost one). A block whose output has a size that
depends on data (unbacked) is run every time."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import map_aggregate
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


def _meta(value) -> tuple | None:
    """What a value's shapes are computed from: a tensor's shape, strides, dtype and device; None where a size
    is symbolic (data-dependent)."""
    if isinstance(value, torch.Tensor):
        sizes = (*value.shape, *value.stride())
        if not all(isinstance(d, int) for d in sizes):
            return None
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        parts = tuple(_meta(v) for v in value)
        return None if None in parts else (type(value).__name__, parts)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return ("value", value)
    return None


def _structure(block: fx.GraphModule) -> tuple:
    """A block's computation up to its weights' values: each node's op, target and arguments (inputs and
    other nodes by position, weights by name: the order of their get_attr nodes does not matter), and every
    tensor it holds by name, shape and dtype."""
    computed = [n for n in block.graph.nodes if n.op != "get_attr"]
    index = {n: i for i, n in enumerate(computed)}

    def arg(a):
        if not isinstance(a, fx.Node):
            return repr(a)
        return ("attr", a.target) if a.op == "get_attr" else ("node", index[a])

    nodes = tuple((n.op, "" if n.op == "placeholder" else str(n.target), map_aggregate(n.args, arg),
                   tuple(sorted((k, map_aggregate(v, arg)) for k, v in n.kwargs.items()))) for n in computed)
    tensors = sorted((k, tuple(t.shape), t.dtype, t.device) for k, t in block.state_dict(keep_vars=True).items())
    return nodes, tuple(tensors)


class _CopiesOnce(FakeTensorProp):
    """FakeTensorProp that runs each distinct outlined block once per input shapes."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode):
        super().__init__(gm, mode)
        self._outputs: dict[tuple, object] = {}

    def call_module(self, target, args, kwargs):
        block = self.fetch_attr(target)
        inputs = _meta((args, tuple(sorted(kwargs.items()))))
        if not isinstance(block, fx.GraphModule) or inputs is None:
            return super().call_module(target, args, kwargs)
        key = (_structure(block), inputs)
        if key in self._outputs:
            return map_aggregate(self._outputs[key], _like)
        out = super().call_module(target, args, kwargs)
        if _meta(out) is not None:
            self._outputs[key] = out
        return out


def _like(value):
    if isinstance(value, torch.Tensor):  # called inside the fake mode: a fresh fake tensor
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    return value


def _propagate(gm: fx.GraphModule, args: tuple[torch.Tensor, ...]):
    # a shape environment lets data-dependent values (a mixture of experts' .tolist() of its expert sizes:
    # jetmoe) propagate as unbacked symbols instead of failing the check
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv(), static_shapes=True)
    for node in gm.graph.nodes:  # symbols of the tracer's shape environment, whose names the new one reuses
        node.meta.pop("unbacked_bindings", None)
    return _CopiesOnce(gm, mode).propagate(*[mode.from_tensor(a) for a in args])


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

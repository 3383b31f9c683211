"""Models whose forward is not a size-generic function of their weights, with one state per token: compile
must refuse them with a TraceError saying why, or (where another front end can) compose them exactly.

- A forward that writes its own weights in place (RWKV's `rescale_every`): refused, naming the weights.
- A forward torch.export specialises to the example's sequence length (a Python loop over the tokens):
  not composed from that graph; the fx front end, which keeps the blocks opaque, composes it instead.
- Blocks whose states are not (batch, seq, dim), one per token (XLNet, ProphetNet): refused.
- Sizes that depend on data (a mixture of experts' `.tolist()`): the shape check carries them as symbols.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import calmgraph as cg
import calmgraph.passes.trace as trace
from calmgraph.demo.models import Layer, TinyLM
from families import VOCAB, family_models, family_spec, small_config
from reference import eager_reference, run_model
from test_families import assert_composes


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


# -- weights written in place -----------------------------------------------------------------------------
class RescalingLayer(Layer):
    def __init__(self, writes: bool):
        super().__init__(32, 4, causal=True)
        self.writes = writes

    def forward(self, x, keep=None):
        if self.writes:
            with torch.no_grad():
                self.out.weight.mul_(0.5)
        return super().forward(x, keep)


class Rescaling(TinyLM):
    """Writes a weight in place in its forward, the way RWKV rescales: outside the blocks, through a view of
    the weight, or inside a block under torch.no_grad()."""

    def __init__(self, where: str):
        super().__init__(vocab=VOCAB, dim=32, depth=2, heads=4)
        self.where = where
        if where == "block":
            self.layers = nn.ModuleList(RescalingLayer(writes=i == 1) for i in range(2))

    def forward(self, input_ids):
        if self.where == "outside":
            self.head.weight.div_(2)
        elif self.where == "view":
            self.norm.weight[:4].mul_(2)
        return super().forward(input_ids)


@pytest.mark.parametrize("where, frontend, weight, op", [
    ("outside", "fx", "head.weight", "div_"),
    ("outside", "export", "head.weight", "div_"),
    ("view", "fx", "norm.weight", "mul_"),
    ("view", "export", "norm.weight", "mul_"),
    ("block", "export", "layers.1.out.weight", "mul_"),  # in a higher-order op's subgraph (no_grad region)
])
def test_a_forward_that_writes_its_weights_is_refused(where, frontend, weight, op, monkeypatch):
    monkeypatch.setattr(trace, "frontend_order", lambda model: [frontend])
    torch.manual_seed(0)
    model = Rescaling(where).eval()
    models = family_models(model, "anchor")
    before = snapshot(model)
    with pytest.raises(cg.TraceError, match=rf"model 'base' \(Rescaling\) writes its own weights in place during "
                                            rf"its forward: {weight} \({op}\)\. .*would change them at every call"):
        cg.compile(family_spec(), models)
    assert unchanged(model, before), "compiling must not write the user's weights"


class WritesCopies(TinyLM):
    """Writes in place, but only to activations and to a copy of a weight: nothing to refuse."""

    def __init__(self):
        super().__init__(vocab=VOCAB, dim=32, depth=2, heads=4)

    def forward(self, input_ids):
        scale = self.norm.weight.clone()
        scale.mul_(2)
        logits = super().forward(input_ids)
        return logits.add_(scale.sum() - scale.sum())


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_writes_to_activations_and_copies_are_not_refused(frontend, ids, monkeypatch):
    monkeypatch.setattr(trace, "frontend_order", lambda model: [frontend])
    torch.manual_seed(0)
    models = family_models(WritesCopies().eval(), "anchor")
    composed = cg.compile(family_spec(), models)
    assert composed.frontends["base"] == frontend
    assert_composes(composed, models, ids)


def fresh_rwkv(**overrides) -> nn.Module:
    """A RWKV that has not run a forward yet (so has not rescaled its weights), 3 blocks, rescaled every 1."""
    import transformers as t
    torch.manual_seed(0)
    return t.RwkvForCausalLM(small_config("rwkv", num_hidden_layers=3, rescale_every=1, **overrides)).eval()


def test_rwkv_rescaling_is_refused_and_rescale_every_0_composes(ids):
    model = fresh_rwkv()
    before = snapshot(model)
    with pytest.raises(cg.TraceError, match=r"writes its own weights in place during its forward: "
                                            r"rwkv.blocks.0.attention.output.weight \(div_\), (.|\n)*"
                                            r"set `model.config.rescale_every = 0`"):
        cg.compile(family_spec(), family_models(model, "anchor"))
    assert unchanged(model, before)
    # the fix the message gives: no rescaling, and the composition is exact in both roles
    for role in ("anchor", "augment"):
        model = fresh_rwkv()
        model.config.rescale_every = 0
        models = family_models(model, role)
        before = snapshot(model)
        composed = cg.compile(family_spec(), models)
        assert composed.frontends["base" if role == "anchor" else "other"] == "fx"  # see below
        assert_composes(composed, models, ids)
        assert unchanged(model, before)


# -- sizes torch.export specialises ------------------------------------------------------------------------
class Scan(nn.Module):
    """A recurrence written as a Python loop over the tokens (as RWKV's CPU path): torch.export unrolls it
    for the example's length, so its graph is specialised to that length."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        state, out = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            state = 0.5 * state + self.proj(x[:, t])
            out.append(state)
        return x + torch.stack(out, dim=1)


class ScanLM(TinyLM):
    def __init__(self):
        super().__init__(vocab=VOCAB, dim=32, depth=2, heads=4)
        self.layers = nn.ModuleList(Scan(32) for _ in range(2))


def test_export_specialised_to_one_length_is_refused(monkeypatch):
    """Before: the graph ran at other lengths without an error and computed only the first 7 tokens' scan."""
    monkeypatch.setattr(trace, "frontend_order", lambda model: ["export"])
    torch.manual_seed(0)
    with pytest.raises(cg.TraceError, match=r"export: TraceError: torch.export specialised the model to its "
                                            r"example input's sequence length \(2, 7\)"):
        cg.compile(family_spec(), family_models(ScanLM().eval(), "anchor"))


def test_specialised_export_falls_back_to_fx(ids, monkeypatch):
    monkeypatch.setattr(trace, "frontend_order", lambda model: ["export", "fx"])
    torch.manual_seed(0)
    models = family_models(ScanLM().eval(), "anchor")
    composed = cg.compile(family_spec(), models)
    assert composed.frontends["base"] == "fx"
    assert_composes(composed, models, ids)           # at length 9; traced at 7
    longer = torch.randint(3, VOCAB, (3, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(composed(longer), eager_reference(composed, models, None, longer), atol=1e-5, rtol=0)
        assert not torch.equal(composed(longer), run_model(models["base"], longer))


# -- hidden states that are not (batch, seq, dim) per token ------------------------------------------------
class Residual(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return x + torch.tanh(self.proj(x))


class OtherLayout(TinyLM):
    """Blocks that see the tokens in another layout: sequence first (as XLNet), or the sequence twice over,
    concatenated (as ProphetNet's n-gram streams)."""

    def __init__(self, layout: str):
        super().__init__(vocab=VOCAB, dim=32, depth=2, heads=4)
        self.layout = layout
        self.layers = nn.ModuleList(Residual(32) for _ in range(2))

    def forward(self, input_ids):
        x = self.tok(input_ids)
        T = x.shape[1]
        x = x.transpose(0, 1) if self.layout == "seq_first" else torch.cat([x, x], dim=1)
        for layer in self.layers:
            x = layer(x)
        x = x.transpose(0, 1) if self.layout == "seq_first" else x[:, :T]
        return self.head(self.norm(x))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("layout, shape", [("seq_first", r"\((7|s\d+), (2|s\d+), 32\)"),
                                           ("streams", r"\((2|s\d+), (14|2\*s\d+), 32\)")])
def test_states_not_one_per_token_are_refused(layout, shape, frontend, monkeypatch):
    monkeypatch.setattr(trace, "frontend_order", lambda model: [frontend])
    torch.manual_seed(0)
    with pytest.raises(cg.TraceError, match=rf"block 'layers.0' passes on hidden states of shape {shape}, not "
                                            r"\(batch, seq, dim\) with the input's batch and sequence length"):
        cg.compile(family_spec(), family_models(OtherLayout(layout).eval(), "anchor"))


def test_data_dependent_sizes_pass_the_shape_check(ids):
    """jetmoe routes tokens with `.tolist()` of its expert sizes: the fused graph's shape check must carry
    those values as symbols, not fail (it raised 'failed its shape check: DataDependentOutputException')."""
    from families import small_model
    models = family_models(small_model("jetmoe"), "anchor")
    composed = cg.compile(family_spec(), models)
    assert composed.frontends["base"] == "export"
    assert_composes(composed, models, ids)


class CountingLM(TinyLM):
    """A forward with a side effect on a buffer, outside its blocks: the fx front end keeps it in the graph."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, input_ids):
        self.calls += 1
        return super().forward(input_ids)


def test_a_forward_that_writes_a_buffer_is_refused_and_the_buffer_put_back():
    counting = CountingLM(depth=2)
    before = snapshot(counting)
    spec = {"anchor": {"name": "base"}, "augments": [{"name": "kv"}],
            "edges": [{"source": "kv", "target": "base", "layers": [[0, 1]]}]}
    with pytest.raises(cg.TraceError, match=r"wrote \['base.calls'\] in place \(restored: \['base.calls'\]\)"):
        cg.compile(spec, models={"base": counting, "kv": TinyLM(depth=2)})
    assert unchanged(counting, before) and counting.calls.item() == 0

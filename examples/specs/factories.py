"""Model factories the example specs name with `source: {python: "factories.py:NAME", kwargs: {...}}`.

A factory is any callable returning an nn.Module; these two build models whose constructors take objects
(a config dataclass, an attention-layers module) that a YAML file cannot spell directly.
"""
import importlib.util
import sys
from pathlib import Path

GPT_FILE = Path(__file__).resolve().parent.parent / "handwritten_gpt" / "gpt.py"


def gpt(**config):
    """The hand-written nanoGPT-style model in examples/handwritten_gpt: gpt(n_layer=4, n_embd=64, ...)."""
    name = "calmgraph_example_gpt"
    if name not in sys.modules:  # registered before running: its dataclass looks itself up there
        spec = importlib.util.spec_from_file_location(name, GPT_FILE)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    module = sys.modules[name]
    return module.GPT(module.GPTConfig(**config))


def xt_decoder(num_tokens: int, max_seq_len: int, dim: int, depth: int, heads: int):
    """An x-transformers decoder-only language model."""
    from x_transformers import Decoder, TransformerWrapper
    return TransformerWrapper(num_tokens=num_tokens, max_seq_len=max_seq_len,
                              attn_layers=Decoder(dim=dim, depth=depth, heads=heads))

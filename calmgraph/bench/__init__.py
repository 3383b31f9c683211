"""calmgraph.bench: what fusion costs, measured beside what it replaces, in one process on the same weights
and inputs. A measuring instrument beside the library (calmgraph itself never imports it); `calmgraph bench`
is a thin command over it.

    fused          the compiled composition (one torch.fx GraphModule), eager
    parts          the anchor alone + each augment alone up to its deepest tapped block + the cross-attention
                   blocks alone on the states they read: what the fused graph must at least do
    hooks          the same models and blocks wired with forward hooks and mutable state (the seed's way)
    calm_pytorch   CALM-pytorch's own `CALM` on copies of the models (x-transformers models only)
    compiled       the fused graph under torch.compile (and CUDA graphs, mode="reduce-overhead", on GPU)

The variants are a table (`variants.VARIANTS`): each has a name, a reason it cannot run here (or none) and a
builder of the functions to time. Timing (`timing`) is round-robin after nanoGPT's bench.py.
"""
import importlib

# Loaded on first use, so that `calmgraph`'s command line can read the bench options (bench/cli.py, argparse
# only) without loading the harness for every command.
_WHERE = {name: module for module, names in {
    "baselines": ["HookComposition", "Parts", "input_checks_us", "train_step", "without_checks"],
    "calm_pytorch": ["calm_pytorch_call", "calm_pytorch_composition", "calm_pytorch_leak", "calm_pytorch_unfit"],
    "cli": ["main"],
    "dynamo": ["dynamo_report"],
    "inputs": ["forward_inputs", "make_inputs", "vocab_size"],
    "progress": ["Console", "Progress"],
    "report": ["environment", "table"],
    "timing": ["QUICK", "Budget", "peak_memory_mb", "time_round_robin"],
    "variants": ["NAMES", "VARIANTS", "Variant", "bench_composition", "ratios"],
}.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})

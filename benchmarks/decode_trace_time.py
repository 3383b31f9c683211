"""Time to build generate's decode graph (torch.export around a static KV cache, `generation/decode.py`) at
LLM shapes on the CPU: identical blocks sharing one trace (`calmgraph/tracing/shared.py`) against every block
traced. This is most of the first `generate` call's extra time (the step's compile aside).

    python benchmarks/decode_trace_time.py --out benchmarks/results/decode_trace_time_cpu.json

Random bf16 weights on the CPU (the decoder's cache layers are told apart by their memory, so not on `meta`),
an augment every 4th anchor layer read in shared mode (both models decoded with a cache), batch 1, a
256-position cache; the modes alternate, in one process.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_gpu import SHAPES  # noqa: E402


def llama(shape: str) -> torch.nn.Module:
    import transformers as t
    hidden, layers, heads, kv_heads, intermediate = SHAPES[shape]
    cfg = t.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=32000)
    # random weights, since generate checks each decode trace's logits against the model's forward
    return t.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="tinyllama-1.1b+llama-0.25b", help="anchor+augment (shapes: %s)" % ", ".join(SHAPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import transformers

    import calmgraph as cg
    from calmgraph.generation.generate import _entry, decoder_for
    from calmgraph.tracing import shared
    transformers.logging.set_verbosity_error()
    anchor, augment = args.pair.split("+")
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "augment"}],
            "edges": [{"source": "augment", "target": "anchor", "layers": {"every": 4}}]}
    composed = cg.compile(spec, models={"anchor": llama(anchor), "augment": llama(augment)})
    runs = {"shared": [], "full": []}
    for r in range(args.repeats):
        for mode in (("shared", "full") if r % 2 == 0 else ("full", "shared")):
            shared.ENABLED = mode == "shared"
            _entry(composed)["decoders"].clear()
            started = time.perf_counter()
            decoder = decoder_for(composed, 1, 256)
            runs[mode].append(round(time.perf_counter() - started, 2))
            print(mode, runs[mode][-1], flush=True)
    shared.ENABLED = True
    result = {"command": " ".join(["python", *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch_threads": torch.get_num_threads()},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "anchor": anchor, "augment": augment, "decoded": list(decoder.models), "batch": 1, "cache": 256,
              "dtype": "bf16", "seconds": runs, "median_seconds": {m: statistics.median(v) for m, v in runs.items()}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median_seconds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

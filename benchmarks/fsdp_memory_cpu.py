"""Per-rank parameter and optimizer bytes under `TrainConfig(parallel="fsdp")`, on CPU processes over gloo,
against the memory model of benchmarks/README.md (each rank: 1/world of the frozen weights, of the new
parameters and of their optimizer state).

    torchrun --standalone --nproc_per_node 2 benchmarks/fsdp_memory_cpu.py --out benchmarks/results/fsdp_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import calmgraph as cg  # noqa: E402
from calmgraph.train import FineTuner, TrainConfig  # noqa: E402

# Llama-shaped, small enough for a 2-core machine; bf16 weights as at scale.
ANCHOR = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
          "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096}
AUGMENT = {**ANCHOR, "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 1}
SPEC = {"anchor": {"name": "base", "source": {"hf_config": ANCHOR, "seed": 0, "dtype": "bfloat16"}},
        "augments": [{"name": "aug", "source": {"hf_config": AUGMENT, "seed": 1, "dtype": "bfloat16"}}],
        "edges": [{"source": "aug", "target": "base", "layers": {"every": 4}}]}


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"input_ids": torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(i))}


def nbytes(tensors) -> int:
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    composed = cg.compile(SPEC)
    whole = {"frozen": nbytes(p for n, p in composed.named_parameters() if not n.startswith("xattn.")),
             "new": nbytes(composed.new_parameters())}
    tuner = FineTuner(composed, Tokens(), TrainConfig(max_steps=1, batch_size=2, parallel="fsdp", cpu=True,
                                                      progress=False))
    tuner.train()
    model = tuner.model
    state = [v for s in tuner.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    mine = {"frozen": nbytes(p for p in model.parameters() if not p.requires_grad),
            "new": nbytes(p for p in model.parameters() if p.requires_grad), "optimizer": nbytes(state)}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        result = {"command": "torchrun --standalone --nproc_per_node %d benchmarks/fsdp_memory_cpu.py --out %s" % (world, args.out),
                  "device": "cpu (gloo)", "versions": {"torch": torch.__version__, "python": platform.python_version()},
                  "spec": SPEC, "world": world, "whole_bytes": whole,
                  "whole_optimizer_bytes": 2 * whole["new"],  # AdamW: exp_avg and exp_avg_sq, in the parameters' dtype
                  "ranks": ranks,
                  "model_per_rank_bytes": {"frozen": whole["frozen"] / world, "new": whole["new"] / world,
                                           "optimizer": 2 * whole["new"] / world}}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({"whole": whole, "ranks": ranks}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

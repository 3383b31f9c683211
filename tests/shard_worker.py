"""Run by tests/test_outline.py under torchrun (2 CPU processes, gloo): a Llama + Qwen2 composition,
sharded with FSDP2 (`calmgraph.parallel.shard`), with and without activation checkpointing. Each rank
takes its half of the batch; rank 0 writes what it saw (outputs, full gradients, parameter counts)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_outline import composition, grads_of_loss  # noqa: E402
from tests.torchrun import finish  # noqa: E402

from calmgraph.parallel import checkpoint_blocks, local_numel, shard  # noqa: E402


def run(checkpointing: bool, out: Path) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    composed, ids = composition()
    total = sum(p.numel() for p in composed.parameters())
    frozen_total = sum(p.numel() for p in composed.parameters() if not p.requires_grad)
    if checkpointing:
        checkpoint_blocks(composed)
    shard(composed)
    rows = ids.chunk(world)[rank]
    logits = composed(rows).detach()
    grads = grads_of_loss(composed, rows)
    full = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}
    frozen_local = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                       for p in composed.parameters() if not p.requires_grad)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"logits": logits, "local": local_numel(composed), "frozen_local": frozen_local})
    try:  # refused, naming what to do, with nothing run
        composed.generate(rows[:, :4], 2)
        refused = None
    except Exception as e:  # noqa: BLE001 - the test reads its type and message
        refused = (type(e).__name__, isinstance(e, ValueError), str(e))
    saved = composed.save_new(out.with_name(f"new_{checkpointing}.safetensors"))   # every rank; rank 0 writes
    return {"total": total, "frozen_total": frozen_total, "ranks": gathered, "grads": full, "generate": refused,
            "saved": str(saved)}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    results = {name: run(ck, Path(out)) for name, ck in (("plain", False), ("checkpointed", True))}
    if dist.get_rank() == 0:
        torch.save(results, out)
    finish()


if __name__ == "__main__":
    main(sys.argv[1])

"""Run by tests/test_outline.py under torchrun (2 CPU processes, gloo): a Llama + Qwen2 composition,
sharded with FSDP2 (`calmgraph.parallel.shard`), with and without activation checkpointing. Each rank
takes its half of the batch; rank 0 writes what it saw (outputs, full gradients, parameter counts, the
tokens each rank generated for its rows, the logits after generating). The new parameters are saved
after a forward, which leaves FSDP's root gathered."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_outline import composition, generate_calls, grads_of_loss, sharded_inputs  # noqa: E402
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
    gathered, after = [None] * world, [None] * world
    dist.all_gather_object(gathered, {"logits": logits, "local": local_numel(composed), "frozen_local": frozen_local})
    generated = generate(composed, rows)
    dist.all_gather_object(after, composed(rows).detach())
    saved = composed.save_new(out.with_name(f"new_{checkpointing}.safetensors"))   # every rank; rank 0 writes
    return {"total": total, "frozen_total": frozen_total, "ranks": gathered, "grads": full, "generate": generated,
            "after": after, "saved": str(saved)}


def generate(composed, rows: torch.Tensor, **inputs) -> dict:
    """Each rank generates for its own rows (`generate_calls`: the ranks decode for different numbers of
    steps); what a sharded composition cannot do is refused, naming what to do, with nothing run."""
    rank = dist.get_rank()
    refused = {}
    for keyword in ("cache", "compile_step"):
        try:
            composed.generate(rows, 2, **{keyword: True}, **inputs)
            refused[keyword] = None
        except Exception as e:  # noqa: BLE001 - the test reads its type and message
            refused[keyword] = (type(e).__name__, isinstance(e, ValueError), str(e))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = {name: composed.generate(*args, **kw, **inputs) for name, (args, kw) in generate_calls(rows, rank).items()}
    said = sorted({str(w.message) for w in caught if "KV cache" in str(w.message)})
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, tokens)
    return {"refused": refused, "ranks": gathered, "warned": said}


class _BrokenStreamer:
    """Raises at the second step's tokens (its first `put` is the prompt)."""

    def __init__(self):
        self.puts = 0

    def put(self, value):
        self.puts += 1
        if self.puts == 3:
            raise RuntimeError("the streamer broke")

    def end(self):
        pass


def failures(composed, rows: torch.Tensor) -> dict:
    """A call one rank refuses (rank 1's ids are out of the vocabulary), then one that fails on one rank
    mid-decode (rank 0's streamer raises): each rank's error, and the tokens of a call after both."""
    rank = dist.get_rank()
    bad = rows.clone()
    bad[0, 0] = 10 ** 6
    seen = {}
    for name, (ids, kw) in {"refused": (bad if rank == 1 else rows, {}),
                            "streamer": (rows, {"streamer": _BrokenStreamer()} if rank == 0 else {})}.items():
        try:
            composed.generate(ids, 6, **kw)
            seen[name] = None
        except Exception as e:  # noqa: BLE001 - the test reads its type and message
            seen[name] = (type(e).__name__, str(e))
    seen["after"] = composed.generate(rows, 3 + rank)             # the ranks are still in step
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, seen)
    return gathered


def main(out: str) -> None:
    dist.init_process_group("gloo")
    results = {name: run(ck, Path(out)) for name, ck in (("plain", False), ("checkpointed", True))}
    for variant in ("prompt", "masked"):          # a prompt augment; blocks that write where write_mask says
        composed, ids = composition(prompt=variant == "prompt", masked=variant == "masked")
        rows = ids.chunk(dist.get_world_size())[dist.get_rank()]
        results[variant] = generate(shard(composed), rows, **sharded_inputs(variant, rows))
    composed, ids = composition()
    results["failures"] = failures(shard(composed), ids.chunk(dist.get_world_size())[dist.get_rank()])
    if dist.get_rank() == 0:
        torch.save(results, out)
    finish()


if __name__ == "__main__":
    main(sys.argv[1])

"""Run by tests/test_train_scale.py under torchrun (2 CPU processes, gloo): FineTuner with
`parallel="fsdp"` (with and without activation checkpointing, with a resume), each process taking half of
the global batch. Rank 0 writes what the run produced: history, the trained parameters, checkpoint paths,
and each rank's share of the parameters."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_train_scale import BATCH, Tokens, composition, config  # noqa: E402
from tests.torchrun import finish  # noqa: E402

from calmgraph.train import FineTuner  # noqa: E402


def local_numels(model) -> dict[str, int]:
    local = lambda p: (p.to_local() if hasattr(p, "to_local") else p).numel()  # noqa: E731
    return {"frozen": sum(local(p) for p in model.parameters() if not p.requires_grad),
            "new": sum(local(p) for p in model.parameters() if p.requires_grad)}


def run(out: Path, name: str, **kw) -> dict:
    composed = composition()
    tuner = FineTuner(composed, Tokens(), config(out / name, batch_size=BATCH, parallel="fsdp", **kw),
                      eval_dataset=Tokens(n=6, seed=100))
    history = tuner.train()
    numels = [None] * dist.get_world_size()
    dist.all_gather_object(numels, local_numels(tuner.model))
    return {"history": history, "params": tuner.trainable_state(), "ranks": numels}


def resumed(out: Path) -> dict:
    """Resume from the sharded checkpoint of step 1 of a run like `run`'s, in fresh FineTuners."""
    evalset = Tokens(n=6, seed=100)
    first = FineTuner(composition(), Tokens(), config(out / "resume", batch_size=BATCH, parallel="fsdp"),
                      eval_dataset=evalset)
    first.train()
    second = FineTuner(composition(), Tokens(), config(out / "resume", batch_size=BATCH, parallel="fsdp"),
                       eval_dataset=evalset)
    history = second.train(resume_from=out / "resume" / "step-00000001")
    return {"history": history, "params": second.trainable_state()}


def main(out: str) -> None:
    out = Path(out)
    results = {"fsdp": run(out, "fsdp"), "fsdp_ac": run(out, "fsdp_ac", activation_checkpointing=True),
               "resumed": resumed(out)}
    if dist.get_rank() == 0:
        torch.save(results, out / "rank0.pt")
    finish()


if __name__ == "__main__":
    main(sys.argv[1])

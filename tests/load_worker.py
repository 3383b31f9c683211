"""Run by tests/test_load_sharded.py under torchrun (2 CPU processes, gloo): the composition of the test's
`hf:` folders compiled on the meta device, then a FineTuner with `parallel="fsdp"`, which shards it and
loads each rank's shards (`parallel.load_sharded`). Each rank measures its memory at setup (peak resident
set over the resident set after imports, and over that after compiling); then the logits of the whole
batch, the new parameters as loaded, the tokens each rank generates for its half of the batch, and the
training run (each rank half of the global batch). Rank 0
writes what every rank saw."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import accelerate  # noqa: E402
import transformers  # noqa: E402
from tests.test_load_sharded import BATCH, COMPILE_SEED, Tokens, batch_ids, train_config  # noqa: E402
from tests.torchrun import finish  # noqa: E402

import calmgraph as cg  # noqa: E402
from calmgraph.train import FineTuner  # noqa: E402


def status_kib(field: str) -> int:
    """A line of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (the peak resident so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def meta_composition(spec: Path):
    torch.manual_seed(COMPILE_SEED)
    with torch.device("meta"):
        return cg.compile(spec)


def main(folder: str, out: str) -> None:
    dist.init_process_group("gloo")
    _ = transformers.LlamaForCausalLM, accelerate.Accelerator  # lazy imports done before the baseline
    before = status_kib("VmRSS")
    composed = meta_composition(Path(folder) / "spec.yaml")
    structure = status_kib("VmRSS")  # compiled: no weight yet
    tuner = FineTuner(composed, Tokens(), train_config(batch_size=BATCH, parallel="fsdp"))  # shards, then loads
    peak = status_kib("VmHWM")
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    memory = {"setup_bytes": (peak - before) * 1024, "load_bytes": (peak - structure) * 1024,
              "local_frozen_bytes": sum(local(p).numel() * p.element_size()
                                        for p in tuner.model.parameters() if not p.requires_grad)}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, memory)
    with torch.no_grad():
        logits = tuner.model(batch_ids())
    tuner.model.reshard()  # a forward without backward leaves the root's weights gathered
    new = {n: p.full_tensor() for n, p in tuner.model.named_new_parameters()}
    generated = [None] * dist.get_world_size()   # each rank's rows, before training
    dist.all_gather_object(generated, tuner.model.generate(batch_ids().chunk(dist.get_world_size())[dist.get_rank()], 4))
    history = tuner.train()
    if dist.get_rank() == 0:
        torch.save({"ranks": ranks, "logits": logits, "new": new, "generated": generated, "history": history}, out)
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:])

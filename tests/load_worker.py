"""Run by tests/test_load_sharded.py under torchrun (2 CPU processes, gloo): the composition of the test's
`hf:` folders compiled on the meta device, sharded and loaded rank by rank (`load_sharded`). Each rank
measures its memory at setup (peak resident set over the resident set after imports); then the logits of
the whole batch, the new parameters as loaded, and a FineTuner run with `parallel="fsdp"` (each rank half of
the global batch). Rank 0 writes what every rank saw."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import transformers  # noqa: E402
from tests.test_load_sharded import BATCH, COMPILE_SEED, Tokens, batch_ids, train_config  # noqa: E402

import calmgraph as cg  # noqa: E402
from calmgraph.parallel import load_sharded, shard  # noqa: E402
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


def setup(spec: Path) -> tuple[dict, object]:
    """Compile on meta, shard, load: this rank's memory for it, and the loaded composition."""
    before = status_kib("VmRSS")
    composed = shard(meta_composition(spec))
    load_sharded(composed)
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    frozen = sum(local(p).numel() * p.element_size() for p in composed.parameters() if not p.requires_grad)
    return {"setup_bytes": (status_kib("VmHWM") - before) * 1024, "local_frozen_bytes": frozen}, composed


def main(folder: str, out: str) -> None:
    dist.init_process_group("gloo")
    _ = transformers.LlamaForCausalLM  # the lazy import done before the baseline, as torch's and calmgraph's
    spec = Path(folder) / "spec.yaml"
    memory, composed = setup(spec)
    with torch.no_grad():
        logits = composed(batch_ids())
    composed.reshard()  # a forward without backward leaves the root's weights gathered
    new = {n: p.full_tensor() for n, p in composed.named_new_parameters()}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, memory)

    tuner = FineTuner(meta_composition(spec), Tokens(), train_config(batch_size=BATCH, parallel="fsdp"))
    history = tuner.train()
    if dist.get_rank() == 0:
        torch.save({"ranks": ranks, "logits": logits, "new": new, "history": history}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

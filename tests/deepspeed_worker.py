"""Run by tests/test_train_scale.py under torchrun (2 CPU processes, gloo, DS_ACCELERATOR=cpu): FineTuner
with the user's DeepSpeed ZeRO-3 Accelerator, each process taking half of the global batch, and a resume
from its step-1 checkpoint (the Accelerator freed first: it drives one engine). First, an Accelerator built without a CPU backend, which counts one process of
the two, is refused. Rank 0 writes what the runs produced."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_train_scale import BATCH, Tokens, composition, config  # noqa: E402
from tests.torchrun import finish  # noqa: E402

from calmgraph.errors import ConfigError  # noqa: E402
from calmgraph.train import FineTuner  # noqa: E402


def refusal(out: Path) -> str:
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3))  # no backend: it counts 1 process
    try:
        FineTuner(composition(), Tokens(), config(out / "refused", batch_size=BATCH, cpu=False), accelerator=accelerator)
    except ConfigError as e:
        return str(e)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return "not refused"


def refusals(out: Path, accelerator) -> dict[str, str]:
    """What FineTuner refuses with a DeepSpeed Accelerator: the message of each (the plugin left as it was)."""
    config_ds = accelerator.state.deepspeed_plugin.deepspeed_config
    cases = {"grad_accum": ({"grad_accum_steps": 2}, {}), "fsdp": ({"parallel": "fsdp"}, {}),
             "clipping": ({"max_grad_norm": 1.0}, {"gradient_clipping": 0.5}), "fp16": ({}, {"fp16": {"enabled": True}})}
    said = {}
    for name, (kw, ds) in cases.items():
        before = {k: config_ds[k] for k in ds}
        config_ds.update(ds)
        try:
            FineTuner(composition(), Tokens(), config(out / name, batch_size=BATCH, cpu=False, **kw), accelerator=accelerator)
            said[name] = "not refused"
        except ConfigError as e:
            said[name] = str(e)
        finally:
            config_ds.update(before)
    return said


def tuner(out: Path, accelerator) -> FineTuner:
    return FineTuner(composition(), Tokens(), config(out / "zero3", batch_size=BATCH, cpu=False),
                     eval_dataset=Tokens(n=6, seed=100), accelerator=accelerator)


def main(out: str) -> None:
    out = Path(out)
    refused = refusal(out)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    said = refusals(out, accelerator)
    first = tuner(out, accelerator)
    results = {"refused": refused, "refusals": said, "zero3": {"history": first.train(), "params": first.trainable_state()}}
    local = sum(p.ds_tensor.numel() for p in first.model.module.parameters() if not p.requires_grad)
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, local)
    results["frozen_local"] = ranks
    try:  # Accelerate's backward would still drive the first engine
        tuner(out, accelerator)
        results["reused"] = "not refused"
    except ConfigError as e:
        results["reused"] = str(e)
    accelerator.free_memory()
    second = tuner(out, accelerator)
    history = second.train(resume_from=out / "zero3" / "step-00000001")
    results["resumed"] = {"history": history, "params": second.trainable_state()}
    if dist.get_rank() == 0:
        torch.save(results, out / "rank0.pt")
    finish()


if __name__ == "__main__":
    main(sys.argv[1])

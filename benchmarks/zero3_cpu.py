"""DeepSpeed ZeRO-3 (`deepspeed.initialize`, stage 3) on the block-granular fused graph, 2 CPU processes
over gloo: logits, and the new parameters after one AdamW step, against one unsharded process; and each
rank's share of the frozen parameters. Then FineTuner through Accelerate: how many processes a DeepSpeed
Accelerator counts without and with a CPU backend (the cause of a first loss of 4.510 against 4.340), and
3 steps of FineTuner with ZeRO-3 against one process (a subprocess). Needs `pip install deepspeed` (no
GPU: DS_ACCELERATOR=cpu).

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 benchmarks/zero3_cpu.py --out benchmarks/results/zero3_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_train_scale import BATCH, Tokens, composition, config  # noqa: E402  (TinyLM anchor + augment)

from calmgraph.train import FineTuner, next_token_loss  # noqa: E402

ONE_PROCESS = """
import json, sys
sys.path.insert(0, {root!r})
from tests.test_train_scale import Tokens, composition, config
from calmgraph.train import FineTuner
tuner = FineTuner(composition(), Tokens(), config(None, output_dir=None), eval_dataset=Tokens(n=6, seed=100))
print(json.dumps(tuner.train()))
"""


def trainable(composed) -> torch.optim.Optimizer:
    new = {id(p) for p in composed.new_parameters()}
    for p in composed.parameters():
        p.requires_grad_(id(p) in new)
    return torch.optim.AdamW(composed.new_parameters(), lr=1e-2)


def counted_processes(**kw) -> int:
    """The processes a ZeRO-3 Accelerator counts (the Accelerator state is reset afterwards)."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState
    n = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3), **kw).num_processes
    AcceleratorState._reset_state(reset_partial_state=True)
    return n


def first_sequences_loss(n: int) -> float:
    """The loss of one process over the first n sequences of the data (what an unsharded loader gives)."""
    data = Tokens()
    ids = torch.stack([data[i]["input_ids"] for i in range(n)])
    mask = torch.stack([data[i]["label_mask"] for i in range(n)])
    with torch.no_grad():
        return float(next_token_loss(composition()(ids), ids, mask))


def finetuner(ranks: int) -> dict:
    """FineTuner with ZeRO-3 (gloo) for 3 steps, each process taking half of the global batch, against one
    process run as a subprocess."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs
    without = counted_processes()
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3), kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    tuner = FineTuner(composition(), Tokens(), config(None, batch_size=BATCH, cpu=False, output_dir=None),
                      eval_dataset=Tokens(n=6, seed=100), accelerator=acc)
    got = tuner.train()
    if dist.get_rank() != 0:
        return {}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK")}
    root = str(Path(__file__).resolve().parents[1])
    one = json.loads(subprocess.run([sys.executable, "-c", ONE_PROCESS.format(root=root)], env=env, check=True,
                                    capture_output=True, text=True).stdout.strip().splitlines()[-1])
    rel = lambda key: max(abs(g[key] - w[key]) / abs(w[key]) for g, w in zip(got, one, strict=True))  # noqa: E731
    return {"accelerate_num_processes_without_backend": without, "accelerate_num_processes_with_gloo": acc.num_processes,
            "world_size": ranks, f"loss_first_{BATCH}_sequences": first_sequences_loss(BATCH),
            f"loss_first_{2 * BATCH}_sequences": first_sequences_loss(2 * BATCH),
            "steps": len(got), "loss_max_rel_diff": rel("loss"), "grad_norm_max_rel_diff": rel("grad_norm"),
            "eval_loss_max_rel_diff": rel("eval_loss"), "zero3": got, "one_process": one}


def main() -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))  # every rank: the same batch
    ref = composition()
    opt = trainable(ref)
    with torch.no_grad():
        want = ref(ids)
    ref(ids).float().pow(2).mean().backward()
    opt.step()
    want_params = {n: p.detach().clone() for n, p in ref.named_new_parameters()}

    composed = composition()
    frozen_total = sum(p.numel() for n, p in composed.named_parameters() if not n.startswith("xattn."))
    engine, _, _, _ = deepspeed.initialize(model=composed, optimizer=trainable(composed), config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True})
    out = engine(ids)
    logits_diff = float((out.detach() - want).abs().max())
    engine.backward(out.float().pow(2).mean())
    engine.step()
    param_diff = max(float((safe_get_full_fp32_param(p) - want_params[n]).abs().max())
                     for n, p in engine.module.named_parameters() if n in want_params)
    frozen_local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                       for n, p in engine.module.named_parameters() if not n.startswith("xattn."))
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"logits_max_diff": logits_diff, "new_params_max_diff_after_step": param_diff,
                                   "frozen_numel_local": frozen_local})
    tuned = finetuner(len(ranks))
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({
            "command": f"DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node {len(ranks)} benchmarks/zero3_cpu.py --out {args.out}",
            "device": "cpu (gloo)", "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                                                 "python": platform.python_version()},
            "frozen_numel_total": frozen_total, "ranks": ranks, "finetuner": tuned}, indent=1) + "\n")


if __name__ == "__main__":
    main()

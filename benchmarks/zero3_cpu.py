"""DeepSpeed ZeRO-3 (`deepspeed.initialize`, stage 3) on the block-granular fused graph, 2 CPU processes
over gloo: logits, and the new parameters after one AdamW step, against one unsharded process; and each
rank's share of the frozen parameters. Needs `pip install deepspeed` (no GPU: DS_ACCELERATOR=cpu).

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 benchmarks/zero3_cpu.py --out benchmarks/results/zero3_cpu.json
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
from tests.test_train_scale import composition  # noqa: E402  (TinyLM anchor + augment, non-zero gates)


def trainable(composed) -> torch.optim.Optimizer:
    new = {id(p) for p in composed.new_parameters()}
    for p in composed.parameters():
        p.requires_grad_(id(p) in new)
    return torch.optim.AdamW(composed.new_parameters(), lr=1e-2)


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
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps({
            "command": f"DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node {len(ranks)} benchmarks/zero3_cpu.py --out {args.out}",
            "device": "cpu (gloo)", "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                                                 "python": platform.python_version()},
            "frozen_numel_total": frozen_total, "ranks": ranks}, indent=1) + "\n")


if __name__ == "__main__":
    main()

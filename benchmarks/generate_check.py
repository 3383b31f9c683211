"""Greedy tokens of `composed.generate` four ways on the benchmark's Llama composition: recomputing, with
the KV cache, with the cached step under torch.compile (CUDA graphs on a GPU), and that step with
`concat_projections=True`. They should agree: in float32 exactly; in bf16 (the models cast, or float32 models
under autocast) each path rounds in its own order, so a near-tie can turn a token and the rest of its row:
`first_difference` says where, and `at_first_difference` how near a tie the recomputing path's choice was
there (the gap between its two largest logits, beside one rounding of the largest).

    python benchmarks/generate_check.py --device cuda --out benchmarks/results/generate_check_gpu.json
    python benchmarks/generate_check.py --device cuda --dtype bf16          # or: --autocast bf16
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate_bench import CONFIGS, build  # noqa: E402 - the benchmark's own models and wiring


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def first_difference(tokens: torch.Tensor, reference: torch.Tensor) -> list[int | None]:
    """Per row, the index of the first new token that differs from the reference's (None: none does)."""
    return [int(row.nonzero()[0]) if row.any() else None for row in (tokens != reference)]


def tie(composed, sequence: torch.Tensor, prompt: torch.Tensor) -> dict[str, float]:
    """How near a tie the recomputing path's choice was where another path chose otherwise: the gap between
    its two largest logits there, beside one rounding of the largest logit in the logits' dtype."""
    logits = composed(sequence, augment_input_ids=prompt)[0, -1]
    top = logits.float().topk(2).values
    return {"gap": round(float(top[0] - top[1]), 6),
            "rounding": round(float(top.abs().max()) * torch.finfo(logits.dtype).eps, 6)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="the models' dtype")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="run generate under autocast")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "dtype": args.dtype, "autocast": args.autocast, "results": []}
    autocast = (torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.autocast])
                if args.autocast else contextlib.nullcontext())
    for cfg in (c for c in CONFIGS if c["models"] == "llama"):
        _, composed, _ = build(cfg, calm_pytorch=False, dtype=DTYPES[args.dtype])
        composed = composed.to(args.device)
        prompt = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["prompt"]),
                               generator=torch.Generator().manual_seed(1)).to(args.device)
        with autocast:
            runs = {name: composed.generate(prompt, cfg["new"], augment_input_ids=prompt, **kw)[:, -cfg["new"]:]
                    for name, kw in (("recompute", {"cache": False}), ("cache", {"cache": True}),
                                     ("compiled", {"cache": True, "compile_step": True}),
                                     ("compiled_concat", {"cache": True, "compile_step": True,
                                                          "concat_projections": True}))}
        same = {name: float((out == runs["recompute"]).float().mean()) for name, out in runs.items()}
        first = {name: first_difference(out, runs["recompute"]) for name, out in runs.items()}
        with autocast, torch.no_grad():
            full = torch.cat([prompt, runs["recompute"]], 1)
            ties = {name: [None if at is None else tie(composed, full[r:r + 1, :cfg["prompt"] + at], prompt[r:r + 1])
                           for r, at in enumerate(rows)] for name, rows in first.items() if name != "recompute"}
        report["results"].append({"config": cfg, "fraction_of_tokens_equal_to_recompute": same,
                                  "first_difference": first, "at_first_difference": ties})
        print(cfg["batch"], cfg["prompt"], cfg["new"], same, first, ties, flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Greedy tokens of `composed.generate` three ways on the benchmark's Llama composition: recomputing, with
the KV cache, and with the cached step under torch.compile (CUDA graphs on a GPU). They should agree.

    python benchmarks/generate_check.py --device cuda --out benchmarks/results/generate_check_gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate_bench import CONFIGS, build  # noqa: E402 - the benchmark's own models and wiring


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "results": []}
    for cfg in (c for c in CONFIGS if c["models"] == "llama"):
        _, composed, _ = build(cfg, calm_pytorch=False)
        composed = composed.to(args.device)
        prompt = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["prompt"]),
                               generator=torch.Generator().manual_seed(1)).to(args.device)
        runs = {name: composed.generate(prompt, cfg["new"], temperature=0, augment_input_ids=prompt, **kw)
                for name, kw in (("recompute", {"cache": False}), ("cache", {"cache": True}),
                                 ("compiled", {"cache": True, "compile_step": True}))}
        same = {name: float((out == runs["recompute"]).float().mean()) for name, out in runs.items()}
        report["results"].append({"config": cfg, "fraction_of_tokens_equal_to_recompute": same})
        print(cfg["batch"], cfg["prompt"], cfg["new"], same, flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Per-process memory of setting up a sharded composition, on 2 CPU processes over gloo: loaded whole then
sharded (`cg.compile` on real weights, then `shard`) against compiled on the meta device, sharded, and each
process reading its own shards (`load_sharded`). The anchor is a Llama-shaped `hf:` folder in bf16 (~1.2 GB,
several safetensors files); both routes give the same logits.

    python benchmarks/load_sharded_cpu.py --out benchmarks/results/load_sharded_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
              num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True)
AUGMENT = dict(ANCHOR, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, tie_word_embeddings=False)
SEED = 7


def write_folders(root: Path) -> Path:
    import transformers
    for name, config in (("anchor", ANCHOR), ("augment", AUGMENT)):
        if not (root / name / "config.json").is_file():
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16)
            model.save_pretrained(root / name, max_shard_size="300MB")
            del model
    spec = {"anchor": {"name": "base", "source": {"hf": str(root / "anchor"), "dtype": "bfloat16"}},
            "augments": [{"name": "aug", "source": {"hf": str(root / "augment"), "dtype": "bfloat16"}}],
            "edges": [{"source": "aug", "target": "base", "layers": {"every": 4}}]}
    (root / "spec.json").write_text(json.dumps(spec))
    return root / "spec.json"


def kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def worker(route: str, spec: Path, out: Path) -> None:
    import torch.distributed as dist
    import transformers

    import calmgraph as cg
    from calmgraph.parallel import load_sharded, shard
    dist.init_process_group("gloo")
    _ = transformers.LlamaForCausalLM  # lazy import before the baseline
    before = kib("VmRSS")
    torch.manual_seed(SEED)
    if route == "meta":
        with torch.device("meta"):
            composed = cg.compile(spec)
        load_sharded(shard(composed))
    else:
        composed = shard(cg.compile(spec))
    peak = kib("VmHWM")
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    mine = {"setup_peak_bytes": (peak - before) * 1024, "baseline_rss_bytes": before * 1024,
            "local_frozen_bytes": sum(local(p).numel() * p.element_size()
                                      for p in composed.parameters() if not p.requires_grad)}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    with torch.no_grad():
        logits = composed(torch.arange(16).reshape(2, 8) * 97 % ANCHOR["vocab_size"])
    if dist.get_rank() == 0:
        torch.save({"ranks": ranks, "logits": logits}, out)
    dist.destroy_process_group()


def run(route: str, spec: Path, scratch: Path) -> dict:
    out = scratch / f"{route}.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    __file__, "--worker", route, "--spec", str(spec), "--out", str(out)], env=env, check=True)
    return torch.load(out, weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--dir", help="folder for the hf: folders (default: a temporary one)")
    parser.add_argument("--worker", choices=["meta", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.spec), Path(args.out))
    import transformers
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        spec = write_folders(root)
        frozen = sum(f.stat().st_size for f in (root / "anchor").glob("*.safetensors"))
        runs = {route: run(route, spec, Path(tmp)) for route in ("whole", "meta")}
    diff = float((runs["meta"]["logits"].float() - runs["whole"]["logits"].float()).abs().max())
    result = {"command": "python benchmarks/load_sharded_cpu.py --out " + str(args.out),
              "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores "
              "(shared with other work), CPU processes over gloo",
              "calmgraph_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                                 capture_output=True).stdout.strip(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "anchor": ANCHOR, "augment": AUGMENT, "dtype": "bfloat16", "world": 2,
              "anchor_safetensors_bytes": frozen,
              "routes": {"whole": "cg.compile on real weights, then shard",
                         "meta": "cg.compile on the meta device, shard, load_sharded"},
              "ranks": {route: r["ranks"] for route, r in runs.items()},
              "logits_max_abs_diff": diff}
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

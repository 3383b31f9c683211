"""Compile time of a composition at LLM shapes on the meta device (no weights): identical blocks sharing one
torch.export trace (`calmgraph/tracing/shared.py`) against every block traced, with each pass's seconds
(`composed.compile_log`). Shapes and spec as `scale_gpu.py`: a Llama-shaped augment every 4th anchor layer.

    python benchmarks/compile_time.py --out benchmarks/results/compile_time_cpu.json

Each repeat compiles freshly built models once per mode, the modes in alternating order; reported: the
median, and every run, in wall-clock seconds and in this process's CPU seconds (on a shared machine the
wall clock also counts other processes' turns; on the meta device nothing runs on other threads). Runs in
one process share torch's warm caches; `--fresh` runs each compile in a new process (imports done before the
clock starts), as a user's first compile is.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from scale_gpu import SHAPES, llama  # noqa: E402


def compile_once(anchor: str, augment: str, share: bool) -> dict:
    import calmgraph as cg
    from calmgraph.tracing import shared
    models = {"base": llama(anchor, "meta"), "aug": llama(augment, "meta")}
    spec = {"anchor": {"name": "base"}, "augments": [{"name": "aug"}],
            "edges": [{"source": "aug", "target": "base", "layers": {"every": 4}}]}
    shared.ENABLED = share
    try:
        started, cpu = time.perf_counter(), time.process_time()
        composed = cg.compile(spec, models=models)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        shared.ENABLED = True
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2),
            "passes": {p["pass"]: p["seconds"] for p in composed.compile_log}, "graph_nodes": len(composed.graph.nodes)}


def compile_fresh(anchor: str, augment: str, share: bool) -> dict:
    """`compile_once` in a new Python process."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
            "import transformers; transformers.logging.set_verbosity_error(); import calmgraph; "
            f"from compile_time import compile_once; print(json.dumps(compile_once({anchor!r}, {augment!r}, {share})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="llama2-7b+tinyllama-1.1b", help="anchor+augment (shapes: %s)" % ", ".join(SHAPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="shared,full", help="shared and/or full (every block traced)")
    p.add_argument("--fresh", action="store_true", help="each compile in a new process (cold caches)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import transformers
    transformers.logging.set_verbosity_error()
    anchor, augment = args.pair.split("+")
    modes = args.modes.split(",")
    result = {"command": " ".join(["python", *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "anchor": anchor, "augment": augment, "device": "meta", "spec": "augment every 4th anchor layer",
              "fresh_process_per_run": args.fresh, "runs": {m: [] for m in modes}}
    for r in range(args.repeats):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            run = (compile_fresh if args.fresh else compile_once)(anchor, augment, share=mode == "shared")
            result["runs"][mode].append(run)
            print(mode, json.dumps(run), flush=True)
    result["median_seconds"] = {m: statistics.median(r["seconds"] for r in runs) for m, runs in result["runs"].items()}
    result["median_cpu_seconds"] = {m: statistics.median(r["cpu_seconds"] for r in runs)
                                    for m, runs in result["runs"].items()}
    result["load_average_at_end"] = os.getloadavg()
    result["median_pass_seconds"] = {m: {k: round(statistics.median(r["passes"][k] for r in runs), 2)
                                         for k in runs[0]["passes"]} for m, runs in result["runs"].items()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("median_seconds", "median_cpu_seconds", "median_pass_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

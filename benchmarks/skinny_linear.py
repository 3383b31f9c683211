"""The products of a decode step at few rows, cuBLAS (`F.linear`) against calmgraph's split-K Triton kernel
(`calmgraph.generation.kernels`), at generate_scale.py's shapes: GPU us a product and the weight's bytes over
that time.

    python benchmarks/skinny_linear.py --out benchmarks/results/skinny_linear_gpu.json
    python benchmarks/skinny_linear.py --sweep      # every block config and split, the best of each shape

Each timing replays a CUDA graph of one product per copy of the weight, over enough copies (256 MB) that no
weight is read from L2 twice, as in a step that reads each weight once; the median of 7 replays, over the
copies. The kernel's time is the partial sums alone: in a compiled step inductor folds their sum into the
product's consumer.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from calmgraph.generation import kernels

# (name, out features, in features): the anchor (TinyLlama-1.1B-shaped) and augment (0.25B) of
# generate_scale.py, their q/k/v and gate/up concatenated (concat_projections) and apart, and the lm head
SHAPES = [("anchor.qkv", 2560, 2048), ("anchor.q|o", 2048, 2048), ("anchor.k", 256, 2048),
          ("anchor.gate_up", 11264, 2048), ("anchor.gate", 5632, 2048), ("anchor.down", 2048, 5632),
          ("augment.qkv", 1536, 1024), ("augment.q|o", 1024, 1024), ("augment.gate_up", 5632, 1024),
          ("augment.down", 1024, 2816), ("link.kv", 512, 1024), ("lm_head", 32000, 2048)]
BYTES = 256 << 20


def timed(product, copies: list[torch.Tensor], x: torch.Tensor) -> float:
    """Median GPU us of `product(x, w)`, one per copy, replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in copies[:3]:
            product(x, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in copies:
            product(x, w)
    graph.replay()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(copies))
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--sweep", action="store_true", help="every config and split, besides the default")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    torch._dynamo.config.recompile_limit = 256  # one compile of the summed op per shape
    processors = torch.cuda.get_device_properties(0).multi_processor_count
    configs = [(n, k, *ws) for n, k, ws in itertools.product([32, 64, 128], [128, 256], [(4, 3), (4, 4), (8, 4)])
               if 2 * n * k * ws[1] <= 160 << 10]  # the weight's pipeline stages fit in shared memory
    report = {"question": "at a decode step's few rows, how fast is the split-K Triton kernel against cuBLAS",
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "triton": kernels.triton.__version__, "processors": processors, "results": []}
    for (name, n, k), rows in itertools.product(SHAPES, args.rows):
        copies = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(4, BYTES // (2 * n * k)))]
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x.double(), copies[0].double())
        block_n, s = kernels.plan(n, k, processors)
        got = kernels.launch(x, copies[0], block_n, s).sum(0)
        error = float((got.double() - want).abs().max() / want.abs().max())
        cublas = timed(F.linear, copies, x)
        ours = timed(lambda x, w: kernels.launch(x, w, block_n, s), copies, x)
        # as a compiled step runs it: the op, its partial sums added in the consumer's kernel
        summed = torch.compile(lambda x, w, s=s, block_n=block_n: torch.ops.calmgraph.skinny_partials(x, w, block_n, s).sum(0).to(x.dtype) + 1)
        compiled_error = float(((summed(x, copies[0]) - 1).double() - want).abs().max() / want.abs().max())
        compiled = timed(summed, copies, x)
        row = {"shape": name, "n": n, "k": k, "rows": rows, "cublas_us": round(cublas, 2),
               "kernel_us": round(ours, 2), "block_n": block_n, "splits": s,
               "kernel_over_cublas": round(ours / cublas, 3),
               "cublas_tb_s": round(2 * n * k / cublas / 1e6, 2), "kernel_tb_s": round(2 * n * k / ours / 1e6, 2),
               "compiled_op_plus_one_us": round(compiled, 2),
               "max_error_relative_to_float64": error, "compiled_max_error": compiled_error}
        if args.sweep:
            trials = []
            for config in configs:
                for split in (1, 2, 4, 8, 16):
                    if -(-k // (split * config[1])) * (split - 1) * config[1] >= k:  # an empty split
                        continue
                    block_n, block_k, warps, stages = config
                    us = timed(lambda x, w: kernels.launch(x, w, block_n, split, block_k=block_k, warps=warps,
                                                           stages=stages), copies, x)
                    trials.append((us, config, split))
            best = min(trials)
            row["best"] = {"us": round(best[0], 2), "config": dict(zip(("block_n", "block_k", "warps", "stages"),
                                                                        best[1])), "splits": best[2],
                           "tb_s": round(2 * n * k / best[0] / 1e6, 2)}
        report["results"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after each shape: a run stopped at its time limit keeps what it measured
            args.out.write_text(json.dumps(report, indent=1) + "\n")
        del copies


if __name__ == "__main__":
    main()

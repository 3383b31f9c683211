"""Train steps of a composition at LLM shapes on one GPU: eager and compiled, with and without activation
checkpointing (`calmgraph.parallel.checkpoint_blocks`), peak memory of each. Random weights, bf16.

    python benchmarks/scale_gpu.py --out benchmarks/results/scale_gpu.json

Rows run in order until `--budget-s` is spent; the JSON is rewritten after each row, so a run cut short
keeps what it measured. Timing: 2 warm-up steps, then the median of `--steps` steps (CUDA-synchronised).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch

SHAPES = {  # hidden, layers, heads, kv heads, intermediate
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632),
    "llama-0.25b": (1024, 16, 16, 4, 2816),
    "llama2-7b": (4096, 32, 32, 32, 11008),
}


def llama(shape: str, device: str) -> torch.nn.Module:
    import transformers as t
    hidden, layers, heads, kv, inter = SHAPES[shape]
    cfg = t.LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096)
    with torch.device(device):
        return t.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def step_fn(composed, ids, compiled: bool):
    import calmgraph as cg
    opt = torch.optim.AdamW(composed.new_parameters(), lr=1e-4)
    forward = torch.compile(composed) if compiled else composed

    def step():
        loss = cg.next_token_loss(forward(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def measure(step, steps: int) -> dict:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"step_ms_median": round(statistics.median(times), 2), "step_ms_all": [round(t, 2) for t in times],
            "warmup_s": round(first, 2), "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
            "loss_finite": bool(torch.isfinite(loss).item())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="tinyllama-1.1b+llama-0.25b,llama2-7b+tinyllama-1.1b",
                   help="anchor+augment shape pairs, comma-separated (shapes: %s)" % ", ".join(SHAPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--modes", default="eager,compiled", help="eager and/or compiled (torch.compile of the fused graph)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import transformers
    import calmgraph as cg
    from calmgraph.parallel import checkpoint_blocks
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    result = {"command": " ".join(["python", *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version()},
              "batch": args.batch, "seq": args.seq, "dtype": "bfloat16", "mode": "shared, every 4", "rows": []}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for pair in args.pairs.split(","):
        anchor, augment = pair.split("+")
        torch.cuda.empty_cache()
        models = {"base": llama(anchor, "cuda"), "aug": llama(augment, "cuda")}
        spec = {"anchor": {"name": "base"}, "augments": [{"name": "aug"}],
                "edges": [{"source": "aug", "target": "base", "layers": {"every": 4}}]}
        t0 = time.perf_counter()
        composed = cg.compile(spec, models=models)
        compile_s = time.perf_counter() - t0
        torch.manual_seed(0)
        for q in composed.new_parameters():
            torch.nn.init.normal_(q, std=0.02)
        ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda")
        base = {"anchor": anchor, "augment": augment, "compile_s": round(compile_s, 1),
                "new_params_m": round(sum(q.numel() for q in composed.new_parameters()) / 1e6, 1)}
        # plain first, then the same graph with every block checkpointed (checkpoint_blocks rewrites in place)
        for ac in (False, True):
            if ac:
                checkpoint_blocks(composed)
            for mode in args.modes.split(","):
                row = {**base, "mode": mode, "activation_checkpointing": ac}
                if time.perf_counter() - started > args.budget_s:
                    row["skipped"] = "time budget spent"
                else:
                    try:
                        row.update(measure(step_fn(composed, ids, compiled=mode == "compiled"), args.steps))
                    except torch.cuda.OutOfMemoryError as e:
                        row["error"] = f"OutOfMemoryError: {str(e).splitlines()[0][:200]}"
                torch.cuda.empty_cache()
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
        del composed, models
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

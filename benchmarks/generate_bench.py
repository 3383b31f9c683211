"""Tokens/s of `composed.generate` against the seed implementation's `CALM.generate` (CALM-pytorch 0.2.x).

    python benchmarks/generate_bench.py --out benchmarks/results/generate_cpu.json
    python benchmarks/generate_bench.py --device cuda --out benchmarks/results/generate_gpu.json

Same models for both: a decoder anchor and a decoder augment that reads a prompt, connected at
CALM-pytorch's default layers (every 4th augment block; its 1-based pairs, made 0-based for calmgraph),
either x-transformers models (CALM-pytorch's own kind) or transformers Llamas (given to CALM-pytorch with
their block lists, and wrapped to return logits). CALM.generate feeds the prompt to the augment and the
anchor, samples with a top-p 0.9 filter at temperature 1, and re-runs the whole anchor for every token;
calmgraph generates with the same settings (and greedily, for reference). calmgraph caches a Llama
anchor's keys and values (`calmgraph/generation/decode.py`); an x-transformers anchor it recomputes, like CALM-pytorch.
Each run is timed after a warm-up (the first call also builds calmgraph's decode graph, a one-off cost
reported as `first_call_s`), the implementations alternating; the median and the best run are reported
(like nanoGPT's bench.py: warm up, then time).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # CALM's sampler draws a progress bar; keep it off the clock

import torch

import calmgraph as cg

SIZES = dict(vocab=512, anchor_dim=256, anchor_depth=4, augment_dim=256, augment_depth=8, heads=4)
CONFIGS = [  # model kind, batch, prompt, new tokens (+ SIZES: vocab, anchor/augment width and depth, heads)
    dict(models="x-transformers", batch=4, prompt=32, new=64, **SIZES),
    dict(models="x-transformers", batch=1, prompt=64, new=64, **SIZES),
    dict(models="llama", batch=4, prompt=32, new=64, **SIZES),
    dict(models="llama", batch=1, prompt=64, new=192, **SIZES),
]


class Logits(torch.nn.Module):
    """A transformers causal LM as CALM-pytorch calls its models: forward(ids) -> logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, **_):
        return self.model(ids, use_cache=False).logits


def decoders(cfg):
    if cfg["models"] == "llama":
        import transformers
        transformers.logging.set_verbosity_error()
        return lambda dim, depth: transformers.LlamaForCausalLM(transformers.LlamaConfig(  # noqa: E731
            vocab_size=cfg["vocab"], hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=depth,
            num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
            max_position_embeddings=cfg["prompt"] + cfg["new"] + 1)).eval()
    from x_transformers import Decoder, TransformerWrapper  # here: the Llama configs run without it
    return lambda dim, depth: TransformerWrapper(  # noqa: E731
        num_tokens=cfg["vocab"], max_seq_len=cfg["prompt"] + cfg["new"] + 1,
        attn_layers=Decoder(dim=dim, depth=depth, heads=cfg["heads"])).eval()


def build(cfg, calm_pytorch: bool = True, dtype: torch.dtype = torch.float32):
    """(CALM-pytorch's CALM, or None without `calm_pytorch`; the calmgraph composition; the layer pairs).
    The models are cast to `dtype` before compiling (the graph keeps the dtypes it was traced in)."""
    torch.manual_seed(0)
    decoder = decoders(cfg)
    anchor, augment = decoder(cfg["anchor_dim"], cfg["anchor_depth"]), decoder(cfg["augment_dim"], cfg["augment_depth"])
    anchor, augment = anchor.to(dtype), augment.to(dtype)
    # CALM-pytorch's default wiring (CALM.__init__): augment blocks 1, 5, ... -> anchor blocks 1, 1 + k, ...
    n = -(-cfg["augment_depth"] // 4)
    step = cfg["anchor_depth"] // min(n, cfg["anchor_depth"])
    pairs = list(zip(range(1, cfg["augment_depth"] + 1, 4), range(1, cfg["anchor_depth"] + 1, step)))

    calm = None
    if calm_pytorch:  # built first, as it always was: it draws from the RNG before compile does
        from CALM_pytorch import CALM, AugmentParams
        if cfg["models"] == "llama":
            blocks = lambda m: list(m.model.model.layers)  # noqa: E731
            calm = CALM(Logits(copy.deepcopy(anchor)), AugmentParams(model=Logits(copy.deepcopy(augment)),
                        connections=tuple(pairs), extract_blocks_fn=blocks), anchor_extract_blocks_fn=blocks)
        else:
            calm = CALM(copy.deepcopy(anchor), AugmentParams(model=copy.deepcopy(augment), connections=tuple(pairs)))
    spec = {"anchor": {"name": "anchor"}, "augments": [{"name": "augment", "input": "prompt"}],
            "edges": [{"source": "augment", "target": "anchor", "layers": [[a - 1, b - 1] for a, b in pairs]}]}
    composed = cg.compile(spec, models={"anchor": anchor, "augment": augment})
    return calm, composed, pairs


def bench(cfg, repeats, device="cpu", compile_step=False):
    calm, composed, pairs = build(cfg)  # on the CPU: CALM-pytorch builds itself with a CPU dummy input
    calm, composed = calm.to(device), composed.to(device)
    prompt = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["prompt"]), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    total = cfg["prompt"] + cfg["new"]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    cache = True if cfg["models"] == "llama" else None  # a Llama must use its cache (an error, not a fallback)
    runs = {
        "calm_pytorch": lambda: calm.generate(prompt=prompt, seq_len=total),  # default: top-p 0.9, temperature 1
        "calmgraph_top_p": lambda: composed.generate(prompt, cfg["new"], do_sample=True, top_k=0, top_p=0.9,
                                                     augment_input_ids=prompt, cache=cache),
        "calmgraph_greedy": lambda: composed.generate(prompt, cfg["new"], augment_input_ids=prompt, cache=cache),
    }
    if cfg["models"] == "llama":  # what the KV cache is worth: the same calls recomputing the sequence
        runs["calmgraph_top_p_no_cache"] = lambda: composed.generate(prompt, cfg["new"], do_sample=True, top_k=0,
                                                                     top_p=0.9, augment_input_ids=prompt, cache=False)
    if cfg["models"] == "llama" and compile_step:  # the decode step under torch.compile (CUDA graphs on a GPU)
        runs["calmgraph_top_p_compiled"] = lambda: composed.generate(prompt, cfg["new"], do_sample=True, top_k=0,
                                                                     top_p=0.9, augment_input_ids=prompt,
                                                                     compile_step=True)
    out = calm.generate(prompt=prompt, seq_len=total)  # per row: prompt + new tokens (its pad-mask returns both)
    assert [len(row) for row in out] == [total] * cfg["batch"], "CALM generated a different number of tokens"
    started = time.perf_counter()  # the first call also splits the stages and builds the decode graph
    assert composed.generate(prompt, cfg["new"], augment_input_ids=prompt, cache=cache).shape == (cfg["batch"], total)
    sync()
    build_s = time.perf_counter() - started
    times, first = {name: [] for name in runs}, {}
    for name, fn in runs.items():
        started = time.perf_counter()
        fn()  # warm-up (the compiled step compiles here)
        sync()
        first[name] = round(time.perf_counter() - started, 2)
    for _ in range(repeats):  # alternate, so a change in machine load hits every implementation alike
        for name, fn in runs.items():
            started = time.perf_counter()
            with torch.inference_mode():
                fn()
            sync()
            times[name].append(time.perf_counter() - started)
    tokens = cfg["batch"] * cfg["new"]
    from calmgraph.generation.generate import can_cache
    result = {"config": {**cfg, "layer_pairs_1_based": pairs}, "new_tokens_per_run": tokens,
              "calmgraph_kv_cache": can_cache(composed), "first_call_s": round(build_s, 2), "warm_up_s": first}
    for name, ts in times.items():
        result[name] = {"tokens_per_s": round(tokens / statistics.median(ts), 1),
                        "tokens_per_s_best": round(tokens / min(ts), 1),
                        "seconds": [round(t, 3) for t in ts]}
    result["speedup_top_p"] = round(result["calmgraph_top_p"]["tokens_per_s"] / result["calm_pytorch"]["tokens_per_s"], 2)
    result["speedup_top_p_best"] = round(result["calmgraph_top_p"]["tokens_per_s_best"]
                                         / result["calm_pytorch"]["tokens_per_s_best"], 2)
    return result


def versions():
    from importlib.metadata import version
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__, "x-transformers": version("x-transformers"),
            "CALM-Pytorch": version("CALM-Pytorch"), "calmgraph": f"{cg.__version__} ({commit})"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way)")
    parser.add_argument("--compile-step", action="store_true", help="also time generate(compile_step=True) on Llamas")
    parser.add_argument("--models", choices=["x-transformers", "llama"], help="only the configs of these models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    report = {
        "benchmark": "tokens/s of generation: calmgraph composed.generate vs CALM-pytorch CALM.generate "
                     f"({args.device}, fp32)",
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": args.threads,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "results": [],
    }
    for cfg in CONFIGS:
        if args.models and cfg["models"] != args.models:
            continue
        result = bench(cfg, args.repeats, args.device, args.compile_step)
        report["results"].append(result)
        print(f"{cfg}: CALM-pytorch {result['calm_pytorch']['tokens_per_s']} tok/s, calmgraph top-p "
              f"{result['calmgraph_top_p']['tokens_per_s']} tok/s ({result['speedup_top_p']}x), greedy "
              f"{result['calmgraph_greedy']['tokens_per_s']} tok/s", flush=True)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

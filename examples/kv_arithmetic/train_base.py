"""Train the two base models of the key-value experiment, then score them on the held-out expressions.

    python -m examples.kv_arithmetic.train_base --out runs/kv            # one GPU, a few minutes
    python -m examples.kv_arithmetic.train_base --out runs/kv --smoke     # CPU, seconds

m_A (the augment) learns KV-substitution over all keys; m_B (the anchor) learns numeric arithmetic (and
copying numeric expressions, see data.py). Both are the hand-written GPT, trained in full with calmgraph's
FineTuner. Writes `m_A.safetensors`, `m_B.safetensors`, `config.json` (model and data configs) and
`base_eval.json` (exact-match %, the m_A and m_B columns of Table 1) under --out.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_model, save_model

from calmgraph.train import FineTuner, TrainConfig
from examples.handwritten_gpt.gpt import GPT, GPTConfig
from examples.kv_arithmetic.data import PROTOCOLS, VOCAB_SIZE, KVConfig, KVDataset, KVWorld, collate, protocol_config
from examples.kv_arithmetic.evaluate import accuracy_row, format_table

# The augment is the smaller model, as in the paper (PaLM2-XXS augmenting PaLM2-XS).
MODELS = {
    "m_A": GPTConfig(vocab_size=VOCAB_SIZE, n_layer=4, n_head=4, n_embd=128),
    "m_B": GPTConfig(vocab_size=VOCAB_SIZE, n_layer=6, n_head=8, n_embd=256),
}
SMOKE_MODEL = dict(n_head=2, n_embd=32)  # the blocks stay, so every layer pair exists
# What each base model learns (task -> sampling weight), per protocol (data.py).
TASK_MIXES = {
    "direct": {"m_A": {"kv_substitution": 1.0},
               "m_B": {"numeric_arithmetic": 0.75, "numeric_copy": 0.25}},
    "scratchpad": {"m_A": {"kv_substitution": 1.0},
                   "m_B": {"numeric_arithmetic": 0.5, "numeric_reread": 0.25, "numeric_copy": 0.25}},
}


# m_B's broad mix (`anchor_mix="broad"`): numbers (after bindings it does not use, at varied positions),
# copies, and expressions whose names are bound to numbers earlier in the prompt (data.KVWorld.bound).
BROAD_MIX = {"numeric_arithmetic": 0.3, "numeric_copy": 0.15, "bound_arithmetic": 0.35, "bound_copy": 0.2}


def task_mix(cfg: KVConfig, name: str) -> dict[str, float]:
    """TASK_MIXES[protocol][name] (m_B's broad mix where `cfg.anchor_mix` says so), with `cfg.reread_copy` of
    m_B's copy items turned into copy_reread."""
    mix = dict(BROAD_MIX if name == "m_B" and cfg.anchor_mix == "broad" else TASK_MIXES[cfg.protocol][name])
    if cfg.reread_copy and "numeric_copy" in mix:
        mix["copy_reread"] = mix["numeric_copy"] * cfg.reread_copy
        mix["numeric_copy"] *= 1 - cfg.reread_copy
    return mix


def init_weights(model: nn.Module) -> None:
    """nanoGPT's init: N(0, 0.02) weights, zero biases. PyTorch's default N(0, 1) embedding, tied to the
    head, starts the loss near 20 and slows these small models down."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def load_base(out_dir: str | Path, name: str, device="cpu") -> GPT:
    """A trained base model from `out_dir` (for the composition step)."""
    cfg = json.loads((Path(out_dir) / "config.json").read_text())["models"][name]
    model = GPT(GPTConfig(**cfg))
    load_model(model, str(Path(out_dir) / f"{name}.safetensors"), device=str(device))
    return model.to(device)


def train_base(name: str, model_cfg: GPTConfig, world: KVWorld, *, steps: int, batch_size: int, lr: float,
               seed: int = 0, cpu: bool = False, progress: bool = True,
               num_workers: int = 0) -> tuple[GPT, FineTuner, dict]:
    """Train base model `name` from scratch on its task mix for `steps` optimizer steps.

    Returns the trained model (unwrapped, on the training device), its FineTuner and a record of the run.
    """
    torch.manual_seed(seed)
    model = GPT(model_cfg)
    init_weights(model)
    data = KVDataset(world, task_mix(world.cfg, name), "train", size=10**9)  # generated per index: never runs out
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(200, steps // 10),
                      weight_decay=0.1, shuffle=False, seed=seed, cpu=cpu, progress=progress,
                      num_workers=num_workers)
    tuner = FineTuner(model, data, cfg, params=model.parameters(), collate_fn=collate)  # trains in full
    run = train_steps(tuner)
    # Without the autocast wrapper Accelerate put on forward: compiled again or scored in fp32 after this.
    return tuner.accelerator.unwrap_model(tuner.model, keep_fp32_wrapper=False), tuner, run


def train_steps(tuner: FineTuner) -> dict:
    """Train to `config.max_steps`; the run's record: steps, seconds, final loss, the loss at 10 points."""
    started = time.perf_counter()
    hist = tuner.train()
    marks = sorted({max(1, round(k * len(hist) / 10)) for k in range(1, 11)})
    return {"steps": tuner.config.max_steps, "seconds": round(time.perf_counter() - started, 1),
            "final_loss": round(hist[-1]["loss"], 4),
            "loss_at_step": {hist[m - 1]["step"]: round(hist[m - 1]["loss"], 4) for m in marks}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny models and data, a few steps, CPU")
    ap.add_argument("--steps", type=int, default=4000, help="optimizer steps per model")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-keys", type=int, default=KVConfig.n_keys)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=list(MODELS), help="train one of the two")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="scratchpad", help="answer format (data.py)")
    args = ap.parse_args(argv)

    kv = protocol_config(args.protocol, n_keys=args.n_keys, seed=args.seed)
    models = dict(MODELS)
    if args.smoke:
        kv, models = smoke_config(kv, models)
        args.steps, args.batch_size = 4, 8
    world = KVWorld(kv)
    out = Path(args.out)
    models = write_config(out, world, models)

    results, timings = {}, {}
    for name in [args.only] if args.only else list(models):
        model, tuner, run = train_base(name, models[name], world, steps=args.steps, batch_size=args.batch_size,
                                       lr=args.lr, seed=args.seed, cpu=args.smoke, progress=not args.smoke)
        timings[name] = run["seconds"]
        if not tuner.accelerator.is_main_process:
            continue
        save_model(model, str(out / f"{name}.safetensors"))  # handles the tied embedding / head
        results[name] = accuracy_row(model, world, tuner.device)
        print(f"{name}: final loss {run['final_loss']:.4f}, {timings[name]:.0f}s, exact match {results[name]}")

    if results:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
        report = {**results, "scored_on": "final result (after the last ';')", "train_seconds": timings, "device": device, "steps": args.steps,
                  "batch_size": args.batch_size, "data": asdict(kv)}
        (out / "base_eval.json").write_text(json.dumps(report, indent=1))
        print(format_table(results))
    return results


def smoke_config(kv: KVConfig, models: dict[str, GPTConfig]) -> tuple[KVConfig, dict[str, GPTConfig]]:
    """Tiny data and models for a CPU run of a few seconds."""
    return replace(kv, n_keys=20, n_eval=20), {k: replace(v, **SMOKE_MODEL) for k, v in models.items()}


def write_config(out: Path, world: KVWorld, models: dict[str, GPTConfig], write: bool = True) -> dict[str, GPTConfig]:
    """Fit the models' positions to the data and record both configs in `out/config.json` (for load_base)."""
    models = {k: replace(v, block_size=world.max_len) for k, v in models.items()}
    out.mkdir(parents=True, exist_ok=True)
    if write:
        (out / "config.json").write_text(json.dumps(
            {"models": {k: asdict(v) for k, v in models.items()}, "data": asdict(world.cfg)}, indent=1))
    return models


if __name__ == "__main__":
    main()

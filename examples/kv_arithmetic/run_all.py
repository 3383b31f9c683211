"""The whole experiment in one command: both base models, the compositions, the 3x3 table, the JSON.

    python -m examples.kv_arithmetic.run_all --out runs/kv --budget-s 400          # one GPU, ~5 minutes
    python -m examples.kv_arithmetic.run_all --protocol direct --out runs/kv_direct --budget-s 330  # first attempt
    accelerate launch --multi_gpu --num_processes 2 -m examples.kv_arithmetic.run_all --out runs/kv2 \\
        --budget-s 60 --json runs/kv2/kv_arithmetic.json                          # data parallel, short
    python -m examples.kv_arithmetic.run_all --out /tmp/kv --smoke --json /tmp/kv/kv.json   # CPU smoke run
    python -m examples.kv_arithmetic.run_all --base runs/kv --out runs/kv_last --layers last \
        --compositions calm,calm_replay --budget-s 120 --json runs/kv_last/kv.json  # other compositions, same bases

`--budget-s` is the training time of all runs together: BASE_SHARE of it for the base models, the rest
shared equally by the compositions; each run times its first steps and fits its length to its share
(budget.py), up to its step cap. Rows of the table: m_A, m_B, and one per composition (COMPOSE_DATA_OF):
calm is trained on KV-substitution over 20% of keys (the paper's protocol), calm_kv_mix on KV-substitution
and KV-arithmetic over the same 20% (the fallback), the *_replay rows mix in m_B's own tasks. All are
scored by greedy exact match of the final result (after the last `;`) on the same 1000 held-out
expressions; the JSON's `full_answer` scores whole answers. `--protocol` picks the answer format (data.py):
scratchpad (default; one composition, `calm`) or direct (the first attempt; `calm` and `calm_kv_mix`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_model

from examples.handwritten_gpt.gpt import GPTConfig
from examples.kv_arithmetic.compose import (LAYERS, compose, compose_tasks, layer_choice, layers_arg, save_composition,
                                           train_composition)
from examples.kv_arithmetic.data import PROTOCOLS, SEP, KVConfig, KVWorld, protocol_config
from examples.kv_arithmetic.evaluate import (EVAL_TASKS, answers, compose_key_accuracy, format_table, hit,
                                             result_given_scratchpad)
from examples.kv_arithmetic.train_base import MODELS, load_base, smoke_config, train_base, write_config

# Of the budget; the compositions share the rest equally. The scratchpad run trains one composition, so m_B
# (whose skill the composition reuses) gets more.
BASE_SHARE = {"direct": {"m_A": 0.15, "m_B": 0.40}, "scratchpad": {"m_A": 0.15, "m_B": 0.45}}
DEFAULT_COMPOSITIONS = {"direct": "calm,calm_kv_mix", "scratchpad": "calm"}
COMPOSE_DATA_OF = {"calm": "substitution", "calm_kv_mix": "kv_mix", "calm_kv_pad": "kv_pad", "calm_replay": "substitution_replay",
                   "calm_kv_mix_replay": "kv_mix_replay"}
PAPER = {"m_A": {"kv_substitution": 98.1, "numeric_arithmetic": 4.2, "kv_arithmetic": 0.7},
         "m_B": {"kv_substitution": 0.0, "numeric_arithmetic": 73.7, "kv_arithmetic": 0.0},
         "calm": {"kv_substitution": 92.9, "numeric_arithmetic": 72.0, "kv_arithmetic": 84.3}}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="models, new parameters and logs go here")
    ap.add_argument("--json", default="benchmarks/results/kv_arithmetic.json", help="where the table goes")
    ap.add_argument("--smoke", action="store_true", help="tiny models and data, a few steps, CPU")
    ap.add_argument("--budget-s", type=float, default=None, help="training seconds for all runs together")
    ap.add_argument("--base-steps", type=int, default=6000, help="step cap of each base model")
    ap.add_argument("--calm-steps", type=int, default=3000, help="step cap of each composition")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=4, help="data loader processes (0 on the CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--protocol", choices=PROTOCOLS, default="scratchpad",
                    help="answer format (data.py): scratchpad (default) or direct (the first attempt)")
    ap.add_argument("--compositions", help=f"rows to train, of {list(COMPOSE_DATA_OF)} "
                                           f"(default per protocol: {DEFAULT_COMPOSITIONS})")
    ap.add_argument("--layers", default="every1", type=layers_arg, help=f"which blocks are connected: {list(LAYERS)} "
                                                                    "or pairs S:T,... (m_A block S -> m_B block T)")
    ap.add_argument("--positions", choices=["none", "rotary"], default="none",
                    help="cross-attention positions (rotary: RoPE on queries and keys; the paper's have none)")
    ap.add_argument("--window", type=int, help="each anchor token reads m_A's last WINDOW tokens (default: all)")
    ap.add_argument("--base", help="reuse the base models of an earlier --out instead of training them")
    ap.add_argument("--n-keys", type=int, help="number of keys N_KV (values: a permutation of 1..N_KV); "
                                               "default 100 (data.KVConfig)")
    ap.add_argument("--reread-letters", type=float, default=0.0,
                    help="share of m_B's numeric_reread prompts written in letters that are no key (data.py)")
    ap.add_argument("--augment-markers", default=">",
                    help="the markers m_A's substitution prompts end in, at random ('>=': either; data.py)")
    ap.add_argument("--augment-no-eos", action="store_true",
                    help="m_A's loss leaves out the EOS after its values: it never learns where an answer ends")
    ap.add_argument("--close-copy", action="store_true",
                    help="`>` answers (copy, substitution) end with ';' too, as the scratchpad does (data.py)")
    ap.add_argument("--fixed-width", action="store_true",
                    help="write the numbers of an expression with leading zeros to one width (010+022; data.py)")
    ap.add_argument("--compose-no-eos", action="store_true",
                    help="the compositions' loss leaves out the EOS after KV-substitution answers: where they end "
                         "is left to the anchor")
    ap.add_argument("--null-kv", action="store_true",
                    help="cross-attention with a learned null key/value: a head may read nothing (README)")
    ap.add_argument("--reread-copy", type=float, default=0.0,
                    help="share of m_B's copy items given with a prompt it cannot read, the loss on the end only "
                         "(copy_reread, data.py)")
    ap.add_argument("--shares", help="budget shares of the base models, e.g. m_A=0.3,m_B=0.4 (default per "
                                     f"protocol: {BASE_SHARE}); the compositions share the rest")
    args = ap.parse_args(argv)
    started = time.perf_counter()

    keys = {} if args.n_keys is None else {"n_keys": args.n_keys}
    kv, models = protocol_config(args.protocol, seed=args.seed, reread_letters=args.reread_letters,
                                 augment_markers=args.augment_markers, augment_eos=not args.augment_no_eos,
                                 close_copy=args.close_copy, fixed_width=args.fixed_width,
                                 reread_copy=args.reread_copy, **keys), dict(MODELS)
    if args.base:  # the data (protocol included) and models those base models were trained with
        saved = json.loads((Path(args.base) / "config.json").read_text())
        kv, models = KVConfig(**saved["data"]), {k: GPTConfig(**v) for k, v in saved["models"].items()}
    calms = (args.compositions or DEFAULT_COMPOSITIONS[kv.protocol]).split(",")
    if set(calms) - set(COMPOSE_DATA_OF):
        ap.error(f"--compositions: unknown {sorted(set(calms) - set(COMPOSE_DATA_OF))}; known: {list(COMPOSE_DATA_OF)}")
    steps = {"m_A": args.base_steps, "m_B": args.base_steps, **dict.fromkeys(calms, args.calm_steps)}
    if args.smoke:
        if not args.base:
            kv, models = smoke_config(kv, models)
        steps = dict.fromkeys(steps, 4)
        args.batch_size, args.workers = 8, 0
    world = KVWorld(kv)
    out = Path(args.out)
    models = write_config(out, world, models, write=int(os.environ.get("RANK", "0")) == 0)  # before Accelerate starts
    base_share = dict(BASE_SHARE[kv.protocol])
    if args.shares:
        base_share = {k: float(v) for k, v in (item.split("=") for item in args.shares.split(","))}
        if set(base_share) != {"m_A", "m_B"} or sum(base_share.values()) >= 1:
            ap.error("--shares: give m_A=<x>,m_B=<y> with x + y < 1")
    share = {} if args.base else base_share
    share |= dict.fromkeys(calms, (1 - sum(share.values())) / len(calms))
    budget = {k: None if args.budget_s is None else s * args.budget_s for k, s in share.items()}
    common = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed, cpu=args.smoke, progress=False,
                  num_workers=args.workers)

    rows, full, details, runs, base = {}, {}, {}, {}, {}

    def report() -> dict:  # written after every run, so a run cut short still leaves its rows
        acc = tuner.accelerator
        device = torch.cuda.get_device_name() if acc.device.type == "cuda" else "cpu"
        launch = (f"accelerate launch --multi_gpu --num_processes {acc.num_processes} -m" if acc.num_processes > 1
                  else "python -m")
        out = {**rows,
               "scored_on": f"exact match of the final result (after the last '{SEP}'; the whole answer where "
                            "there is none), % of the held-out expressions",
               "full_answer": full, "protocol": kv.protocol,
               "device": f"{acc.num_processes} x {device}" if acc.num_processes > 1 else device,
               "command": f"{launch} examples.kv_arithmetic.run_all " + " ".join(argv),
               "seconds": round(time.perf_counter() - started, 1),
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "processes": acc.num_processes, "batch_size_per_process": args.batch_size, "runs": runs,
               "models": {k: asdict(v) for k, v in models.items()}, "data": asdict(kv),
               "compose_data": {n: compose_tasks(COMPOSE_DATA_OF[n], kv) for n in calms}, "layers": layer_choice(args.layers),
               "positions": args.positions, "window": args.window,
               "null_kv": args.null_kv, "compose_eos_loss": not args.compose_no_eos, "torch": torch.__version__, "paper": PAPER, "details": details}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        return out

    for name in ("m_A", "m_B"):
        if args.base:  # trained earlier: load, score again (cheap), go on
            base[name] = load_base(args.base, name, "cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
            runs[name] = {"loaded_from": args.base}
            rows[name], full[name], details[name] = _score(name, base[name], world,
                                                           next(base[name].parameters()).device, runs[name])
            continue
        print(f"== {name}: {models[name]}", flush=True)
        base[name], tuner, runs[name] = train_base(name, models[name], world, steps=steps[name],
                                                   seconds=budget[name], **common)
        if tuner.accelerator.is_main_process:
            save_model(base[name], str(out / f"{name}.safetensors"))
            rows[name], full[name], details[name] = _score(name, base[name], world, tuner.device, runs[name])
            report()
        tuner.accelerator.wait_for_everyone()
    for name in calms:
        data = COMPOSE_DATA_OF[name]
        print(f"== {name}: composition trained on {data}, layers {args.layers}, positions {args.positions}, window {args.window}", flush=True)
        composed = compose(base["m_A"], base["m_B"], args.layers, args.positions, args.window, args.null_kv)
        composed, tuner, runs[name] = train_composition(composed, world, data, steps=steps[name],
                                                        seconds=budget[name], eos_loss=not args.compose_no_eos, **common)
        if tuner.accelerator.is_main_process:
            print(composed.summary(), flush=True)
            save_composition(composed, out, name)
            runs[name]["kv_substitution_own_keys"] = compose_key_accuracy(composed, world, tuner.device,
                                                                          n=20 if args.smoke else 500)
            rows[name], full[name], details[name] = _score(name, composed, world, tuner.device, runs[name])
            report()
        tuner.accelerator.wait_for_everyone()

    if not tuner.accelerator.is_main_process:
        return {}
    final = report()
    print(format_table(rows))
    print(f"wrote {args.json} ({final['seconds']:.0f} s in all)")
    return final


def _score(name, model, world, device, run) -> tuple[dict[str, float], dict[str, float], dict]:
    """Exact match per data set (final result; whole answer), and what to read the numbers by: a few
    answers; on the key tasks the accuracy by how many of an expression's keys lie outside the composition's
    20% (0 to 3); on scratchpad answers how often the scratchpad is right, the result given that, and the
    result when the right scratchpad is given (teacher-forced)."""
    t0 = time.perf_counter()
    model.eval()
    row, full, detail, compose_keys = {}, {}, {}, set(world.compose_keys)
    for task in EVAL_TASKS:
        scored = answers(model, world, task, device)
        hits = [hit(ref, a) for _, ref, a in scored]
        row[task] = 100.0 * sum(hits) / len(hits)
        full[task] = 100.0 * sum(hit(ref, a, "full") for _, ref, a in scored) / len(scored)
        detail[task] = {"samples": [list(s) for s in scored[:4]]}
        if SEP in scored[0][1]:
            pad_ok = [a.split(SEP)[0] == ref.split(SEP)[0] for _, ref, a in scored]
            detail[task]["pct_scratchpad_right"] = round(100.0 * sum(pad_ok) / len(pad_ok), 1)
            detail[task]["pct_result_right_given_scratchpad_right"] = (
                round(100.0 * sum(h for h, ok in zip(hits, pad_ok) if ok) / sum(pad_ok), 1) if any(pad_ok) else None)
            detail[task]["pct_result_right_given_scratchpad_forced"] = round(
                result_given_scratchpad(model, world, task, device), 1)
        if task.startswith("kv_"):
            groups = defaultdict(list)
            for (keys, _), h in zip(world.eval_exprs, hits):
                groups[sum(k not in compose_keys for k in keys)].append(h)
            detail[task]["pct_by_keys_outside_compose_set"] = {
                n: [round(100.0 * sum(g) / len(g), 1), len(g)] for n, g in sorted(groups.items())}
    run["eval_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {run} exact match {row} (whole answer {full})", flush=True)
    return row, full, detail


if __name__ == "__main__":
    main()

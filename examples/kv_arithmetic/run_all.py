"""The whole experiment in one command: both base models, the compositions, the chain baseline, the JSON.

    python -m examples.kv_arithmetic.run_all --out runs/kv --json runs/kv/kv_arithmetic.json   # one GPU
    python -m examples.kv_arithmetic.run_all --preset same_token --out runs/kv1 --json runs/kv1/kv.json
    python -m examples.kv_arithmetic.run_all --out runs/kv_smoke --smoke --json runs/kv_smoke/kv.json  # CPU
    python -m examples.kv_arithmetic.run_all --base runs/kv --out runs/kv_more --compositions input_deep \
        --json runs/kv_more/kv.json        # other compositions of the same base models

`--preset` names the world, the base models and the compositions (PRESETS; options given win). Every run
has a fixed number of optimizer steps, so a rerun repeats it step for step. Each composition is a named
variant (VARIANTS): its training data, layer pairs and cross-attention. Its table's `protocol` is "paper"
where the composition trains on KV-substitution over the composition's keys and nothing else (the paper's
D_C), otherwise the variant's name; `departures` lists what differs from the paper. With `--select` the
table's composition is the one with the best exact match on expressions over the validation keys (a share
of the composition's keys it does not train on), never on the held-out set. `chain` is the baseline with
no trained parameters: m_A's greedy substitution of the prompt's keys, fed to m_B as a numeric prompt. All
rows are scored by greedy exact match of the final result (after the last `;`, the whole answer where there
is none) on the same 1000 held-out expressions; `full_answer` scores whole answers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_model

from examples.handwritten_gpt.gpt import GPTConfig
from examples.kv_arithmetic.compose import (callable_model, compose, compose_tasks, save_composition,
                                            train_composition)
from examples.kv_arithmetic.data import ANCHOR_MIXES, PROTOCOLS, SEP, KVConfig, KVWorld, protocol_config
from examples.kv_arithmetic.evaluate import (EVAL_TASKS, answers, bound_accuracy, chain_answers, compose_key_accuracy,
                                             format_table, hit, result_given_scratchpad, val_accuracy)
from examples.kv_arithmetic.train_base import MODELS, load_base, smoke_config, train_base, write_config

# Composition variants: training data (compose.COMPOSE_DATA), layer pairs (compose.LAYERS or "S:T,..."),
# cross-attention window and null key, and whether the loss covers the EOS of a substitution answer.
VARIANTS = {
    "paper": dict(data="substitution", layers="every1", window=None, null_kv=False, eos_loss=True),  # steps: --steps
    "paper_same_token": dict(data="substitution", layers="last", window=1, null_kv=False, eos_loss=True),
    "replay_same_token": dict(data="substitution_replay", layers="last", window=1, null_kv=True, eos_loss=False),
    "kv_mix_same_token": dict(data="kv_mix", layers="last", window=1, null_kv=True, eos_loss=True),
    # m_A's middle blocks into m_B's early blocks, full causal attention: at a key's last character m_A may
    # hold the key's value, and m_B (anchor_mix="broad") has a route from a name to a number there.
    "input_mid": dict(data="substitution", layers="2:1,3:2", window=None, null_kv=False, eos_loss=True),
    "input_wide": dict(data="substitution", layers="1:0,2:1,3:2,4:3", window=None, null_kv=False, eos_loss=True),
    "input_deep": dict(data="substitution", layers="3:1,4:2,5:3", window=None, null_kv=False, eos_loss=True),
    # the same, stopped early: trained to a loss near 0 by step ~900, they had overwritten m_B's own `=` task
    "input_mid_short": dict(data="substitution", layers="2:1,3:2", window=None, null_kv=False, eos_loss=True, steps=300),
    "input_wide_short": dict(data="substitution", layers="1:0,2:1,3:2,4:3", window=None, null_kv=False, eos_loss=True,
                             steps=300),
    # the same blocks writing only over the prompt's expression (`writes: masked`, data.expression_writes):
    # they cannot write an answer, only change how m_B reads the keys, so the substitution it learns has to
    # go through m_B's own reading (its copy, and its arithmetic at `=`)
    "input_mid_writes": dict(data="substitution", layers="2:1,3:2", window=None, null_kv=False, eos_loss=True,
                             writes="masked"),
    "input_wide_writes": dict(data="substitution", layers="1:0,2:1,3:2,4:3", window=None, null_kv=False,
                              eos_loss=True, writes="masked"),
}
PAPER = {"m_A": {"kv_substitution": 98.1, "numeric_arithmetic": 4.2, "kv_arithmetic": 0.7},
         "m_B": {"kv_substitution": 0.0, "numeric_arithmetic": 73.7, "kv_arithmetic": 0.0},
         "calm": {"kv_substitution": 92.9, "numeric_arithmetic": 72.0, "kv_arithmetic": 84.3}}
DEFAULT_STEPS = {"m_A": 2400, "m_B": 7800, "calm": 2500}
# Named settings of everything else; options given on the command line win.
PRESETS = {
    # The paper's protocol with a broadly trained anchor: direct answers, m_B (8 x 384) on numbers, copies and
    # names bound to numbers; compositions of m_A's middle blocks into m_B's early blocks, chosen on
    # validation keys.
    "input_side": dict(protocol="direct", ops="+-", n_keys=500, anchor_mix="broad", anchor_operands="2,4",
                       val_key_frac=0.2, select=True, augment_markers=">", fixed_width=False, reread_letters=0.0,
                       reread_copy=0.0, m_a="n_layer=6,n_head=8,n_embd=256", m_b="n_layer=8,n_head=8,n_embd=384",
                       steps="m_A=3000,m_B=16000,calm=1500", batch_size=256, workers=12, seed=0,
                       compositions="input_mid_short,input_wide_short,input_mid,input_wide"),
    # The sixth attempt's world (docs/kv_arithmetic_history.md): scratchpad answers, m_B trained on letter
    # prompts it cannot read; the departures rows of the table.
    "same_token": dict(protocol="scratchpad", n_keys=300, reread_letters=1.0, augment_markers=">=", fixed_width=True,
                       reread_copy=0.5, steps="m_A=2400,m_B=7800,calm=2500", batch_size=1024, workers=6, seed=1,
                       compositions="paper,paper_same_token,replay_same_token,kv_mix_same_token"),
}


def protocol_of(variant: str) -> str:
    return "paper" if VARIANTS[variant]["data"] == "substitution" else variant


def departures(kv: KVConfig, variant: str) -> list[str]:
    """What differs from the paper's Table 1 setup, read off the data config and the variant."""
    v, out = VARIANTS[variant], ["base models of a few layers trained from scratch (paper: PaLM2-XXS and -XS)",
                                 f"{kv.n_keys} keys (paper: 25K)"]
    out.append(f"{kv.min_operands}-{kv.max_operands} operands" if kv.min_operands != kv.max_operands
               else f"{kv.min_operands} operands")
    if set(kv.ops) != set("+-*"):
        out.append(" and ".join(kv.ops) + " only")
    if kv.protocol == "scratchpad":
        out.append("scratchpad answers: values;result (paper: the result alone)")
    if kv.reread_letters:
        out.append(f"m_B trained on rereads whose prompt is letters that are no key ({kv.reread_letters:.0%} of them)")
    if kv.reread_copy:
        out.append("m_B trained on copies with a prompt it cannot read (copy_reread)")
    if kv.fixed_width:
        out.append("numbers written to one width with leading zeros")
    if kv.anchor_mix == "broad":
        out.append("m_B trained on a broad mix: numbers after unused bindings, copies, and names bound to numbers "
                   f"in the prompt ({kv.anchor_operands or (kv.min_operands, kv.max_operands)} operands)")
    if kv.val_key_frac:
        out.append(f"the composition trains on {1 - kv.val_key_frac:.0%} of its 20% of keys; the rest validate")
    if v["data"] != "substitution":
        out.append(f"composition data {compose_tasks(v['data'], kv)} (paper: KV-substitution only)")
    if v["window"] is not None:
        out.append(f"cross-attention reads m_A's last {v['window']} token(s) only (window: {v['window']})")
    if v["null_kv"]:
        out.append("a learned null key/value in the cross-attention")
    if not v["eos_loss"]:
        out.append("no loss on the EOS of substitution answers")
    if v.get("writes") == "masked":
        out.append("the cross-attention writes only over the prompt's expression (writes: masked; the paper's "
                   "writes at every position)")
    return out


def model_arg(text: str) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"a model is n_layer=N,n_head=N,n_embd=N, not {text!r}") from None


def steps_arg(text: str) -> dict[str, int]:
    try:
        got = {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps takes m_A=N,m_B=N,calm=N, not {text!r}") from None
    if set(got) - set(DEFAULT_STEPS):
        raise argparse.ArgumentTypeError(f"--steps: unknown {sorted(set(got) - set(DEFAULT_STEPS))}; "
                                         f"known: {list(DEFAULT_STEPS)}")
    return {**DEFAULT_STEPS, **got}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="input_side",
                    help="named defaults of the options below (PRESETS); an option given here wins")
    ap.add_argument("--out", required=True, help="models, new parameters and config go here")
    ap.add_argument("--json", required=True, help="where the tables go")
    ap.add_argument("--smoke", action="store_true", help="tiny models and data, a few steps, CPU")
    ap.add_argument("--steps", type=steps_arg, default=dict(DEFAULT_STEPS),
                    help=f"optimizer steps per run, e.g. m_A=2400,m_B=7800,calm=2500 (default {DEFAULT_STEPS}; "
                         "calm: each composition)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=6, help="data loader processes (0 on the CPU)")
    ap.add_argument("--seed", type=int, default=1, help="the world: keys, values, splits, held-out expressions")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="scratchpad", help="answer format (data.py)")
    ap.add_argument("--compositions", default="paper,paper_same_token,replay_same_token",
                    help=f"variants to train, of {list(VARIANTS)}")
    ap.add_argument("--base", help="reuse the base models of an earlier --out instead of training them")
    ap.add_argument("--n-keys", type=int, default=300, help="number of keys N_KV (values: a permutation of 1..N_KV)")
    ap.add_argument("--reread-letters", type=float, default=1.0,
                    help="share of m_B's numeric_reread prompts written in letters that are no key (data.py)")
    ap.add_argument("--augment-markers", default=">=",
                    help="the markers m_A's substitution prompts end in, at random ('>=': either; data.py)")
    ap.add_argument("--fixed-width", action=argparse.BooleanOptionalAction, default=True,
                    help="write the numbers of an expression with leading zeros to one width (010+022; data.py)")
    ap.add_argument("--reread-copy", type=float, default=0.5,
                    help="share of m_B's copy items given with a prompt it cannot read (copy_reread, data.py)")
    ap.add_argument("--ops", help="operators of every expression (default per --protocol: data.PROTOCOL_DEFAULTS)")
    ap.add_argument("--anchor-mix", choices=ANCHOR_MIXES, default="narrow", help="m_B's tasks (train_base.py)")
    ap.add_argument("--anchor-operands", help="MIN,MAX operands of m_B's own expressions (default: the eval's)")
    ap.add_argument("--val-key-frac", type=float, default=0.0,
                    help="share of the composition's keys kept to validate it; with --select, the composition "
                         "with the best KV-arithmetic there is the table's")
    ap.add_argument("--select", action=argparse.BooleanOptionalAction, default=False,
                    help="choose one of --compositions on the validation keys")
    ap.add_argument("--m-a", type=model_arg, help="m_A's size, e.g. n_layer=6,n_head=8,n_embd=256")
    ap.add_argument("--m-b", type=model_arg, help="m_B's size, e.g. n_layer=8,n_head=8,n_embd=384")
    preset, _ = ap.parse_known_args(argv)
    defaults = dict(PRESETS[preset.preset])
    for key, parse in (("steps", steps_arg), ("m_a", model_arg), ("m_b", model_arg)):
        if key in defaults:
            defaults[key] = parse(defaults[key])
    ap.set_defaults(**defaults)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if args.select and not args.val_key_frac:
        ap.error("--select chooses on validation keys: give --val-key-frac")

    extra = {"ops": args.ops} if args.ops else {}
    if args.anchor_operands:
        extra["anchor_operands"] = tuple(int(n) for n in args.anchor_operands.split(","))
    kv, models = protocol_config(args.protocol, seed=args.seed, n_keys=args.n_keys, reread_letters=args.reread_letters,
                                 augment_markers=args.augment_markers, fixed_width=args.fixed_width,
                                 reread_copy=args.reread_copy, anchor_mix=args.anchor_mix,
                                 val_key_frac=args.val_key_frac, **extra), dict(MODELS)
    for name, size in (("m_A", args.m_a), ("m_B", args.m_b)):
        if size:
            models[name] = replace(models[name], **size)
    if args.base:  # the data and models those base models were trained with
        saved = json.loads((Path(args.base) / "config.json").read_text())
        saved["data"]["anchor_operands"] = saved["data"].get("anchor_operands") and tuple(saved["data"]["anchor_operands"])
        kv, models = KVConfig(**saved["data"]), {k: GPTConfig(**v) for k, v in saved["models"].items()}
    calms = args.compositions.split(",")
    if set(calms) - set(VARIANTS):
        ap.error(f"--compositions: unknown {sorted(set(calms) - set(VARIANTS))}; known: {list(VARIANTS)}")
    steps = {"m_A": args.steps["m_A"], "m_B": args.steps["m_B"],
             **{n: VARIANTS[n].get("steps", args.steps["calm"]) for n in calms}}
    if args.smoke:
        if not args.base:
            kv, models = smoke_config(kv, models)
        steps = dict.fromkeys(steps, 4)
        args.batch_size, args.workers = 8, 0
    world = KVWorld(kv)
    out = Path(args.out)
    models = write_config(out, world, models, write=int(os.environ.get("RANK", "0")) == 0)
    common = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed, cpu=args.smoke, progress=False,
                  num_workers=args.workers)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"

    rows, full, details, runs, base, val = {}, {}, {}, {}, {}, {}

    def chosen() -> str | None:  # the best KV-arithmetic on the validation keys so far (then KV-substitution)
        return max(val, key=lambda n: (val[n]["kv_arithmetic"], val[n]["kv_substitution"])) if val else None

    def report() -> dict:  # written after every run, so a run cut short still leaves its rows
        tables = [{"protocol": protocol_of(n), "composition": n, "m_A": rows["m_A"], "m_B": rows["m_B"],
                   "calm": rows[n], "variant": VARIANTS[n], "departures": departures(kv, n),
                   **({"validation": val[n], "selected": n == chosen()} if n in val else {})}
                  for n in calms if n in rows]
        paper = next((t for t in tables if t["protocol"] == "paper" and t.get("selected", True)), None)
        out = {**({"m_A": paper["m_A"], "m_B": paper["m_B"], "calm": paper["calm"], "protocol": "paper"}
                  if paper else {}),
               "chain_baseline": {"kv_arithmetic": rows["chain"]["kv_arithmetic"]} if "chain" in rows else None,
               "tables": tables,
               "scored_on": f"exact match of the final result (after the last '{SEP}'; the whole answer where "
                            "there is none), % of the held-out expressions",
               "full_answer": full, "answer_format": kv.protocol,
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "command": "python -m examples.kv_arithmetic.run_all " + " ".join(argv),
               "seconds": round(time.perf_counter() - started, 1),
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               "batch_size": args.batch_size, "lr": args.lr, "runs": runs,
               "models": {k: asdict(v) for k, v in models.items()}, "data": asdict(kv),
               "torch": torch.__version__, "versions": _versions(), "paper": PAPER, "details": details}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(dump_json(out) + "\n")
        return out

    for name in ("m_A", "m_B"):
        if args.base:  # trained earlier: load, score again (cheap), go on
            base[name] = load_base(args.base, name, device)
            runs[name] = {"loaded_from": args.base}
        else:
            print(f"== {name}: {models[name]}, {steps[name]} steps", flush=True)
            base[name], _, runs[name] = train_base(name, models[name], world, steps=steps[name], **common)
            save_model(base[name], str(out / f"{name}.safetensors"))
        rows[name], full[name], details[name] = _score(name, base[name], world, device, runs[name])
    rows["chain"], full["chain"], details["chain"] = _score_chain(base["m_A"], base["m_B"], world, device)
    report()
    for name in calms:
        v = VARIANTS[name]
        print(f"== {name}: {v}, {steps[name]} steps", flush=True)
        composed = compose(base["m_A"], base["m_B"], v["layers"], "none", v["window"], v["null_kv"],
                           v.get("writes", "all"))
        composed, _, runs[name] = train_composition(composed, world, v["data"], steps=steps[name],
                                                    eos_loss=v["eos_loss"], **common)
        save_composition(composed, out, name)
        scored = callable_model(composed)
        runs[name]["kv_substitution_own_keys"] = compose_key_accuracy(scored, world, device,
                                                                      n=20 if args.smoke else 500)
        if args.select:
            val[name] = val_accuracy(scored, world, device, n=20 if args.smoke else 500)
            print(f"{name}: validation keys {val[name]}", flush=True)
        rows[name], full[name], details[name] = _score(name, scored, world, device, runs[name])
        report()

    final = report()
    print(format_table({k: rows[k] for k in ("m_A", "m_B", *calms)}))
    print(f"chain (m_A -> m_B, no training): {rows['chain']['kv_arithmetic']:.1f}% on kv_arithmetic")
    if val:
        print(f"chosen on the validation keys: {chosen()} ({val})")
    print(f"wrote {args.json} ({final['seconds']:.0f} s in all)")
    return final


def _versions() -> dict[str, str]:
    import accelerate
    import pydantic
    return {"torch": torch.__version__, "accelerate": accelerate.__version__, "pydantic": pydantic.VERSION,
            "python": sys.version.split()[0]}


def dump_json(obj, depth: int = 3, indent: int = 0) -> str:
    """JSON with the first `depth` levels one entry a line and deeper values on one line: short to read
    and to keep in the tree."""
    pad = " " * (indent + 1)
    if depth and isinstance(obj, dict) and obj:
        items = (f"{pad}{json.dumps(k)}: {dump_json(v, depth - 1, indent + 1)}" for k, v in obj.items())
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if depth and isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(pad + dump_json(v, depth - 1, indent + 1) for v in obj) + "\n" + " " * indent + "]"
    return json.dumps(obj)


def _score_chain(m_A, m_B, world, device) -> tuple[dict, dict, dict]:
    """The chain baseline on KV-arithmetic (it has no other row): final result and whole answer."""
    scored = chain_answers(m_A, m_B, world, device)
    pct = lambda part: 100.0 * sum(hit(ref, a, part) for _, ref, a in scored) / len(scored)
    return ({"kv_arithmetic": pct("final")}, {"kv_arithmetic": pct("full")},
            {"kv_arithmetic": {"samples": [list(s) for s in scored[:4]]}})


def _score(name, model, world, device, run) -> tuple[dict[str, float], dict[str, float], dict]:
    """Exact match per data set (final result; whole answer), and what to read the numbers by: with m_B's
    broad mix, m_B's (or the composition's) score on expressions of names bound in the prompt; a few
    answers; on the key tasks the accuracy by how many of an expression's keys lie outside the composition's
    20% (0 to 3); on scratchpad answers how often the scratchpad is right, the result given that, and the
    result when the right scratchpad is given (teacher-forced)."""
    t0 = time.perf_counter()
    model.eval()
    row, full, detail, compose_keys = {}, {}, {}, set(world.compose_keys)
    if world.cfg.anchor_mix == "broad" and name != "m_A":  # m_B's route from a name to a number, kept or not
        detail["bound_arithmetic"] = round(bound_accuracy(model, world, device), 1)
    for task in EVAL_TASKS:
        scored = answers(model, world, task, device)
        hits = [hit(ref, a) for _, ref, a in scored]
        row[task] = 100.0 * sum(hits) / len(hits)
        full[task] = 100.0 * sum(hit(ref, a, "full") for _, ref, a in scored) / len(scored)
        detail[task] = {"samples": [list(s) for s in scored[:4]]}
        if SEP in scored[0][1]:
            pad_ok = [a.split(SEP)[0] == ref.split(SEP)[0] for _, ref, a in scored]
            detail[task]["pct_scratchpad_right"] = round(100.0 * sum(pad_ok) / len(pad_ok), 1)
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

"""Gather one sweep's JSONs (compositions_sweep.sh) into the table of benchmarks/results/kv_arithmetic.json.

    python -m examples.kv_arithmetic.table --sweep benchmarks/results/near_sweep --first near \
        --rows calm=near,calm_replay=near_replay --command "bash examples/kv_arithmetic/compositions_sweep.sh ..." \
        --out benchmarks/results/kv_arithmetic.json

m_A and m_B come from the first pipeline's JSON (`--first`, the one that trained them); each `ROW=TAG` takes the
composition row of TAG.json. Every number is copied from those files, with their paths under `sources`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from examples.kv_arithmetic.evaluate import format_table


def gather(sweep: Path, first: str, rows: dict[str, str], command: str) -> dict:
    runs = {tag: json.loads((sweep / f"{tag}.json").read_text()) for tag in {first, *rows.values()}}
    base = runs[first]
    out = {name: base[name] for name in ("m_A", "m_B")}
    details = {name: base["details"][name] for name in ("m_A", "m_B")}
    train = {name: base["runs"][name] for name in ("m_A", "m_B")}
    options, full = {}, {name: base["full_answer"][name] for name in ("m_A", "m_B")}
    for name, tag in rows.items():
        run = runs[tag]
        row = next(r for r in run["compose_data"])  # each sweep job trains one composition
        out[name], details[name], train[name], full[name] = (run[row], run["details"][row], run["runs"][row],
                                                             run["full_answer"][row])
        options[name] = {"trained_on": run["compose_data"][row], "layers": run["layers"],
                          "positions": run.get("positions", "none"), "window": run.get("window"), "null_kv": run.get("null_kv", False),
                         "eos_loss": run.get("compose_eos_loss", True), "job": tag}
    return {**out, "scored_on": base["scored_on"], "protocol": base["protocol"], "compositions": options,
            "device": base["device"], "command": command, "seconds": base["seconds"], "date": base["date"],
            "data": base["data"], "models": base["models"], "torch": base["torch"], "paper": base["paper"],
            "full_answer": full, "runs": train, "details": details,
            "sources": [str(sweep / f"{tag}.json") for tag in dict.fromkeys([first, *rows.values()])]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", required=True, help="the sweep's OUTDIR")
    ap.add_argument("--first", required=True, help="tag of the pipeline that trained the base models")
    ap.add_argument("--rows", required=True, help="ROW=TAG,...: table rows and the sweep jobs they come from")
    ap.add_argument("--command", required=True, help="the command that ran the sweep")
    ap.add_argument("--out", default="benchmarks/results/kv_arithmetic.json")
    ap.add_argument("--device", help="the machine, where the first JSON's (one process's) says too little")
    args = ap.parse_args(argv)
    rows = dict(item.split("=", 1) for item in args.rows.split(","))
    table = gather(Path(args.sweep), args.first, rows, args.command)
    if args.device:
        table["device"] = args.device
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    print(format_table({k: table[k] for k in ("m_A", "m_B", *rows)}))
    return table


if __name__ == "__main__":
    main()

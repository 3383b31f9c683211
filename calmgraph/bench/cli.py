"""`calmgraph bench SPEC`: its options, its settings printout and its report."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = ("Time the fused graph beside the sum of its parts, an eager hook composition, CALM-pytorch and "
               "torch.compile, in one process on the same weights and inputs (medians of round-robin calls).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `calmgraph bench` (argparse only: nothing heavy is imported here)."""
    p.add_argument("spec", help="composition spec (.yaml, .yml or .json)")
    p.add_argument("--models", metavar="MODULE:FUNCTION",
                   help="a function returning {name: nn.Module} for the spec's models (default: build them from "
                        "the spec's sources)")
    p.add_argument("--device", type=_device, default=None,
                   help="where the models run: cpu, cuda, cuda:1, ... (default: cuda when a GPU is available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="autocast to this dtype, weights as they are (default: bfloat16 on GPU, none on CPU)")
    p.add_argument("--batch", type=_positive, default=4, metavar="N", help="sequences per batch (default: 4)")
    p.add_argument("--seq", type=_positive, default=128, metavar="N",
                   help="tokens per sequence of the anchor's input (default: 128)")
    p.add_argument("--prompt-len", type=_positive, default=None, metavar="N",
                   help="tokens per sequence of each prompt augment's input (default: --seq)")
    p.add_argument("--quick", action="store_true", help="no warm-up, 3 rounds: checks that it runs, not speed")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile (its first call takes minutes on a CPU)")
    p.add_argument("--json", metavar="FILE", type=_writable,
                   help="also write the whole result here (times, memory, notes, machine, versions, command)")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    p.add_argument("--trust-code", action="store_true", help="let the spec's `python:` sources run their code")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _writable(text: str) -> str:
    """Checked before the run: a result lost at the end of a long run to a missing folder is minutes lost."""
    folder = Path(text).parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {str(folder)!r} to write {text!r} into")
    return text


def _device(text: str) -> str:
    import torch
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available here; use --device cpu")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="calmgraph bench", description=DESCRIPTION)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Settings on stdout first, progress on stderr while it runs, then the report on stdout."""
    import torch
    import torch.nn as nn

    from ..errors import InputError
    from ._internals import compile_composition, load_spec
    from .progress import Console
    from .report import environment
    from .timing import QUICK, Budget
    from .variants import NAMES, bench_composition
    progress = Console()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else None)
    budget = QUICK if args.quick else Budget()
    variants = tuple(n for n in NAMES if not (args.no_compile and n == "compiled"))
    spec = load_spec(args.spec)
    print(settings(args, spec, device, dtype, budget, variants), flush=True)
    with progress.step(f"building {len(spec.models)} models"):
        models = _load_models(args.spec, args.models, args.trust_code)
        models = {n: m.to(device).eval() for n, m in models.items()}  # weights as given, compute under autocast
    with progress.step("compiling the composition"):
        composed = compile_composition(spec, models=models)
    check_lengths(composed, args)
    torch.manual_seed(0)  # the zero-initialised output projections would make every delta 0: randomise them
    for p in composed.new_parameters():
        nn.init.normal_(p, std=0.02)
    try:
        result = bench_composition(composed, models, batch=args.batch, seq=args.seq, prompt_len=args.prompt_len,
                                   budget=budget, variants=variants, progress=progress,
                                   autocast=getattr(torch, dtype) if dtype and dtype != "float32" else None)
    except torch.OutOfMemoryError as e:  # the sizes asked for, not a bug: say which to lower
        raise InputError(f"out of memory at --batch {args.batch} --seq {args.seq}; choose smaller ones") from e
    result = {**environment(["calmgraph", "bench", *sys.argv[2:]] if sys.argv[1:2] == ["bench"] else None),
              "spec": spec.to_dict(), "device": device, "dtype": dtype or "as given", **result}
    print(report(result))
    if args.json:
        from ..files import write_text
        write_text(args.json, json.dumps(result, indent=2, default=str), overwrite=args.overwrite, flag="--overwrite")
        print(f"wrote {args.json}")
    return 0


def check_lengths(composed, args: argparse.Namespace) -> None:
    """--seq and --prompt-len within the positions of the models reading them, before anything runs."""
    from ..errors import InputError
    for i in composed.signature.inputs:
        if i.kind != "ids" or i.positions is None:
            continue
        flag, length = ("--seq", args.seq) if i.owner is None else ("--prompt-len", args.prompt_len or args.seq)
        if length > i.positions:
            raise InputError(f"{flag} {length} is longer than the {i.positions} positions of the models reading "
                             f"{i.name}; use {flag} {i.positions} or less")


def settings(args: argparse.Namespace, spec, device: str, dtype: str | None, budget, variants: tuple[str, ...]) -> str:
    """What is about to be measured, printed before anything slow starts."""
    import torch
    n = torch.get_num_threads()
    threads = f" ({n} thread{'s' * (n != 1)})" if device == "cpu" else ""
    train = "train" in variants
    shown = ["fused", *(v for v in variants if v != "train")]
    rows = [("spec", f"{args.spec}: anchor {spec.anchor.name}, augments {', '.join(a.name for a in spec.augments)}"),
            ("device", f"{device}{threads}"),
            ("dtype", f"{dtype} autocast, weights as given" if dtype and dtype != "float32" else "weights as given, no autocast"),
            ("batch", str(args.batch)),
            ("seq", f"{args.seq} (prompts: {args.prompt_len or args.seq})"),
            ("budget", budget.describe() + (" (--quick)" if args.quick else "")),
            ("variants", ", ".join(shown) + ("; compiled off (--no-compile)" if args.no_compile else "")),
            ("steps", "forward and training step" if train else "forward")]
    return "calmgraph bench\n" + "\n".join(f"  {k:<9} {v}" for k, v in rows)


def report(result: dict) -> str:
    """The table, the ratios, and every variant that did not run, with why."""
    from .report import table
    from .variants import VARIANTS
    lines = [table(result), ""]
    lines += [f"{k}: {v:.3f}" for k, v in result["ratios"].items() if v is not None]
    lines.append(f"compile (trace + splice): {result['compile_seconds']:.2f} s")
    notes = result["notes"]
    lines += [f"skipped {v.name}: {notes[v.name]}" for v in VARIANTS if v.name in notes]
    lines += [f"failed {k[:-len('_error')]}: {v}" for k, v in notes.items() if k.endswith("_error")]
    return "\n".join(lines)


def _load_models(spec_path: str, factory: str | None, trust_code: bool = False) -> dict:
    from ._internals import ModelError, load_models, load_spec
    if not factory:  # specs whose models name their `source:`; `python:` ones run only with --trust-code
        from ..errors import SpecError
        from ..sources import untrusted_sources
        problems = [] if trust_code else untrusted_sources(load_spec(spec_path), flag="--trust-code")
        if problems:
            raise SpecError(problems, header="the spec runs code from its sources")
        return load_models(spec_path, trust_code=trust_code)
    import importlib
    module, _, attr = factory.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)()
    except (ImportError, AttributeError) as e:
        raise ModelError(f"--models {factory!r}: {e}; expected 'package.module:function' returning "
                         "{name: nn.Module} for the spec's models") from None

"""The `calmgraph` command line: a thin layer over the library.

    calmgraph validate SPEC.yaml                  every problem at once, with its location (exit 1 if any)
    calmgraph inspect SPEC.yaml [--draw FILE] [--mermaid]
    calmgraph compile SPEC.yaml --out DIR         composed.pt2, composed.py, spec.json, picture, summary
    calmgraph demo [--out DIR]
    calmgraph bench SPEC.yaml [--device cuda] [--quick] [--json FILE]

A spec's `python:` sources run only with --trust-code (calmgraph's own factories need none); an existing
file is replaced only with --overwrite.

Exit codes: 0 success, 1 a problem with the input (spec, models, checkpoint), 2 bad command-line usage,
3 an internal error (a calmgraph bug: please report it with --verbose output). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .errors import CalmGraphError, InternalError, Problem, SpecError

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
TRUST_FLAG, OVERWRITE_FLAG = "--trust-code", "--overwrite"


_open_line = [False]  # a progress line on stderr still waits for its " done"


def _end_open_line() -> None:
    if _open_line[0]:
        print(file=sys.stderr, flush=True)
        _open_line[0] = False


@contextlib.contextmanager
def progress(message: str):
    """`message ... done (1.2 s)` on stderr, for the steps that take seconds; log lines printed meanwhile
    go below it, and the step's end then gets a line of its own."""
    _end_open_line()
    print(f"calmgraph: {message} ...", end="", file=sys.stderr, flush=True)
    _open_line[0] = True
    started = time.perf_counter()

    def end(word: str) -> None:
        print(f" {word}" if _open_line[0] else f"calmgraph: {message}: {word}", file=sys.stderr, flush=True)
        _open_line[0] = False

    try:
        yield
    except BaseException:
        end("failed")
        raise
    end(f"done ({time.perf_counter() - started:.1f} s)")


class _LogLines(logging.StreamHandler):
    """calmgraph's log records (INFO: a line per traced model) on stderr, below an open progress line."""

    def emit(self, record: logging.LogRecord) -> None:
        _end_open_line()
        super().emit(record)


# Warnings that say nothing about the user's models or spec: torch's own deprecations, raised by torch
# code that fx and export run on the user's behalf. Every other warning is shown.
KNOWN_NOISE = (
    r"'has_(cuda|cudnn|mps|mkldnn)' is deprecated",
)


@contextlib.contextmanager
def _shown_logs_and_warnings(verbose: bool):
    logger = logging.getLogger("calmgraph")
    handler = _LogLines(sys.stderr)
    handler.setFormatter(logging.Formatter("calmgraph:   %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    with warnings.catch_warnings():
        for pattern in KNOWN_NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)


def _models(spec, spec_path: Path, *, meta: bool, trust_code: bool):
    """The spec's models from their sources; on the meta device (no weights) when only structure is needed."""
    import torch

    from .sources import load_models, untrusted_sources
    if not trust_code and untrusted_sources(spec):  # refused before anything is imported
        raise SpecError(untrusted_sources(spec, flag=TRUST_FLAG), header="the spec runs code from its sources")
    with progress(f"building {len(spec.models)} models from their sources" + (" (meta device, no weights)" if meta else "")):
        with torch.device("meta") if meta else contextlib.nullcontext():
            return load_models(spec, base_dir=spec_path.parent, trust_code=trust_code)


def _compile(spec_path: Path, *, meta: bool, trust_code: bool, prune: bool = True):
    from .compiler import compile
    from .spec import load_spec
    spec = load_spec(spec_path)
    models = _models(spec, spec_path, meta=meta, trust_code=trust_code)
    with progress("compiling"):
        return compile(spec, models=models, prune=prune)


# -- commands ------------------------------------------------------------------------------------------
def _validate(args) -> int:
    from .validate import check
    problems, spec, n_pairs = check(args.spec, models=not args.no_models, progress=progress,
                                    trust_code=args.trust_code, flag=TRUST_FLAG)
    if problems:
        return _print_problems(args.spec, problems)
    if n_pairs is None:
        reason = "--no-models" if args.no_models else "not every model has a `source:`"
        print(f"{args.spec}: valid spec ({len(spec.models)} models, {len(spec.edges)} edges); "
              f"layer references not checked against the models ({reason})")
        return EXIT_OK
    print(f"{args.spec}: valid ({len(spec.models)} models, {len(spec.edges)} edge{'s' * (len(spec.edges) != 1)}, "
          f"{n_pairs} layer pairs)")
    return EXIT_OK


def _print_problems(spec_path, problems: list[Problem]) -> int:
    print(f"{spec_path}: {len(problems)} problem{'s' * (len(problems) != 1)}")
    for p in problems:
        print(f"  {p}")
    return EXIT_INPUT


def _inspect(args) -> int:
    from .files import check_targets
    from .inspect import draw, mermaid, report
    if args.draw:  # refused before the models are built
        check_targets([args.draw], overwrite=args.overwrite, flag=OVERWRITE_FLAG)
    composed = _compile(Path(args.spec), meta=True, trust_code=args.trust_code)
    print(report(composed))
    if args.mermaid:
        print()
        print(mermaid(composed))
    if args.draw:
        from .files import write_with
        with progress(f"drawing {args.draw}"):
            write_with(args.draw, lambda tmp: draw(composed, tmp), overwrite=args.overwrite, flag=OVERWRITE_FLAG)
    return EXIT_OK


def _compile_cmd(args) -> int:
    from .checkpoint import load_new
    from .export import bundle_files, require_onnx, write_bundle
    from .files import check_targets
    if args.format == "onnx":
        require_onnx()  # before the long compile, not after it
    check_targets(bundle_files(args.out, args.format), overwrite=args.overwrite, flag=OVERWRITE_FLAG)  # before compiling
    composed = _compile(Path(args.spec), meta=False, trust_code=args.trust_code, prune=not args.no_prune)
    if args.new_params:
        with progress(f"loading new parameters from {args.new_params}"):
            load_new(composed, args.new_params)
    written = write_bundle(composed, args.out, args.format, progress, overwrite=args.overwrite, flag=OVERWRITE_FLAG)
    print(composed.summary())
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return EXIT_OK


def _demo(args) -> int:
    from .demo.run import run_demo
    from .export import bundle_files
    from .files import check_targets
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="calmgraph-demo-"))
    check_targets(bundle_files(out), overwrite=args.overwrite, flag=OVERWRITE_FLAG)  # before the demo runs
    same = run_demo(seed=args.seed, print_code=args.code, out=out, progress=progress, overwrite=args.overwrite)
    return EXIT_OK if same else EXIT_INPUT


def _bench(args) -> int:
    from .bench.cli import run  # the harness loads only for this command
    return run(args)


# -- parser --------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="on an error, show the full details and traceback")
    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trust-code", action="store_true",
                       help="let the spec's `python:` sources import and run their code (only for a spec you "
                            "trust; calmgraph's own factories need no consent)")
    replace = argparse.ArgumentParser(add_help=False)
    replace.add_argument("--overwrite", action="store_true",
                         help="replace files that already exist (by default an existing file is never replaced)")
    p = argparse.ArgumentParser(prog="calmgraph", parents=[common],
                                description="Compose language models CALM-style into one torch.fx graph.",
                                epilog="Exit codes: 0 ok, 1 problem with the input, 2 usage, 3 internal error.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser("validate", parents=[common, trust], help="check a spec file and report every problem in it",
                              description="Check a spec: its shape and composition graph, then (when every model has "
                                          "a source) its layer references against the models' structure. Every problem "
                                          "is listed with its location. Exit 1 if there is any.")
    validate.add_argument("spec", help="spec file (.yaml, .yml or .json)")
    validate.add_argument("--no-models", action="store_true", help="check the file only, without building the models")
    validate.set_defaults(run=_validate)

    inspect = sub.add_parser("inspect", parents=[common, trust, replace], help="list each model's blocks and the layer pairs of every edge",
                             description="Compile a spec on the meta device (no weights) and list each model's blocks "
                                         "(index, qualified name, hidden size) and the resolved layer pairs of every edge.")
    inspect.add_argument("spec", help="spec file (.yaml, .yml or .json)")
    inspect.add_argument("--draw", metavar="FILE", help="also draw the composition to FILE (.svg, .png or .pdf)")
    inspect.add_argument("--mermaid", action="store_true", help="also print a Mermaid block for Markdown")
    inspect.set_defaults(run=_inspect)

    comp = sub.add_parser("compile", parents=[common, trust, replace], help="compile a spec and export the fused model",
                          description="Build the models from their sources, compile, and write into DIR: composed.pt2 "
                                      "(or .onnx), composed.py (the fused graph's code), spec.json, composition.png/.svg "
                                      "and summary.txt.")
    comp.add_argument("spec", help="spec file (.yaml, .yml or .json)")
    comp.add_argument("--out", required=True, metavar="DIR", help="folder to write into (created if needed)")
    comp.add_argument("--format", choices=["pt2", "onnx"], default="pt2", help="artifact format (default: pt2)")
    comp.add_argument("--new-params", metavar="CKPT", help="load trained new parameters (from composed.save_new) first")
    comp.add_argument("--no-prune", action="store_true", help="keep augment blocks and heads no edge reads")
    comp.set_defaults(run=_compile_cmd)

    demo = sub.add_parser("demo", parents=[common, replace], help="compile the bundled demo composition and check it against its anchor",
                          description="Compile the bundled demo (an anchor LM, a second LM over the same tokens, an "
                                      "encoder over a prompt), check it computes exactly the anchor at initialisation, "
                                      "and write the compile artifacts.")
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo models' random weights")
    demo.add_argument("--code", action="store_true", help="also print the fused graph's Python code")
    demo.add_argument("--out", metavar="DIR", help="folder for the artifacts (default: a new temporary folder)")
    demo.set_defaults(run=_demo)
    from .bench.cli import DESCRIPTION, add_arguments  # argparse only; the harness loads when it runs
    bench = sub.add_parser("bench", parents=[common], help="time the fused graph beside its parts, an eager hook "
                           "composition, CALM-pytorch and torch.compile", description=DESCRIPTION)
    add_arguments(bench)
    bench.set_defaults(run=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    try:
        with _shown_logs_and_warnings(verbose):
            return args.run(args)
    except InternalError as e:  # calmgraph's own bug, raised on purpose: not the user's input
        if verbose:
            raise
        print(f"calmgraph: internal error: {str(e).splitlines()[0]}\n"
              "(this is a calmgraph bug; run with --verbose for the traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL
    except CalmGraphError as e:
        if verbose:
            raise
        lines = str(e).splitlines()
        listed = isinstance(e, SpecError) or type(e).__name__ == "CheckpointError"  # the list is the message
        shown = lines if listed else lines[:1]
        print(f"calmgraph: error: {shown[0]}", file=sys.stderr)
        for line in shown[1:]:
            print(line, file=sys.stderr)
        if len(lines) > len(shown):
            print("(run with --verbose for the details)", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("calmgraph: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, and the traceback only on request
        if verbose:
            raise
        print(f"calmgraph: internal error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}\n"
              "(this is a calmgraph bug; run with --verbose for the traceback and report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

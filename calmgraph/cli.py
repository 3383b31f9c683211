"""The `calmgraph` command line."""
from __future__ import annotations

import argparse
import sys
import warnings

from .errors import CalmGraphError


def _demo(args) -> int:
    from .demo.run import run_demo
    return 0 if run_demo(seed=args.seed, print_code=args.code) else 1


def _bench(args) -> int:
    from .bench import main as bench_main  # its own parser: `calmgraph bench --help`
    return bench_main(args.args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calmgraph", description="Compose language models into one torch.fx graph.")
    p.add_argument("--verbose", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile the bundled demo composition and check it against its anchor")
    demo.add_argument("--seed", type=int, default=0, help="seed of the demo models' random weights")
    demo.add_argument("--code", action="store_true", help="also print the fused graph's Python code")
    demo.set_defaults(run=_demo)
    bench = sub.add_parser("bench", add_help=False, prefix_chars="+", help="time the fused graph beside its parts, an eager hook "
                           "composition, CALM-pytorch and torch.compile (calmgraph bench --help)")
    bench.add_argument("args", nargs="*")  # every option too (prefix_chars): bench.main parses them
    bench.set_defaults(run=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    warnings.filterwarnings("ignore", module="torch")
    try:
        return args.run(args)
    except CalmGraphError as e:
        if args.verbose:
            raise
        print(f"calmgraph: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

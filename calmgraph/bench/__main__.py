"""`python -m calmgraph.bench SPEC ...`: the same as `calmgraph bench SPEC ...`."""
import sys

from .cli import main

sys.exit(main())

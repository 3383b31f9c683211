"""`python -m calmgraph ...`: the same as the `calmgraph` command."""
import sys

from .cli import main

sys.exit(main())

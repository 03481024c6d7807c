"""`python -m reactor.cli ...` (what tests and the benchmarks run)."""

import sys

from reactor.cli import main

sys.exit(main())

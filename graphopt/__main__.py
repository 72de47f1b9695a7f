"""`python -m graphopt ...`: the same command line as the `graphopt` script (graphopt/cli.py)."""

import sys

from graphopt.cli import main

sys.exit(main())

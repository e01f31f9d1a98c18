"""``python -m searcher``: the CLI, where the console script is not installed (Ray jobs)."""

import sys

from searcher.cli import main

sys.exit(main())

#!/usr/bin/env python
"""Compare pruners x budgets (+ the unpruned baseline) with `vlm test`; writes report.md and report.png.
The logic is vlm.compare (README, "Using it": "Comparing pruners")."""

import sys

from vlm.compare import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Draw which patches each cut of a pruner keeps on one image (pruned ones dimmed).
The logic is vlm.kept_picture (README, "Using it": "Comparing pruners")."""

import sys

from vlm.kept_picture import main

if __name__ == "__main__":
    sys.exit(main())

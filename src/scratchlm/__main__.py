"""`python -m scratchlm` is the `scratchlm` command (so `torchrun -m scratchlm ...` works)."""

import sys

from scratchlm.cli import main

if __name__ == "__main__":
    sys.exit(main())

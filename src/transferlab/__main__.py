"""``python -m transferlab``: the CLI (the form torchrun launches: ``torchrun ... -m transferlab train ...``)."""

import sys

from .cli import main

if __name__ == "__main__":  # importing the package's modules (tests walk them all) must not run the CLI
    sys.exit(main())

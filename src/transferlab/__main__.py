"""``python -m transferlab``: the CLI (the form torchrun launches: ``torchrun ... -m transferlab train ...``)."""

import sys

from .cli import main

sys.exit(main())

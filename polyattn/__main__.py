"""``python -m polyattn`` (and ``torchrun -m polyattn``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())

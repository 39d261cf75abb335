"""``python -m palpo_gate`` is ``palpo-gate``."""

import sys

from .cli import main

sys.exit(main())

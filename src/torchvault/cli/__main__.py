"""``python -m torchvault.cli``: the same as the ``torchvault`` command."""

from __future__ import annotations

import sys

from . import main

sys.exit(main())

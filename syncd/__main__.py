"""``python -m syncd`` is the ``syncd`` command."""

import sys

from syncd.cli import console

sys.exit(console())

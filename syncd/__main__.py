"""``python -m syncd`` is the ``syncd`` command."""

import sys

from syncd.program import console

sys.exit(console())

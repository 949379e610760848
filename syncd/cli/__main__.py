"""``python -m syncd.cli`` (as ``python -m syncd``)."""

import sys

from syncd.program import console

sys.exit(console())

"""``python -m syncd.cli`` (as ``python -m syncd``)."""

import sys

from syncd.cli import console

sys.exit(console())

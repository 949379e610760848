"""``python -m syncd.cli`` (as ``python -m syncd``)."""

import sys

from syncd.cli import main

sys.exit(main())

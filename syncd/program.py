"""The ``syncd`` program: where the console script and ``python -m syncd`` start.

It loads the command line with the garbage collector off, then tunes the collector for passes.
:func:`syncd.cli.main` called in-process (the tests) leaves the host's collector alone.
"""

from __future__ import annotations

import gc
import signal

# Loading the command line imports ~450 modules and makes ~90,000 objects that live as long as the
# process, few of them in cycles; with the collector on, its young collections walked them ~130
# times, a tenth of the start-up of a `syncd run-once` (~30 ms of ~250). They are frozen after.
#
# A pass allocates and frees parsed devices by the hundred thousand, but few of them in cycles: at
# CPython's default (a young collection every 700 net allocations) the collector took ~8% of a
# first sync of 100,000 devices and walked each page's live devices over and over. At 10,000 it ran
# 8 times instead of ~1,000 (bench/bench_sync.py); cycles are still collected, just later.
YOUNG_COLLECTION_THRESHOLD = 10_000


def console() -> int:
    """The ``syncd`` program: :func:`syncd.cli.main`, in a process of its own, whose garbage
    collector is tuned for passes (the modules loaded at start are kept out of its collections).
    Once the command is over, Ctrl-C is ignored: it could only land in the interpreter's shutdown
    (an atexit hook, a finalizer) and print a traceback there."""
    gc.disable()
    try:
        from syncd.cli import main  # here: imported with the collector off
    finally:
        gc.freeze()
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
        gc.enable()
    try:
        return main()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

"""Signals: SIGTERM and SIGINT for the commands that run passes or push edits; and the daemon's."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Protocol


@contextmanager
def stop_on_signals(what: str) -> Iterator[threading.Event]:
    """SIGTERM/SIGINT set the yielded event (the API client then interrupts its reads in flight);
    a second SIGINT interrupts at once. The previous handlers are restored on exit."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        print(f"syncd: {signal.Signals(signum).name}: {what}", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run the block to its end (closing the mirror's connections, say) even if Ctrl-C comes
    meanwhile; that Ctrl-C is handled right after it, as it would have been (by default:
    KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


class Stoppable(Protocol):
    """What the daemon offers its signal handlers (both are safe to call from one)."""

    def request_stop(self) -> None: ...

    def request_reload(self) -> None: ...


@contextmanager
def daemon_signals(daemon: Stoppable) -> Iterator[None]:
    """SIGTERM/SIGINT stop the daemon gracefully, SIGHUP reloads its configuration; the previous
    handlers are restored on exit."""
    handlers = {
        signal.SIGTERM: lambda signum, frame: daemon.request_stop(),
        signal.SIGINT: lambda signum, frame: daemon.request_stop(),
        signal.SIGHUP: lambda signum, frame: daemon.request_reload(),
    }
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

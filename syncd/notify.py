"""systemd's notification protocol (sd_notify), without libsystemd.

Datagrams like ``READY=1`` go to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@``
means the abstract namespace). Without that variable every call does nothing, so the same code
runs under systemd, in a terminal and in tests.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends service state to systemd when run under ``Type=notify``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            self.watchdog_interval = int(watchdog_usec) / 1_000_000 / 2  # ping at twice the rate asked for
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether a notification socket was given."""
        return self._address is not None

    def send(self, **fields: str) -> None:
        """Send ``KEY=value`` lines (``send(READY="1", STATUS="...")``); errors are ignored, as sd_notify does."""
        if self._address is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                # Non-blocking: a reader that stopped reading must not stall the daemon's main loop
                # (and with it the watchdog); a dropped STATUS line is harmless.
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._socket.sendto(message, self._address)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        """Start-up is complete."""
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        """A one-line status for ``systemctl status``."""
        self.send(STATUS=status)

    def watchdog(self) -> None:
        """Still alive."""
        self.send(WATCHDOG="1")

    def stopping(self, status: str) -> None:
        """Shutdown has begun."""
        self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

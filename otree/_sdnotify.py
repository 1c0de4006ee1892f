"""Telling systemd about ``otree run`` itself (``Type=notify``): READY, STOPPING, STATUS, WATCHDOG.

The variables are taken out of the environment when read (as ``sd_notify``'s
``unset_environment``), so no child inherits otree's own notify socket and
speaks for it.
"""

from __future__ import annotations

import contextlib
import os
import socket

import trio

__all__ = ["SystemdNotifier"]


class SystemdNotifier:
    """Datagrams to ``$NOTIFY_SOCKET``; every method is a no-op when systemd did not ask."""

    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        """Read (and remove) ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``."""
        address = os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        pid = os.environ.pop("WATCHDOG_PID", None)
        watchdog = int(usec) if usec and usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        return cls(address, watchdog)

    def send(self, *fields: str) -> None:
        """Send ``fields`` (``READY=1``, ``STATUS=...``) in one datagram; a missing listener is ignored."""
        if self._socket is None or self._address is None:
            return
        # systemd gone or not listening: otree's job is its tree, not this message
        with contextlib.suppress(OSError):
            self._socket.sendto("\n".join(fields).encode(), self._address)

    async def keep_alive(self) -> None:
        """Ping ``WATCHDOG=1`` at half of ``WATCHDOG_USEC`` until cancelled."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

"""The systemd notification protocol (sd_notify(3)) in a few lines: readiness, status, watchdog, stopping.

Under a ``Type=notify`` unit systemd passes ``$NOTIFY_SOCKET``, an AF_UNIX
datagram socket (a path, or an abstract name written with a leading ``@``),
and the service sends it newline-separated ``VARIABLE=value`` assignments:
``READY=1`` once it serves, ``STATUS=`` a line for ``systemctl status``,
``STOPPING=1`` when it begins to stop, and ``WATCHDOG=1`` at least every
``$WATCHDOG_USEC`` microseconds when ``WatchdogSec=`` is set (systemd kills
and, with ``Restart=``, restarts a service that misses it). ``$WATCHDOG_PID``,
when set, names the one process the watchdog is meant for.

Only the service's main process sends (``NotifyAccess=main``): the ``Notifier``
is made there and takes the variables out of the environment, so that the
processes it forks (the listener, the lock servers) neither inherit nor use
them, as sd_notify's ``unset_environment`` does. Without ``$NOTIFY_SOCKET``
nothing is sent. Sending never stops the service, nor holds up its loop (a
full socket queue drops the notification rather than wait): a notification
that cannot be sent is logged, once, and the rest are dropped quietly as well.

No library: the protocol is one ``sendto`` of a datagram, and the packages on
PyPI for it add nothing but a dependency.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

SOCKET_VARIABLE = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
#: The shortest time between two WATCHDOG=1: a tiny $WATCHDOG_USEC (1 µs, say) would otherwise make the monitor's
#: loop send keep-alives without pause and burn a core. systemd cannot check a watchdog that finely anyway.
WATCHDOG_FLOOR = 0.05


def _address(name: str) -> str | bytes:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or ``@name`` for the abstract name ``\\0name``."""
    if name.startswith("@"):
        return b"\0" + os.fsencode(name[1:])  # the bytes the environment held, even when they are not UTF-8
    return name


def _watchdog_period(environ: MutableMapping[str, str], log: logging.Logger) -> float | None:
    """Seconds between two WATCHDOG=1: half of $WATCHDOG_USEC (sd_watchdog_enabled(3)'s advice), at least
    WATCHDOG_FLOOR, when it is set and $WATCHDOG_PID is unset or this process's; None otherwise. A value that is
    not understood is logged (one line) rather than ignored silently: it is a mistake in the unit's settings."""
    usec = environ.get(WATCHDOG_USEC, "")
    pid = environ.get(WATCHDOG_PID, "")
    if not usec:
        return None
    if not (usec.isascii() and usec.isdecimal()):
        log.warning("%s=%r not understood (microseconds expected): no watchdog", WATCHDOG_USEC, usec)
        return None
    if int(usec) == 0:
        return None
    if pid and not (pid.isascii() and pid.isdecimal()):
        log.warning("%s=%r not understood (a process id expected): no watchdog", WATCHDOG_PID, pid)
        return None
    if pid and int(pid) != os.getpid():
        return None
    return max(WATCHDOG_FLOOR, int(usec) / 2e6)


def _one_line(text: str) -> str:
    """A value on one line: a newline would start another assignment."""
    return " ".join(text.split())


class Notifier:
    """What the main process tells systemd. Inert (every call does nothing) without $NOTIFY_SOCKET."""

    def __init__(self, log: logging.Logger, address: str | None = None, watchdog: float | None = None) -> None:
        self.log = log
        self.address = address
        #: Seconds between two WATCHDOG=1, None: no watchdog.
        self.watchdog_period = watchdog
        self._next_watchdog = time.monotonic()
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, log: logging.Logger, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier systemd's variables describe, which are taken out of ``environ`` (os.environ)."""
        env = os.environ if environ is None else environ
        address = env.get(SOCKET_VARIABLE) or None
        watchdog = _watchdog_period(env, log) if address is not None else None
        for name in (SOCKET_VARIABLE, WATCHDOG_USEC, WATCHDOG_PID):
            env.pop(name, None)
        return cls(log, address, watchdog)

    @property
    def active(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``VARIABLE=value`` assignments in one datagram; whether it was sent. A failure is logged once."""
        if self.address is None:
            return False
        data = "\n".join(assignments).encode() + b"\n"
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never wait: a receiver whose queue is full (max_dgram_qlen) would otherwise stop the monitor's loop.
            self._sock.sendto(data, socket.MSG_DONTWAIT, _address(self.address))
        except OSError as exc:
            if not self._failed:
                self._failed = True
                self.log.warning("cannot notify systemd at %s=%s: %s (the service goes on; this is said once)",
                                 SOCKET_VARIABLE, self.address, exc.strerror or exc)
            return False
        return True

    def status(self, text: str) -> None:
        self.send(f"STATUS={_one_line(text)}")

    def ready(self, text: str) -> None:
        """READY=1, with what the service does now: the service accepts its clients."""
        self.send("READY=1", f"STATUS={_one_line(text)}")
        self._next_watchdog = time.monotonic()

    def stopping(self, text: str) -> None:
        self.send("STOPPING=1", f"STATUS={_one_line(text)}")

    def watchdog_due(self) -> float | None:
        """Seconds until the next WATCHDOG=1 is due (0: now), None without a watchdog."""
        if self.watchdog_period is None or self.address is None:
            return None
        return max(0.0, self._next_watchdog - time.monotonic())

    def keep_alive(self) -> None:
        """WATCHDOG=1 when it is due: called from the loop whose progress it vouches for."""
        due = self.watchdog_due()
        if due is None or due > 0:
            return
        assert self.watchdog_period is not None
        self._next_watchdog = time.monotonic() + self.watchdog_period
        self.send("WATCHDOG=1")

    def close(self) -> None:
        """Let go of the socket (a forked child must not use its parent's notifier: see ``Daemon.fork``)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.address = None

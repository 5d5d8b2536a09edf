"""What a lock server counts for the monitor's ``/metrics``, and how the counts reach the monitor.

Why not prometheus_client's multiprocess mode: it keeps a file of mmapped
values per process and merges them all at each scrape; a lock server is a
process per connection, so thousands of files would be made, read at every
scrape and cleaned up after each lock server's end (the mode's "mark process
dead" chore), and every increment would go through the library on the lock
path. Instead a lock server counts in plain ints (a list index or a dict entry
per event, bucket counts for the histograms), and sends what changed since its
last datagram (deltas, JSON) to the monitor's Unix datagram socket
``run/metrics.sock`` in the instance's private directory: at most once a
second, and when it ends. The monitor adds them to counters of its own, so the
totals outlive the lock servers.

The "at most once a second" is a one-shot interval timer (SIGALRM) armed by
the first count after a send: the lock path pays an attribute test per event,
no clock reading and no system call, and an idle lock server is never woken.
The handler runs between two bytecodes of the main thread and sends the
difference between the counts and what was sent, so an increment it
interrupts is sent next time, never twice. A send that fails (no monitor, its
queue full) leaves the counts unsent, for the next one. Lost: what a lock
server counted in its last second when it is SIGKILLed.

Hand-off time: from the lock server's wake-up by its doorbell (rung by the
release or tidy that let a waiting request in) to the grant's answer sent to
the client. Wait time: from the request's arrival (it is queued as it is read)
to its grant sent, for requests that waited.
"""

from __future__ import annotations

import bisect
import json
import os
import signal
import socket
from pathlib import Path

#: The monitor's socket, in the instance's run directory.
SOCKET_NAME = "metrics.sock"
#: The histograms' upper bounds (seconds); the last, infinity, is implied.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: How often at most a lock server sends its counts (seconds).
SEND_PERIOD = 1.0
#: The datagram's version (a monitor ignores, and logs, one it does not know).
VERSION = 1
#: The lock modes counted (NL..EX).
MODES = 6


def socket_path(run_dir: Path) -> str:
    """The monitor's socket (``short_address`` makes it one a socket takes)."""
    return str(run_dir / SOCKET_NAME)


def short_address(path: str) -> tuple[str, int | None]:
    """``path`` as an AF_UNIX address (at most 107 bytes): itself, or through a descriptor of its directory
    opened here (/proc/self/fd/N/name; the caller closes N once bound or sent)."""
    if len(os.fsencode(path)) < 108:
        return path, None
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{name}", fd


class Histogram:
    """Bucket counts and a sum, as a Prometheus histogram has them (not cumulative here)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class Meter:
    """One lock server's counts since it started, and what of them was sent (see the module docstring)."""

    __slots__ = ("_address", "_armed", "_sent", "_sock", "cancels", "errors", "grants", "handoff", "refusals",
                 "wait")

    def __init__(self, run_dir: Path) -> None:
        self.grants = [0] * MODES
        self.refusals: dict[int, int] = {}
        self.errors: dict[int, int] = {}
        self.cancels = 0
        self.wait = Histogram()
        self.handoff = Histogram()
        self._address = socket_path(run_dir)
        self._sock: socket.socket | None = None
        self._sent: dict[str, object] = self.counts()  # all zero
        self._armed = True  # until ``start``: no timer before its handler is in place

    # -- counting (the lock path) ----------------------------------------------

    def granted(self, mode: int) -> None:
        self.grants[mode] += 1
        if not self._armed:
            self.arm()

    def refused(self, reason: int) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        if not self._armed:
            self.arm()

    def error(self, code: int) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1
        if not self._armed:
            self.arm()

    def cancelled(self) -> None:
        self.cancels += 1
        if not self._armed:
            self.arm()

    def waited(self, seconds: float) -> None:
        self.wait.observe(seconds)

    def handed_off(self, seconds: float) -> None:
        self.handoff.observe(seconds)

    # -- sending ------------------------------------------------------------------

    def arm(self) -> None:
        """Send within SEND_PERIOD (the SIGALRM handler, installed by ``start``)."""
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, SEND_PERIOD)

    def start(self) -> None:
        """Install the timer's handler (in the lock server, before it serves)."""
        signal.signal(signal.SIGALRM, self._alarm)
        self._armed = False

    def _alarm(self, signum: int, frame: object) -> None:
        self._armed = False
        self.send()

    def stop(self) -> None:
        """The last send, as the lock server ends; no timer after it."""
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        self._armed = True  # nothing arms it again
        self.send()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def counts(self) -> dict[str, object]:
        """Every count now, as the datagram carries them (and as ``_sent`` keeps them)."""
        return {
            "grants": list(self.grants), "refusals": dict(self.refusals), "errors": dict(self.errors),
            "cancels": self.cancels, "wait": [*self.wait.counts, self.wait.total],
            "handoff": [*self.handoff.counts, self.handoff.total],
        }

    def send(self) -> bool:
        """Send what changed since the last send; False (kept for the next) when it could not be sent."""
        now = self.counts()
        delta = difference(now, self._sent)
        if delta is None:
            return True
        payload = json.dumps({"v": VERSION, "pid": os.getpid(), **delta}, separators=(",", ":")).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            address, fd = short_address(self._address)
            try:
                self._sock.sendto(payload, socket.MSG_DONTWAIT, address)
            finally:
                if fd is not None:
                    os.close(fd)
        except OSError:
            return False  # no monitor now, or its queue is full: sent with the next
        self._sent = now
        return True


def difference(now: dict[str, object], then: dict[str, object]) -> dict[str, object] | None:
    """``now`` minus ``then``, the zero entries left out; None when nothing changed."""
    out: dict[str, object] = {}
    for name, value in now.items():
        before = then[name]
        if isinstance(value, list):
            assert isinstance(before, list)
            d: object = [a - b for a, b in zip(value, before, strict=True)]
            changed = any(d)  # type: ignore[arg-type]
        elif isinstance(value, dict):
            assert isinstance(before, dict)
            d = {str(k): v - before.get(k, 0) for k, v in value.items() if v != before.get(k, 0)}
            changed = bool(d)
        else:
            assert isinstance(value, int) and isinstance(before, int)
            d = value - before
            changed = d != 0
        if changed:
            out[name] = d
    return out or None


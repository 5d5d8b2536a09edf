"""A lease between a process that holds a lock and the watchdog that stops the work done under it.

A process that holds a lock for others' work (dls-lock for its command, the
``--hold`` process for a shell) hears that its lock is lost and stops the work.
Stopped itself (SIGSTOP, a debugger, a frozen process) it hears nothing, and
the work would run on beside the lock's next holder. So it renews a lease
twice a second with its watchdog, a process it forked (dls-lock's keeper, the
hold process's guard): how long the lock is sure to stay its own should it do
nothing more (``Client.held_until``: the service's lock-delay less the time a
dead server takes to be found). The watchdog stops the work the grace period
before the lease runs out and kills what is left when it does.

The lease lives in a page both processes share (an anonymous MAP_SHARED mmap
made before the fork): the holder writes the end, the watchdog a byte when it
let the lease run out, each its own bytes. Times are CLOCK_BOOTTIME, which
also runs while the host is suspended, as the service's lock-delay does.

A watchdog stopped together with its holder (the terminal's Ctrl-Z stops the
whole job) finds, when resumed, a lease that ran out while nobody could
renew it: it gives the holder RENEWAL_WAIT to renew before it acts.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from collections.abc import Callable

#: How often the holder renews the lease (seconds).
PERIOD = 0.5
#: The least silence of the holder after which the watchdog acts, whatever the lock-delay (seconds): with a
#: lock-delay too short to leave more (or an OS file lock on the service), the lock may be lost sooner.
LEAST_SILENCE = 1.0
#: How much longer than asked the watchdog must have slept to know it was stopped itself.
LATE = 1.0
#: Seconds a resumed watchdog waits for its holder's renewal.
RENEWAL_WAIT = 1.0
#: The page: the lease's end (0 before the first renewal), then the byte the watchdog sets.
_END = struct.Struct("=d")
_RAN_OUT = _END.size


def boottime() -> float:
    """The lease's clock."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Lease:
    """The shared page; make it before forking the watchdog. ``grace``: the seconds between the
    watchdog's TERM and its KILL, which every lease leaves at the least (with LEAST_SILENCE)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._page = mmap.mmap(-1, _RAN_OUT + 1)  # MAP_SHARED, zero: not leased yet

    # -- the holder's side --------------------------------------------------------------

    def renew(self, held_until: float) -> None:
        """The lock stays this process's until ``held_until`` (time.monotonic()) should it do nothing
        more: the watchdog is to have stopped the work by then."""
        left = max(held_until - time.monotonic(), self.grace + LEAST_SILENCE)
        self._page[:_RAN_OUT] = _END.pack(boottime() + left)

    @property
    def ran_out(self) -> bool:
        """Whether the watchdog stopped the work because the lease ran out."""
        return self._page[_RAN_OUT] != 0

    # -- the watchdog's side ------------------------------------------------------------

    def end(self) -> float:
        """The lease's end (boottime()); 0 while not leased."""
        end: float = _END.unpack(self._page[:_RAN_OUT])[0]
        return end

    def mark_ran_out(self) -> None:
        self._page[_RAN_OUT] = 1


class Renewal:
    """The holder's renewing thread: ``also()`` then ``lease.renew(held_until())`` now, then every PERIOD
    until stopped (``also``: what else the watchdog is to be told as often, its connections to keep)."""

    def __init__(self, lease: Lease, held_until: Callable[[], float], also: Callable[[], None] = lambda: None) -> None:
        self._lease, self._held_until, self._also = lease, held_until, also
        self._done = threading.Event()
        self._renew()
        threading.Thread(target=self._run, name="dls-lock lease", daemon=True).start()

    def _renew(self) -> None:
        self._also()
        self._lease.renew(self._held_until())

    def _run(self) -> None:
        while not self._done.wait(PERIOD):
            self._renew()

    def stop(self) -> None:
        self._done.set()


class Watch:
    """The watchdog's look at the lease: call ``slept`` after each wait, ``due`` before the next."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        #: The seconds between TERM and KILL when the lease runs out (the lease's).
        self.grace = lease.grace
        #: When this watchdog found it had been stopped itself, and the lease's end it found then.
        self._resumed: tuple[float, float] | None = None

    def slept(self, until: float) -> None:
        """A wait meant to end at ``until`` (boottime()) is over: if it ended much later, this process was
        stopped too, and its holder gets RENEWAL_WAIT to renew."""
        now = boottime()
        if now - until > LATE:
            self._resumed = (now, self.lease.end())

    def due(self) -> tuple[float, float | None]:
        """(seconds until the next look, None) while the lease holds; (0, seconds left before its end:
        the KILL deadline) once it has run out less the grace period: stop the work now (the lease is
        marked run out)."""
        end, now = self.lease.end(), boottime()
        if end == 0:
            return PERIOD, None
        if end - self.lease.grace > now:
            return end - self.lease.grace - now, None
        if self._resumed is not None:
            resumed_at, end_then = self._resumed
            if end > end_then:  # renewed since: the holder was stopped along with this watchdog, and is well
                self._resumed = None
                return self.due()
            if now < resumed_at + RENEWAL_WAIT:
                return resumed_at + RENEWAL_WAIT - now, None
        self.lease.mark_ran_out()
        return 0.0, max(0.0, end - now)


def ran_out_message(holder: int, work: str, kill_after: float) -> str:
    """What the watchdog says when it stops the work (on the work's standard error)."""
    return (f"dls-lock: the process holding the lock (pid {holder}) did not renew its lease in time (stopped "
            f"or frozen?): the lock may be lost; stopping {work} (TERM now, KILL after {kill_after:.1f} s)")

"""Watching the process a waiting request is blocked by, so that its death wakes the request at once.

Nobody rings a doorbell for a process that dies holding a lock: without a watch,
the waiter would find out at its next look (``RECHECK_INTERVAL``), or at the
monitor's tidy. A pidfd (Linux 5.3 and later) becomes readable when its process
ends, a zombie included, which is what the table counts as dead; the waiter
selects on it beside its doorbell, and looks again, clearing the dead holder's
lock, when either wakes it. Where pidfds are not available the watch watches
nothing and the recheck remains.
"""

from __future__ import annotations

import contextlib
import os

from .doorbell import readable


class HolderWatch:
    """A pidfd of one process at a time, for one waiting request."""

    def __init__(self) -> None:
        self.pid = 0
        self.fd = -1

    def follow(self, pid: int) -> int | None:
        """A descriptor that becomes readable when ``pid`` ends (-1: nothing can be watched here), or None
        when ``pid`` has ended already (look again now)."""
        if pid == self.pid and self.fd >= 0:
            return self.fd
        self.close()
        if pid <= 0:
            return -1
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except (OSError, AttributeError):  # no pidfd here (an old kernel, or seccomp): the recheck remains
            return -1
        self.pid = pid
        return self.fd

    def ended(self) -> bool:
        """Whether the watched process has ended (False when nothing is watched)."""
        return self.fd >= 0 and bool(readable([self.fd], 0))

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd, self.pid = -1, 0

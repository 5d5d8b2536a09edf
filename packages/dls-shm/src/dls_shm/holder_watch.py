"""Watching the processes a waiting request waits on, so that a death among them wakes it at once.

Nobody rings a doorbell for a process that dies holding a lock: without a watch,
the waiter would find out at its next look (``RECHECK_INTERVAL``), or at the
monitor's tidy. A pidfd (Linux 5.3 and later) becomes readable when its process
ends, a zombie included, which is what the table counts as dead; the waiter
polls it beside its doorbell, and looks again, clearing the dead holder's lock,
when either wakes it. Where pidfds are not available the watch watches nothing
and the recheck remains.

A request watches more than the holder in its way: the table names the holders
and the nearest waiters ahead of it (``Queued.watch``), any of which may hold the
lock by the time it is first in line. A release that hands the lock on then
rings only the waiters it granted, not also the next one to learn of its new
blocker (a wake-up per hand-off, in the way of the one that matters).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection

from .doorbell import readable


class HolderWatch:
    """pidfds of the processes one waiter (a waiting request, or all a lock server's) waits on."""

    def __init__(self) -> None:
        #: pid -> its pidfd (-1: nothing can be watched here)
        self._fds: dict[int, int] = {}
        self._pids: dict[int, int] = {}

    def follow(self, pids: Collection[int]) -> tuple[list[int], list[int]]:
        """Watch exactly ``pids`` (those watched already keep their descriptor): the descriptors to poll,
        and the pids that have ended already (look again now)."""
        for pid in [pid for pid in self._fds if pid not in pids]:
            self._close(pid)
        fds, ended = [], []
        for pid in pids:
            fd = self._fds.get(pid)
            if fd is None:
                fd = self._open(pid)
                if fd is None:
                    ended.append(pid)
                    continue
            if fd >= 0:
                fds.append(fd)
        return fds, ended

    def drop_ended(self) -> None:
        """Close the descriptors of the processes that have ended since they were watched (one poll): a
        watch kept from an earlier wait would take a new process given an ended one's pid for the one that
        ended, and never watch it. Called as a wait begins."""
        if self._pids:
            for fd in readable(list(self._pids), 0):
                self._close(self._pids[fd])

    def ended(self, ready: Collection[int]) -> list[int]:
        """The watched pids whose descriptors are among ``ready`` (poll's answer): they have ended."""
        return [self._pids[fd] for fd in ready if fd in self._pids]

    def close(self) -> None:
        for pid in list(self._fds):
            self._close(pid)

    def _open(self, pid: int) -> int | None:
        if pid <= 0:
            fd = -1
        else:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return None
            except (OSError, AttributeError):  # no pidfd here (an old kernel, or seccomp): the recheck remains
                fd = -1
        self._fds[pid] = fd
        if fd >= 0:
            self._pids[fd] = pid
        return fd

    def _close(self, pid: int) -> None:
        fd = self._fds.pop(pid)
        if fd >= 0:
            del self._pids[fd]
            with contextlib.suppress(OSError):
                os.close(fd)

"""Blocking notices: the application's ``on_blocking`` callbacks, called on a thread of their own.

A lock taken with ``on_blocking`` is watched here by its handle. Whoever hears that it blocks someone (a
LocalClient's notice doorbell, a Client's connection reading a ``Blocking`` message) says so with
``deliver``, which never waits for the application: the callback runs on this module's thread, so neither
the thread that reads the connection (every lock of the client waits on it) nor the application's own
threads are stalled by it; a slow callback delays only later notices.

A notice may come before its lock is watched (the lock was granted, and another request queued behind it,
before the lock call returned): it is kept, a few of them at most, and told as soon as the lock is watched.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from .locks import HeldLock, OnBlocking

    #: Told of a callback that raised (the client's error trace).
    OnError = Callable[[str], None]

#: How many notices of locks not (yet) watched are kept: one per lock being returned at this instant is plenty.
EARLY_KEPT = 64


class BlockingNotices:
    """The watched locks of one client and the thread that tells the application."""

    def __init__(self, report: OnError | None = None) -> None:
        self._watched: dict[int, tuple[HeldLock, OnBlocking]] = {}
        self._early: dict[int, int] = {}
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[HeldLock, OnBlocking, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._report = report

    def watch(self, held: HeldLock, callback: OnBlocking) -> None:
        """Tell ``callback(held, mode)`` of each notice about ``held`` from now on (and of one that came already)."""
        with self._lock:
            self._watched[held.handle] = (held, callback)
            early = self._early.pop(held.handle, None)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dls-blocking-notices", daemon=True)
                self._thread.start()
        if early is not None:
            self._queue.put((held, callback, early))

    def watching(self) -> bool:
        """Whether any lock is watched."""
        return bool(self._watched)

    def handles(self) -> list[int]:
        """The handles of the locks watched."""
        with self._lock:
            return list(self._watched)

    def forget(self, handle: int) -> None:
        """No more notices about this lock (released, lost)."""
        with self._lock:
            self._watched.pop(handle, None)
            self._early.pop(handle, None)

    def deliver(self, handle: int, mode: int) -> None:
        """A notice came: lock ``handle`` blocks a request for ``mode``. Never waits for the application."""
        with self._lock:
            watched = self._watched.get(handle)
            if watched is None:
                if len(self._early) >= EARLY_KEPT:
                    self._early.pop(next(iter(self._early)))
                self._early[handle] = mode
                return
        self._queue.put((*watched, mode))

    def close(self) -> None:
        """Let the thread end (after the notices already queued)."""
        with self._lock:
            self._watched.clear()
            started = self._thread is not None
            self._thread = None
        if started:
            self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            held, callback, mode = item
            if held.released or held.lost:
                continue
            try:
                callback(held, mode)
            except Exception as exc:  # the application's: said, and the next notice is told all the same
                if self._report is not None:
                    self._report(f"on_blocking callback of {held!r} raised {exc!r}")


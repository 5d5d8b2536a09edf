"""OS file locks for a local process: dls-shm's ``OsLocks`` with the lock table's ``acquire``.

Used by ``LocalClient`` when the instance has no lock table (``jdls -ibD``, the
listener alone): its record locks are then ``fcntl`` locks on the lock files of
the lock directory the lock server uses (``JDLS_LOCK_DIR``, else ``/tmp/jbase``),
named as the lock server names them (device -1 for every record), so a local
process and a remote client served there exclude each other.

``OsLocks`` cannot wake a process that waits for another process's ``fcntl``
lock, so a request that must wait is tried again on a timer: after
``retry_first`` seconds, then twice as long each time up to ``retry_max``; a
release by another thread of this process rings the waiter's doorbell at once.
Importing this module imports dls-shm: ``dls_client.local`` does it only when a
LocalClient needs it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dls_shm import Conflict, Doorbell, Grant, Holder, OsLocks, Owner, Queued

#: Where the lock server keeps OS record locks (``jdls --lock-dir``): this variable, else DEFAULT_LOCK_DIR.
LOCK_DIR_VARIABLE = "JDLS_LOCK_DIR"
DEFAULT_LOCK_DIR = "/tmp/jbase"  # noqa: S108 - the place jDLS documents, shared with the lock server


def lock_dir() -> Path:
    """The record lock directory, chosen as ``jdls`` chooses it when given no ``--lock-dir``."""
    return Path(os.environ.get(LOCK_DIR_VARIABLE) or DEFAULT_LOCK_DIR)


class PolledOsLocks(OsLocks):
    """OsLocks with the table's ``acquire``: wait at most a timeout, polling (and woken when rung)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        super().__init__(directory)
        self._local = threading.local()

    def doorbell(self) -> Doorbell:
        """This thread's doorbell, made on first use."""
        bell: Doorbell | None = getattr(self._local, "bell", None)
        if bell is None:
            bell = self._local.bell = Doorbell()
        return bell

    def acquire(
        self, owner: Owner, inode: int, device: int, key: bytes, mode: int, timeout: float | None = None,
        on_wait: Callable[[Holder], None] | None = None,
    ) -> Grant | Conflict:
        """As ``LockTable.acquire``: wait at most ``timeout`` seconds (None: as long as it takes, 0: not at all)."""
        if timeout is not None and timeout <= 0:
            result = self.lock(owner, inode, device, key, mode)
            assert not isinstance(result, Queued)
            return result
        bell = self.doorbell()
        queued: Grant | Conflict | Queued = self.lock(owner, inode, device, key, mode, wait_token=bell.token)
        if not isinstance(queued, Queued):
            return queued
        if on_wait is not None:
            on_wait(queued.holder)
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = self.retry_first
        try:
            while isinstance(queued, Queued):
                nap = pause if deadline is None else min(pause, deadline - time.monotonic())
                if nap <= 0:
                    self.cancel(queued.handle)
                    return Conflict(queued.holder)
                bell.wait(nap)
                pause = min(pause * 2, self.retry_max)
                queued = self.retry(queued.handle)
        except BaseException:
            if isinstance(queued, Queued):
                self.cancel(queued.handle)
            raise
        return queued

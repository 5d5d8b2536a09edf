"""The lock mechanisms a lock server takes locks with, behind one small interface.

A lock server serves every request through a ``Backend``: the shared-memory
lock table when the monitor made one, or OS file locks (dls-shm's ``OsLocks``)
when there is none (``jdls -ibD`` alone). The operations are the table's own
(``LockOps``: lock, retry, cancel, unlock, status, release_owner, with the same
Grant / Conflict / Queued / Holder answers), so the table needs no wrapper
around its calls and its hot path stays what it was: the Backend only says how
to serve a request that waits.

- The table rings a waiter's doorbell when its lock may be granted; the lock
  server looks again when rung, and every RECHECK_INTERVAL as a safety net.
- OS file locks cannot ring a process that waits for another's ``fcntl`` lock,
  so a waiting request is tried again on a timer: after ``retry_first`` seconds,
  then twice as long each time up to ``retry_max`` (50 ms to 250 ms). The lock
  server sleeps in ``select`` between looks, so a waiter costs a system call or
  two a few times a second. Locks released by the same lock server (another
  thread of its client) still ring its doorbell at once.

Which backend serves a Lock: a BINARY lock is always an OS lock in the binary
lock directory (as in jDLS, the table holds record locks only); an OSLOCK
record lock (the client's OSLOCKS option) is an OS lock in the record lock
directory even when there is a table; any other record lock goes to the
connection's main backend: the table, or OS locks when there is no table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dls_proto import Mechanism
from dls_shm import RECHECK_INTERVAL, Conflict, Grant, Holder, LockTable, OsLocks, Owner, Queued


class LockOps(Protocol):
    """What a lock server asks of a lock mechanism (LockTable and OsLocks both do it)."""

    def lock(
        self, owner: Owner, inode: int, device: int, key: bytes, mode: int, *, wait_token: int = 0
    ) -> Grant | Conflict | Queued: ...

    def retry(self, handle: int) -> Grant | Queued: ...

    def cancel(self, handle: int) -> bool: ...

    def unlock(self, handle: int) -> None: ...

    def status(self, owner: Owner, inode: int, device: int, key: bytes) -> tuple[int, Holder | None]: ...

    def release_owner(self, pid: int, thread: int | None = None) -> int: ...


def _nothing() -> int:
    return 0


@dataclass(frozen=True, eq=False)
class Backend:
    """A lock mechanism as a lock server uses it: its operations and how its waiters are served."""

    ops: LockOps
    mechanism: Mechanism
    name: str
    #: Seconds before a waiting request is looked at again without being rung, and the longest such pause.
    retry_first: float = RECHECK_INTERVAL
    retry_max: float = RECHECK_INTERVAL
    #: Lets go of what this lock server holds through it (OS locks: closes the lock files); how many locks.
    close: Callable[[], int] = _nothing

    def next_retry(self, interval: float) -> float:
        """The pause after ``interval`` before the next look at a waiting request."""
        return min(interval * 2, self.retry_max)


def table_backend(table: LockTable) -> Backend:
    """The shared-memory lock table: waiters are rung, the safety-net recheck every RECHECK_INTERVAL."""
    return Backend(table, Mechanism.TABLE, f"lock table 0x{table.key:08x}")


def os_backend(directory: Path, *, binary: bool = False) -> Backend:
    """OS file locks under ``directory`` (made when the first lock needs it), polled while waiting."""
    locks = OsLocks(directory)
    kind = "binary" if binary else "record"
    return Backend(locks, Mechanism.OSLOCKS, f"OS {kind} locks in {directory}", locks.retry_first,
                   locks.retry_max, locks.close)

"""The lock mechanisms of one lock server, and which of them serves a Lock.

Every mechanism is a dls-shm ``LockMechanism`` (the table, or OS file locks),
used through that interface alone: how a queued request waits is the
mechanism's own ``pauses()``. What this module knows is the choice, made per
request from its flags: BINARY goes to OS locks in the binary-lock directory
(the table holds record locks only, as in jDLS), anything else to the
connection's main mechanism, the table or, without one, OS record locks. OS
locks belong to the process that takes them, so each lock server makes its
own, on first use.

A record lock has one mechanism, so that its holders exclude each other: a
request flagged OSLOCK (JDLS OSLOCKS) is a record lock like any other and goes
to the main mechanism, which is OS file locks, as it asks, only where the
service has no table. Beside a table it is a table lock: served as an OS lock,
it would never meet the table locks of the other clients on the same record.
Binary locks are a namespace of their own, which every client takes as OS locks.

OS record locks (the main mechanism) serve the instance only while it has no
table: they are made with the instance's table key, and a table made meanwhile
makes them refuse (dls-shm's TableServes, one mechanism per instance).
"""

from __future__ import annotations

from pathlib import Path

from dls_proto import LockFlag, Mechanism
from dls_shm import LockMechanism, LockTable, OsLocks


class Mechanisms:
    """The mechanisms a lock server locks with: ``main`` for record locks, OS locks for binary ones."""

    def __init__(self, table: LockTable | None, lock_dir: Path, binary_lock_dir: Path, table_key: int, *,
                 gid: int | None = None) -> None:
        self.table = table
        self._gid = gid
        self._binary_lock_dir = binary_lock_dir
        self._binary: OsLocks | None = None  # made on first use
        self.main: LockMechanism = table if table is not None else OsLocks(lock_dir, table_key=table_key, gid=gid)
        #: What the Welcome tells the client the service locks with.
        self.kind = Mechanism.TABLE if table is not None else Mechanism.OSLOCKS
        #: The Lock flags that send a request elsewhere than ``main``.
        self.routed = int(LockFlag.BINARY)

    def binary_locks(self) -> OsLocks:
        """This process's OS binary locks."""
        if self._binary is None:
            self._binary = OsLocks(self._binary_lock_dir, table_key=None, gid=self._gid)
        return self._binary

    def for_flags(self, flags: int) -> LockMechanism:
        """The mechanism that serves a Lock with these flags (OSLOCK changes nothing: see the module's
        docstring)."""
        return self.binary_locks() if flags & LockFlag.BINARY else self.main

    def close(self) -> int:
        """Release every OS lock (closing the lock files drops them); how many there were. The table
        stays attached: its locks are released by owner (``release_owner``)."""
        owned = [locks for locks in (self.main, self._binary) if isinstance(locks, OsLocks)]
        return sum(locks.close() for locks in owned)

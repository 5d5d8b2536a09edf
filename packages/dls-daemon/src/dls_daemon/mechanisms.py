"""The lock mechanisms of one lock server, and which of them serves a Lock.

Every mechanism is a dls-shm ``LockMechanism`` (the table, or OS file locks),
used through that interface alone: how a queued request waits is the
mechanism's own ``pauses()``. What this module knows is the choice, made per
request from its flags: BINARY goes to OS locks in the binary-lock directory
(the table holds record locks only, as in jDLS), OSLOCK to OS record locks
even beside a table, anything else to the connection's main mechanism, the
table or, without one, OS record locks. OS locks belong to the process that
takes them, so each lock server makes its own, on first use.

OS record locks that are the main mechanism serve the instance only while it
has no table: they are made with the instance's table key, and a table made
meanwhile makes them refuse (dls-shm's TableServes, one mechanism per
instance). Binary locks and OSLOCK requests beside a table are a client's own
choice, outside that rule.
"""

from __future__ import annotations

from pathlib import Path

from dls_proto import LockFlag, Mechanism
from dls_shm import LockMechanism, LockTable, OsLocks


class Mechanisms:
    """The mechanisms a lock server locks with: ``main`` for plain record locks, OS locks for the rest."""

    def __init__(self, table: LockTable | None, lock_dir: Path, binary_lock_dir: Path, table_key: int, *,
                 gid: int | None = None) -> None:
        self.table = table
        self._gid = gid
        self._dirs = {False: lock_dir, True: binary_lock_dir}
        #: The instance's table key, which OS record locks look at when they are the main mechanism.
        self._table_key = table_key
        self._os: dict[bool, OsLocks] = {}  # binary? -> OS locks, made on first use
        self.main: LockMechanism = table if table is not None else self.os_locks(binary=False)
        #: What the Welcome tells the client the service locks with.
        self.kind = Mechanism.TABLE if table is not None else Mechanism.OSLOCKS
        #: The Lock flags that send a request elsewhere than ``main``.
        self.routed = int(LockFlag.BINARY) | (int(LockFlag.OSLOCK) if table is not None else 0)

    def os_locks(self, *, binary: bool) -> OsLocks:
        """This process's OS record (or binary) locks."""
        locks = self._os.get(binary)
        if locks is None:
            main = not binary and self.table is None
            locks = self._os[binary] = OsLocks(self._dirs[binary], table_key=self._table_key if main else None,
                                                 gid=self._gid)
        return locks

    def for_flags(self, flags: int) -> LockMechanism:
        """The mechanism that serves a Lock with these flags."""
        if flags & LockFlag.BINARY:
            return self.os_locks(binary=True)
        if flags & LockFlag.OSLOCK:
            return self.os_locks(binary=False)
        return self.main

    def close(self) -> int:
        """Release every OS lock (closing the lock files drops them); how many there were. The table
        stays attached: its locks are released by owner (``release_owner``)."""
        return sum(locks.close() for locks in self._os.values())

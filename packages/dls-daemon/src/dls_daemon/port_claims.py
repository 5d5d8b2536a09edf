"""Port claims: on a ``-P`` table a client port belongs to the one connection that claimed it.

On a table with port-based ownership a lock belongs to (port, thread, address), whichever
process asks; so a peer that named another client's port in its Hello would be
that client, able to convert and release its locks. The lock server of the
connection that claims a port holds it until it ends, with a write lock on the
port's record in one file of the instance (``run/ports.lock``, 16 bytes a port,
sparse), where it writes the client's address (for the log). The kernel drops
the lock with the process however it ends (even SIGKILL), so a client that
reconnects after its lock server died claims its port again at once and
reclaims its kept locks.

Another connection claiming a live port is refused, whatever address it comes
from: a port names one client, and a second claimant, even on the client's own
host, may be another user. A client reconnecting while its old lock server has
not yet ended (it is ending: the old connection was closed) is given a moment
(CLAIM_WAIT) for the port to come free.

Local processes lock in the table directly, through no lock server, so they
claim nothing here: a port that a live process holds locks or requests under,
in the table, from another host (a local process shows 0.0.0.0; a loopback
peer is on its host) is refused too (``used_elsewhere``).

The file is the lock server's alone (nothing else opens it), which matters:
POSIX record locks are dropped when the process closes any descriptor of the file.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct
import time

from dls_shm import LOCAL_IP, Instance, LockTable, SlotState, pack_ip

#: struct flock on Linux (x86-64 and aarch64): type, whence, start, len, pid.
_FLOCK = struct.Struct("hhqqi4x")
_MODE = 0o640
#: A port's record: the holder's address, 16 bytes (IPv4 mapped into IPv6).
RECORD = 16
#: Seconds a claim waits for a port held by a lock server that may be ending (its client reconnecting).
CLAIM_WAIT = 1.0


class PortTaken(Exception):
    """Another live connection, from another address, holds the port; the message names its lock server."""


def claim(instance: Instance, port: int, address: str, *, wait: float = CLAIM_WAIT) -> int:
    """Hold ``port`` for this process, the client at ``address``, until it ends: the descriptor that holds it
    (keep it open). PortTaken when a live connection still holds it after ``wait`` seconds."""
    path = instance.run_dir / "ports.lock"
    where = port * RECORD
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _MODE)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, RECORD, where)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    holder = _holder(fd, port)
                    raise PortTaken(f"port {port} is held by lock server pid {holder}" if holder else
                                    f"port {port} is held by another connection") from None
                time.sleep(0.02)
        os.pwrite(fd, pack_ip(address), where)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _holder(fd: int, port: int) -> int:
    """The pid holding the port's record (0 when unknown or free meanwhile)."""
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, port * RECORD, RECORD, 0))
    except OSError:
        return 0
    kind, _whence, _start, _len, pid = _FLOCK.unpack(answer)
    return int(pid) if kind != fcntl.F_UNLCK else 0


def used_elsewhere(table: LockTable, port: int, address: str) -> int:
    """The pid of a live process with a lock or request under ``port`` in ``table`` from another address than
    ``address`` (0: none). A loopback peer is on this host, as local processes are (they show 0.0.0.0): it may
    name their ports, as they may. Kept locks are nobody's: their client proves itself by reclaiming."""
    packed = pack_ip(address)
    same_host = {packed, LOCAL_IP} if ipaddress.ip_address(address).is_loopback else {packed}
    for entry in table.scan():
        slot = entry.slot
        if (slot.port == port and slot.state in (SlotState.GRANTED, SlotState.WAITING) and slot.ip not in same_host
                and _alive(slot.pid)):
            return int(slot.pid)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

"""Doorbells: how a lock holder wakes the processes waiting for its lock.

A waiter binds a datagram socket in the abstract unix namespace, under a random
token that it stores in its waiting slot; whoever frees the lock sends one byte
to each waiter's token. A doorbell is a file descriptor, so a single-threaded
lock server can wait on its client's socket and its doorbell in one
``select``; nothing is left behind when a process dies, unlike a semaphore.
Rings are counted by the kernel's socket queue, so a ring sent before the
waiter sleeps is not lost.

A holder that asked to be told when its lock blocks someone (a blocking notice)
gives the token of a doorbell of its own, not a waiter's: a notice is a datagram
that names the lock (its handle) and the mode wanted (``notice``), read with
``Doorbell.notices``.
"""

from __future__ import annotations

import math
import os
import select
import socket
import struct
from collections.abc import Callable, Collection, Iterable

_PREFIX = b"\0dls-bell-"
_ringer: socket.socket | None = None
_ringer_pid = 0
#: A blocking notice: its mark, the blocking lock's handle, the mode wanted.
_NOTICE = struct.Struct("=cQB")


def _queue_limit() -> int:
    """How many datagrams a unix socket queues before the next sent is dropped (net.unix.max_dgram_qlen)."""
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen", "rb") as f:
            return max(1, int(f.read()))
    except (OSError, ValueError):
        return 10


#: Datagrams a doorbell's queue holds (10 by default): a burst of more notices loses some (``overflowed``).
QUEUE_LIMIT = _queue_limit()


def readable(fds: Iterable[int], timeout: float | None) -> set[int]:
    """Which of ``fds`` become readable within ``timeout`` seconds (None: no limit). poll, not select: a
    process may have more than 1024 descriptors open (select refuses any numbered 1024 or more)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else math.ceil(max(0.0, timeout) * 1000)
    return {fd for fd, _ in poller.poll(ms)}


def address(token: int) -> bytes:
    return _PREFIX + b"%016x" % token


class Doorbell:
    """A waiter's doorbell; ``token`` goes into its waiting slots.

    The token is 63 random bits read with ``os.urandom`` (what ``secrets.randbits`` reads, without the
    random module's Python code: every lock server makes a doorbell as it starts, and each object it runs
    through costs it a page copied from the listener)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        while True:
            self.token = int.from_bytes(os.urandom(8), "little") >> 1 or 1
            try:
                self.sock.bind(address(self.token))
                break
            except OSError:
                continue
        self.sock.setblocking(False)
        #: Whether the last ``notices`` read a full queue (see there).
        self.overflowed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def wait(self, timeout: float | None, also: Collection[int] = ()) -> set[int]:
        """Sleep until rung, or one of the descriptors ``also`` is readable, or ``timeout`` seconds pass: the
        descriptors found readable (empty at the timeout), this doorbell's (drained) among them when rung."""
        mine = self.sock.fileno()
        ready = readable([mine, *also], timeout)
        if mine in ready:
            self.drain()
        return ready

    def drain(self) -> None:
        try:
            while True:
                self.sock.recv(64)
        except BlockingIOError:
            pass

    def notices(self) -> list[tuple[int, int]]:
        """The blocking notices that came (``notice``), each (the blocking lock's handle, the mode wanted), in
        the order sent; other rings are dropped. ``overflowed`` then says whether the queue may have been full,
        notices sent meanwhile lost (the holder asks the table which are due: ``LockTable.notices_due``)."""
        got = []
        read = 0
        try:
            while True:
                data = self.sock.recv(64)
                read += 1
                if len(data) == _NOTICE.size and data[:1] == b"B":
                    _, handle, mode = _NOTICE.unpack(data)
                    got.append((handle, mode))
        except BlockingIOError:
            pass
        self.overflowed = read >= QUEUE_LIMIT
        return got

    def close(self) -> None:
        self.sock.close()


class NoticeBell(Doorbell):
    """A holder's doorbell of blocking notices, which knows the notices it has passed on: the holder (a lock
    server, a LocalClient's notice thread) hears them with ``heard`` and tells each on, none lost, none twice."""

    def __init__(self) -> None:
        super().__init__()
        #: The locks whose notice was passed on, while the table says it stands.
        self._told: set[int] = set()

    def heard(self, due: Callable[[], list[tuple[int, int]]]) -> list[tuple[int, int]]:
        """The notices to pass on now, each (handle, mode wanted). After a full queue, which may have lost some,
        ``due()`` (the table's ``notices_due`` of the holder's locks) says which stand; those not passed on yet
        are added (and a lock no longer due may be told of again)."""
        notices = self.notices()
        if self.overflowed:
            stand = due()
            self._told &= {handle for handle, _ in stand}
            named = {handle for handle, _ in notices}
            notices += [(handle, mode) for handle, mode in stand if handle not in self._told and handle not in named]
        self._told.update(handle for handle, _ in notices)
        return notices

    def forget(self, handle: int) -> None:
        """The lock ``handle`` is gone: a later notice under its handle is another's."""
        self._told.discard(handle)


def ring(token: int) -> None:
    """Wake the waiter behind ``token``; a waiter that has gone is no error."""
    _send(token, b"!")


def notice(token: int, handle: int, mode: int) -> None:
    """Tell the holder behind ``token`` that its lock ``handle`` blocks a request for ``mode``; a holder that
    has gone, or whose queue is full, is no error (it is told again when the situation next changes)."""
    _send(token, _NOTICE.pack(b"B", handle, mode))


def _send(token: int, data: bytes) -> None:
    global _ringer, _ringer_pid
    if _ringer is None or _ringer_pid != os.getpid():
        _ringer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _ringer.setblocking(False)
        _ringer_pid = os.getpid()
    try:
        _ringer.sendto(data, address(token))
    except OSError:
        pass  # gone (ECONNREFUSED) or already has rings queued (EAGAIN)

"""A fake lock service in-process: many connections (each a FakeService) sharing one table of locks, with
the lock-delay and Reclaim of a real service, for the client's recovery rules without a daemon.

- A record lock is granted unless another connection holds it (every mode exclusive: enough for the
  client's rules); a conflict is refused at once when the request would not wait, else the request
  waits, first come first served, until the record is freed or its timeout ends. A lock the same
  connection holds is converted (same handle).
- ``drop(n)`` ends connection n as a killed lock server would: its locks are KEPT for the lock-delay (they
  still conflict), then freed; a client that closes its end frees its locks at once.
- ``Reclaim`` of a kept lock by its handle, from the same client (port and pid of its Hello) for the same
  record, makes it the new connection's; anything else is answered Error NOT_HELD.
- ``unreachable`` refuses new connections (the service is down); ``connect`` is what a Client is given.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from dls_proto import (
    ALL_THREADS,
    WAIT_FOREVER,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Granted,
    HolderState,
    Lock,
    Message,
    Reclaim,
    Refused,
    RefuseReason,
    Server,
    Status,
    StatusReply,
    Unlock,
    UnlockAll,
    Unlocked,
)

from .fake_service import FakeService, Reply

VALUE = 0x1234


@dataclass
class _Held:
    handle: int
    record: tuple[int, bytes]
    mode: int
    thread: int
    client: tuple[int, int]  # the port and pid its client said in Hello
    owner: FakeService | None  # None while kept
    kept_until: float = 0.0


@dataclass
class _Waiter:
    fake: FakeService
    request: Lock
    timer: threading.Timer | None


class FakeLockService:
    """One fake lock service (see the module docstring); ``first_handle`` sets apart the handles of two."""

    def __init__(self, lock_delay_ms: int = 15000, first_handle: int = 100) -> None:
        self.lock_delay_ms = lock_delay_ms
        self._mutex = threading.RLock()
        self._held: dict[int, _Held] = {}
        self._waiters: list[_Waiter] = []
        self._handles = itertools.count(first_handle)
        self._timers: list[threading.Timer] = []
        #: Every connection made, in order.
        self.connections: list[FakeService] = []
        #: Connection attempts, refused ones included.
        self.attempts = 0
        #: Refuse new connections, as a service that is down.
        self.unreachable = False
        #: Every Reclaim received.
        self.reclaims: list[Reclaim] = []
        #: Seconds before a connection its client closed is seen closed (its locks freed), as a busy lock
        #: server reads the end of its connection a moment late.
        self.close_seen_after = 0.0

    # -- what the test does -------------------------------------------------------------

    def connect(self, server: Server | None = None, timeout: float = 5.0) -> socket.socket:
        """A new connection (a Client's ``connect``); ConnectionRefusedError while ``unreachable``."""
        with self._mutex:
            self.attempts += 1
            if self.unreachable:
                raise ConnectionRefusedError(111, "Connection refused")
            made: list[FakeService] = []
            fake = FakeService(lock_delay_ms=self.lock_delay_ms, answer=lambda request: self._answer(made[0], request),
                               on_end=lambda by_service: self._ended(made[0], by_service))
            made.append(fake)
            self.connections.append(fake)
            return fake.client_socket

    def drop(self, index: int = -1) -> None:
        """End connection ``index`` as a killed lock server would: its locks are kept for the lock-delay."""
        self.connections[index].close()

    def forget_kept(self) -> None:
        """Free every kept lock now, as a service restarted without its table (or past its lock-delay)."""
        with self._mutex:
            for held in [h for h in self._held.values() if h.owner is None]:
                self._held.pop(held.handle)
            self._serve_waiters()

    def holder(self, key: bytes) -> FakeService | str | None:
        """Who holds record ``key`` (of any file): its connection, "kept", or None."""
        with self._mutex:
            self._expire()
            for held in self._held.values():
                if held.record[1] == key:
                    return held.owner or "kept"
            return None

    def keys(self) -> list[bytes]:
        """The records held (kept ones included), sorted."""
        with self._mutex:
            self._expire()
            return sorted(held.record[1] for held in self._held.values())

    def requests(self, kind: type[Message]) -> list[Message]:
        """Every request of ``kind`` received, on every connection, in the order of the connections."""
        return [m for fake in self.connections for m in fake.received if isinstance(m, kind)]

    def stop(self) -> None:
        with self._mutex:
            for timer in self._timers + [w.timer for w in self._waiters if w.timer is not None]:
                timer.cancel()
        for fake in self.connections:
            fake.stop()

    # -- the service ----------------------------------------------------------------------

    def _answer(self, fake: FakeService, request: Message) -> Sequence[Reply]:
        with self._mutex:
            self._expire()
            if isinstance(request, Lock):
                return self._lock(fake, request)
            if isinstance(request, Unlock):
                held = self._held.get(request.handle)
                if held is None or held.owner is not fake:
                    return [Error(request.request_id, ErrorCode.NOT_HELD, f"handle {request.handle} not held")]
                self._free(held)
                return []
            if isinstance(request, UnlockAll):
                mine = [h for h in self._held.values()
                        if h.owner is fake and request.thread_id in (ALL_THREADS, h.thread)]
                for held in mine:
                    self._free(held)
                return [Unlocked(request.request_id, len(mine))]
            if isinstance(request, Reclaim):
                return [self._reclaim(fake, request)]
            if isinstance(request, Status):
                for held in self._held.values():
                    if held.record == (request.inode, request.key):
                        state = HolderState.MINE if held.owner is fake else HolderState.OTHER
                        return [StatusReply(request.request_id, state, held.mode, 1, held.client[0], held.client[1],
                                            held.thread, "127.0.0.1")]
                return [StatusReply(request.request_id, HolderState.FREE, 0, 0, 0, 0, 0, "")]
            if isinstance(request, Echo):
                return [EchoReply(request.request_id, request.data)]
            return []  # InfoPut: kept, unanswered

    def _lock(self, fake: FakeService, request: Lock) -> Sequence[Reply]:
        record = (request.inode, request.key)
        held = self._holding(record)
        if held is None:
            return [self._grant(fake, request)]
        if held.owner is fake:
            held.mode = request.mode
            return [Granted(request.request_id, held.handle, held.mode, VALUE)]
        if request.timeout_ms == 0:
            return [Refused(request.request_id, RefuseReason.BUSY, held.mode, 1, held.client[0], held.client[1],
                            held.thread, "127.0.0.1")]
        timer = None
        if request.timeout_ms != WAIT_FOREVER:
            timer = threading.Timer(request.timeout_ms / 1000, self._timed_out, (fake, request))
            timer.daemon = True
            timer.start()
        self._waiters.append(_Waiter(fake, request, timer))
        return []

    def _grant(self, fake: FakeService, request: Lock) -> Granted:
        assert fake.hello is not None
        handle = next(self._handles)
        self._held[handle] = _Held(handle, (request.inode, request.key), request.mode, request.thread_id,
                                   (fake.hello.port, fake.hello.pid), fake)
        return Granted(request.request_id, handle, request.mode, VALUE)

    def _reclaim(self, fake: FakeService, request: Reclaim) -> Message:
        self.reclaims.append(request)
        assert fake.hello is not None
        held = self._held.get(request.handle)
        if (held is None or held.owner is not None or held.client != (fake.hello.port, fake.hello.pid)
                or held.record != (request.inode, request.key) or held.mode != request.mode):
            return Error(request.request_id, ErrorCode.NOT_HELD, f"handle {request.handle} is not kept for this client")
        held.owner, held.kept_until, held.thread = fake, 0.0, request.thread_id
        return Granted(request.request_id, held.handle, held.mode, VALUE)

    def _holding(self, record: tuple[int, bytes]) -> _Held | None:
        return next((h for h in self._held.values() if h.record == record), None)

    def _free(self, held: _Held) -> None:
        self._held.pop(held.handle, None)
        self._serve_waiters()

    def _serve_waiters(self) -> None:
        for waiter in list(self._waiters):
            if waiter.fake.closed_by_service or waiter.fake.closed_by_client.is_set():
                self._waiters.remove(waiter)
            elif self._holding((waiter.request.inode, waiter.request.key)) is None:
                self._waiters.remove(waiter)
                if waiter.timer is not None:
                    waiter.timer.cancel()
                waiter.fake.send(self._grant(waiter.fake, waiter.request))

    def _timed_out(self, fake: FakeService, request: Lock) -> None:
        with self._mutex:
            for waiter in self._waiters:
                if waiter.request is request:
                    self._waiters.remove(waiter)
                    held = self._holding((request.inode, request.key))
                    mode, port, pid, thread = (0, 0, 0, 0) if held is None else (
                        held.mode, held.client[0], held.client[1], held.thread)
                    fake.send(Refused(request.request_id, RefuseReason.TIMEOUT, mode, 1, port, pid, thread,
                                      "127.0.0.1"))
                    return

    def _ended(self, fake: FakeService, by_service: bool) -> None:
        """A connection ended: by the service (a lock server killed: its locks kept), or by its client (freed)."""
        if not by_service and self.close_seen_after:
            time.sleep(self.close_seen_after)
        with self._mutex:
            self._waiters = [w for w in self._waiters if w.fake is not fake]
            until = time.monotonic() + self.lock_delay_ms / 1000
            for held in [h for h in self._held.values() if h.owner is fake]:
                if by_service and self.lock_delay_ms:
                    held.owner, held.kept_until = None, until
                else:
                    self._held.pop(held.handle)
            if by_service and self.lock_delay_ms:
                timer = threading.Timer(self.lock_delay_ms / 1000 + 0.01, self._expire_and_serve)
                timer.daemon = True
                timer.start()
                self._timers.append(timer)
            self._serve_waiters()

    def _expire(self) -> None:
        now = time.monotonic()
        for held in [h for h in self._held.values() if h.owner is None and h.kept_until <= now]:
            self._held.pop(held.handle)

    def _expire_and_serve(self) -> None:
        with self._mutex:
            self._expire()
            self._serve_waiters()

"""A lock server: one process, one thread, one client connection.

It takes locks in the table on its client's behalf, answers its queries, and
when the client goes away (EOF, a reset, a dead host found by keepalive, or
garbage on the wire) it releases everything the client held and exits.

It sleeps in ``recv`` while no request of its client waits; while some do, it
sleeps in ``select`` on the socket and its doorbell, so a waiting request
neither blocks the client's other requests nor costs CPU.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any

from dls_proto import ALL_THREADS as WIRE_ALL_THREADS
from dls_proto import (
    NEED_DATA,
    WAIT_FOREVER,
    Connection,
    ConnectionClosed,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Event,
    Granted,
    Hello,
    InfoGet,
    InfoPut,
    InfoSnapshot,
    Lock,
    LockFlag,
    Mechanism,
    Message,
    NeedData,
    Refused,
    RefuseReason,
    RemoteProtocolError,
    Role,
    Status,
    StatusReply,
    UnknownMessage,
    Unlock,
    UnlockAll,
    Unlocked,
    Waiting,
    Welcome,
    choose_version,
)
from dls_proto.transport import SpinningReader
from dls_shm import (
    RECHECK_INTERVAL,
    Conflict,
    Doorbell,
    Grant,
    GroupFull,
    Holder,
    LockTable,
    NotHeld,
    Owner,
    Queued,
    TableError,
    pack_ip,
    unpack_ip,
)

from . import info
from .context import ServerContext

#: TCP keepalive: first probe after this idle time, then every interval, give up after count.
KEEPALIVE = (5, 2, 5)  # a silent dead host is found within about 15 s


class ClientGone(Exception):
    """The conversation is over; the reason says how it ended."""


@dataclass
class _Pending:
    request: Lock
    handle: int
    holder: Holder
    started: float
    deadline: float | None
    next_interim: float | None


class LockServer:
    def __init__(self, sock: socket.socket, peer: tuple[str, int], ctx: ServerContext) -> None:
        self.sock = sock
        self.peer = peer
        self.ctx = ctx
        self.log = ctx.log
        self.conn = Connection(Role.SERVER, max_frame=ctx.limits.max_frame)
        self.pid = os.getpid()
        self.hello: Hello | None = None
        self.held: dict[int, int] = {}  # wire handle (= table handle) -> thread id
        self.pending: dict[int, _Pending] = {}  # request id -> waiting request
        self.owners: dict[int, Owner] = {}
        self._bell: Doorbell | None = None
        self.ip = pack_ip(peer[0]) if peer[0] else pack_ip("0.0.0.0")  # noqa: S104 - an address to display, not to bind
        self.info_path: str | None = None

    @property
    def table(self) -> LockTable:
        table = self.ctx.table
        if table is None:
            raise TableError("this lock server has no lock table (OS file locks are not served yet)")
        return table

    # -- the conversation ------------------------------------------------------

    def run(self) -> int:
        self._configure_socket()
        try:
            self._greet()
            self._loop()
        except ClientGone as gone:
            self.log.info("client %s closed: %s", self._who(), gone)
        except RemoteProtocolError as exc:
            self.log.warning("closing connection from %s: %s", self._who(), exc)
            self._send_quietly(Error(0, ErrorCode.PROTOCOL, str(exc)))
        except TimeoutError:
            self.log.warning("closing connection from %s: no Hello within %s s", self._who(),
                             self.ctx.limits.handshake_timeout)
        except (ConnectionError, OSError) as exc:
            self.log.info("connection from %s lost: %s", self._who(), exc)
        finally:
            released = self.release_everything()
            if released:
                self.log.info("released %d lock(s) of %s", released, self._who())
            self.sock.close()
        return 0

    def _configure_socket(self) -> None:
        sock = self.sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)

    def _who(self) -> str:
        hello = self.hello
        where = f"{self.peer[0]}:{self.peer[1]}"
        return f"{where} (port {hello.port}, pid {hello.pid})" if hello else where

    def _greet(self) -> None:
        self.sock.settimeout(self.ctx.limits.handshake_timeout)
        event = self._next_event()
        self.sock.settimeout(None)
        if not isinstance(event, Hello):
            raise ClientGone("closed before Hello")
        version = choose_version(event)
        if version is None:
            self._send(Error(event.request_id, ErrorCode.VERSION,
                             f"client speaks versions {event.min_version}..{event.max_version}, server speaks 1..1"))
            raise ClientGone("no common protocol version")
        self.hello = event
        mechanism = Mechanism.TABLE if self.ctx.table is not None else Mechanism.OSLOCKS
        self._send(Welcome(event.request_id, version, mechanism, 0, self.pid, self.ctx.limits.max_frame,
                           self.peer[0], socket.gethostname()))
        self.log.info("client %s connected", self._who())

    def _next_event(self) -> Event:
        """Block until one event is complete (used for the greeting only)."""
        while True:
            event = self.conn.next_event()
            if not isinstance(event, NeedData):
                return event
            self.conn.receive_data(self.sock.recv(65536))

    def _loop(self) -> None:
        """The hot loop: Lock and Unlock are handled inline, everything else by ``_handle``."""
        conn = self.conn
        read = SpinningReader(self.sock).read
        sendall = self.sock.sendall
        receive = conn.receive_data
        next_event = conn.next_event
        send = conn.send
        handle = self._handle
        held = self.held
        owners = self.owners
        table = self.ctx.table
        lock = table.lock if table is not None else None
        unlock = table.unlock if table is not None else None
        limit = self.ctx.limits.max_locks_per_client
        token = self._doorbell().token
        while True:
            # Events first: bytes that came with the Hello are already buffered.
            while True:
                event = next_event()
                kind = type(event)
                if kind is Lock and lock is not None and len(held) < limit and event.mode <= 5:  # type: ignore[union-attr]
                    req: Lock = event  # type: ignore[assignment]
                    owner = owners.get(req.thread_id) or self._owner(req.thread_id)
                    try:
                        result = lock(owner, req.inode, req.device, req.key, req.mode,
                                      wait_token=token if req.timeout_ms else 0)
                    except TableError as exc:
                        self._table_error(req, exc)
                        continue
                    if type(result) is Grant:
                        held[result.handle] = req.thread_id
                        sendall(send(Granted(req.request_id, result.handle, result.mode, result.value)))
                    else:
                        self._not_granted(req, result)
                elif kind is Unlock and unlock is not None:
                    h = event.handle  # type: ignore[union-attr]
                    if held.pop(h, None) is None:
                        self._send(Error(event.request_id, ErrorCode.NOT_HELD,  # type: ignore[union-attr]
                                         f"lock handle {h:#x} is not held"))
                        continue
                    try:
                        unlock(h)
                    except NotHeld as exc:
                        self.log.warning("client %s: %s", self._who(), exc)
                        self._send(Error(event.request_id, ErrorCode.NOT_HELD, str(exc)))  # type: ignore[union-attr]
                elif event is NEED_DATA:
                    break
                else:
                    try:
                        handle(event)  # type: ignore[arg-type]
                    except TableError as exc:  # no table (OS-lock mode), or it was removed
                        self.log.error("client %s: %s", self._who(), exc)
                        self._send(Error(getattr(event, "request_id", 0), ErrorCode.INTERNAL, str(exc)))
            if self.pending:
                self._wait_with_pending()
            else:
                receive(read())

    def _wait_with_pending(self) -> None:
        """Sleep on the socket and the doorbell until either speaks or a timer is due."""
        now = time.monotonic()
        due = min([now + RECHECK_INTERVAL, *self._timers()])
        bell = self._doorbell()
        watched: list[Any] = [self.sock, bell]
        readable, _, _ = select.select(watched, [], [], max(0.0, due - now))
        if bell in readable or not readable:
            bell.drain()
            self._retry_pending()
        if self.sock in readable:
            self.conn.receive_data(self.sock.recv(65536))

    def _timers(self) -> list[float]:
        out = []
        for p in self.pending.values():
            if p.deadline is not None:
                out.append(p.deadline)
            if p.next_interim is not None:
                out.append(p.next_interim)
        return out

    def _send(self, message: Message) -> None:
        self.sock.sendall(self.conn.send(message))

    def _send_quietly(self, message: Message) -> None:
        try:
            self._send(message)
        except Exception:  # noqa: S110 - the connection is being dropped anyway
            pass

    def _doorbell(self) -> Doorbell:
        if self._bell is None:
            self._bell = Doorbell()
        return self._bell

    # -- requests ----------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if isinstance(event, Lock):
            self._lock(event)
        elif isinstance(event, Unlock):
            self._unlock(event)
        elif isinstance(event, ConnectionClosed):
            raise ClientGone("end of stream")
        elif isinstance(event, UnlockAll):
            count = self._unlock_all(None if event.thread_id == WIRE_ALL_THREADS else event.thread_id)
            self._send(Unlocked(event.request_id, count))
        elif isinstance(event, Status):
            self._status(event)
        elif isinstance(event, Echo):
            self._send(EchoReply(event.request_id, event.data))
        elif isinstance(event, InfoPut):
            self._info_put(event)
        elif isinstance(event, InfoGet):
            self._send(InfoSnapshot(event.request_id, info.snapshot(self.ctx)))
        elif isinstance(event, UnknownMessage):
            self.log.warning("client %s sent unknown message kind 0x%02x", self._who(), event.kind)
            self._send(Error(event.request_id, ErrorCode.UNKNOWN_MESSAGE,
                             f"message kind 0x{event.kind:02x} is not known to this server"))
        else:
            raise RemoteProtocolError(f"unexpected {type(event).__name__}")

    def _owner(self, thread: int) -> Owner:
        owner = self.owners.get(thread)
        if owner is None:
            hello = self.hello
            assert hello is not None
            owner = self.owners[thread] = Owner(self.pid, thread, hello.port, hello.pid, self.ip)
        return owner

    def _lock(self, req: Lock) -> None:
        """A Lock the hot loop left: checks that failed, or the slow way round."""
        if req.mode > 5:
            self._send(Error(req.request_id, ErrorCode.BAD_REQUEST, f"lock mode {req.mode} is not one of 0..5"))
            return
        limit = self.ctx.limits.max_locks_per_client
        if len(self.held) >= limit:
            self.log.warning("client %s is over the limit of %d locks", self._who(), limit)
            self._send(Error(req.request_id, ErrorCode.LIMIT, f"limit of {limit} locks per client reached"))
            return
        try:
            result = self.table.lock(self._owner(req.thread_id), req.inode, req.device, req.key, req.mode,
                                     wait_token=self._doorbell().token if req.timeout_ms else 0)
        except TableError as exc:
            self._table_error(req, exc)
            return
        if type(result) is Grant:
            self.held[result.handle] = req.thread_id
            self._send(Granted(req.request_id, result.handle, result.mode, result.value))
        else:
            self._not_granted(req, result)

    def _not_granted(self, req: Lock, result: Grant | Conflict | Queued) -> None:
        if isinstance(result, Conflict):
            self._send(self._refusal(req.request_id, RefuseReason.BUSY, result.holder))
        else:
            assert isinstance(result, Queued)
            self._queue(req, result)

    def _table_error(self, req: Lock, exc: TableError) -> None:
        self.log.error("client %s: %s", self._who(), exc)
        code = ErrorCode.GROUP_FULL if isinstance(exc, GroupFull) else ErrorCode.INTERNAL
        self._send(Error(req.request_id, code, str(exc)))

    def _queue(self, req: Lock, queued: Queued) -> None:
        now = time.monotonic()
        deadline = None if req.timeout_ms == WAIT_FOREVER else now + req.timeout_ms / 1000
        interim = not req.flags & LockFlag.NO_INTERIM
        pending = _Pending(req, queued.handle, queued.holder, now, deadline,
                           now + self.ctx.limits.interim_period if interim else None)
        self.pending[req.request_id] = pending
        if interim:
            self._send(self._waiting(pending, now))

    def _retry_pending(self) -> None:
        now = time.monotonic()
        for rid, p in list(self.pending.items()):
            try:
                result = self.table.retry(p.handle)
            except NotHeld:
                # Tidied away under us: take the request again from the top.
                del self.pending[rid]
                self._lock(p.request)
                continue
            if isinstance(result, Grant):
                del self.pending[rid]
                self.held[result.handle] = p.request.thread_id
                self._send(Granted(rid, result.handle, result.mode, result.value))
                continue
            p.holder = result.holder
            if p.deadline is not None and now >= p.deadline:
                del self.pending[rid]
                self.table.cancel(p.handle)
                self._send(self._refusal(rid, RefuseReason.TIMEOUT, p.holder))
            elif p.next_interim is not None and now >= p.next_interim:
                p.next_interim = now + self.ctx.limits.interim_period
                self._send(self._waiting(p, now))

    def _unlock(self, req: Unlock) -> None:
        handle = req.handle
        if self.held.pop(handle, None) is None:
            self._send(Error(req.request_id, ErrorCode.NOT_HELD, f"lock handle {handle:#x} is not held"))
            return
        try:
            self.table.unlock(handle)
        except NotHeld as exc:
            self.log.warning("client %s: %s", self._who(), exc)
            self._send(Error(req.request_id, ErrorCode.NOT_HELD, str(exc)))

    def _unlock_all(self, thread: int | None) -> int:
        count = 0
        for rid, p in list(self.pending.items()):
            if thread is None or p.request.thread_id == thread:
                del self.pending[rid]
                self.table.cancel(p.handle)
                self._send(self._refusal(rid, RefuseReason.CANCELLED, p.holder))
        for handle, owner_thread in list(self.held.items()):
            if thread is None or owner_thread == thread:
                del self.held[handle]
                try:
                    self.table.unlock(handle)
                    count += 1
                except NotHeld:
                    pass
        return count

    def _status(self, req: Status) -> None:
        state, holder = self.table.status(self._owner(req.thread_id), req.inode, req.device, req.key)
        if holder is None:
            self._send(StatusReply(req.request_id, state, 0, 0, 0, 0, 0, ""))
        else:
            self._send(StatusReply(req.request_id, state, holder.mode, holder.pid, holder.port,
                                   holder.client_pid, holder.thread, unpack_ip(holder.ip)))

    def _info_put(self, req: InfoPut) -> None:
        hello = self.hello
        assert hello is not None
        try:
            self.info_path = info.write_client_info(self.ctx.instance, hello, self.peer[0], self.pid, req.payload)
        except (OSError, ValueError) as exc:
            self.log.warning("client %s: cannot keep its lock information: %s", self._who(), exc)
            self._send(Error(req.request_id, ErrorCode.BAD_REQUEST, f"lock information refused: {exc}"))

    @staticmethod
    def _refusal(rid: int, reason: int, h: Holder) -> Refused:
        return Refused(rid, reason, h.mode, h.pid, h.port, h.client_pid, h.thread, unpack_ip(h.ip))

    @staticmethod
    def _waiting(p: _Pending, now: float) -> Waiting:
        h = p.holder
        waited = min(int((now - p.started) * 1000), 0xFFFFFFFF)
        return Waiting(p.request.request_id, waited, h.mode, h.pid, h.port, h.client_pid, h.thread,
                       unpack_ip(h.ip))

    # -- the end -------------------------------------------------------------------

    def release_everything(self) -> int:
        """Free every lock and request of this client, whatever state the conversation is in."""
        if self.ctx.table is None:
            return 0
        count = 0
        try:
            for p in self.pending.values():
                self.table.cancel(p.handle)
            self.pending.clear()
            for handle in self.held:
                try:
                    self.table.unlock(handle)
                    count += 1
                except NotHeld:
                    pass
            self.held.clear()
            count += self.table.release_owner(self.pid)  # the safety net: anything we lost track of
        except TableError as exc:
            self.log.error("releasing the locks of %s: %s", self._who(), exc)
        finally:
            if self.info_path:
                info.remove_client_info(self.info_path)
            if self._bell is not None:
                self._bell.close()
        return count


class Stopped(ClientGone):
    """SIGTERM: the operator stops the service (jdls -k); release and go."""


def _stop(signum: int, _frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the release short
    raise Stopped(f"stopped by {signal.Signals(signum).name}")


def serve(sock: socket.socket, peer: tuple[str, int], ctx: ServerContext) -> int:
    """Serve one client connection until it goes away; release its locks; return an exit status.

    SIGTERM ends the conversation like a client leaving: the handler raises in
    the main loop, whose ``finally`` releases the client's locks.
    """
    signal.signal(signal.SIGTERM, _stop)
    return LockServer(sock, (peer[0], peer[1]), ctx).run()

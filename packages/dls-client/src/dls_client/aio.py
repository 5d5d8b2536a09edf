"""The asyncio client: ``AsyncClient``, Client's calls awaited, on one connection and no thread.

    from dls_client.aio import AsyncClient
    async with AsyncClient() as client:
        async with client.lock("data/FBNK.ACCOUNT", "USD163170001") as held:
            ...  # the record is this task's on every application server

A Client's calls block their thread for a round trip, and for as long as a lock
waits; an asyncio program would need a worker thread for each lock it waits for.
This client speaks the same protocol through dls-proto's sans-IO ``Connection``
(the very one a Client's Channel uses) over asyncio streams: each request is
written at once, one reader task routes every reply by its request id to the
future of the task that awaits it, and the lock server keeps any number of one
connection's requests waiting together. So a task waiting for a lock costs a
future, never the loop: one loop may wait for thousands of locks at once.

Each task is an owner, as each thread is to a Client: the protocol's thread
field carries a number of the task's own, so two tasks conflict as two threads
do, and a task that locks a record it holds converts its lock (the HeldLock it
has, in its new mode). Cancelling a task that waits (``task.cancel()``,
``asyncio.timeout``) sends Cancel for its request (protocol version 4); if the
grant came first, the lock is released: a cancelled lock is never left held. A
``timeout=`` is the request's own, counted by the service, as a Client's.

What it does not do (yet): SERVER2, a resilient pair (Unsupported, said when the
client is made); reclaiming locks after a lost connection: every request waiting
fails with ServiceUnavailable, and every lock held through the connection is
lost (LockLost at its next call; the next request connects again); binary and
execution locks, blocking notices, and lock information for show-item-locks.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Self

from dls_proto import (
    ALL_THREADS,
    CLIENT_MAX_FRAME,
    HEADER_SIZE,
    Acquired,
    Connection,
    ConnectionClosed,
    Convert,
    Echo,
    Error,
    Hello,
    LocalProtocolError,
    Lock,
    LockFlag,
    Mechanism,
    Message,
    Mode,
    NeedData,
    Release,
    RemoteProtocolError,
    Role,
    Server,
    Settings,
    Status,
    StatusReply,
    UnknownMessage,
    Unlock,
    UnlockAll,
    Unlocked,
    ValueFlag,
    Waiting,
    Welcome,
    identity,
)
from dls_proto import Cancel as CancelRequest
from dls_proto.text import amount

from .base import kind_refused
from .channel import CONNECT_TIMEOUT, SETTINGS_VERSION, VERSION2_ACK_TIMEOUT, _reason, tune
from .client import _KINDS_OF, LOCK_MANAGER_VERSION, _limit, _read_block, _refusal
from .config import Config, port_number
from .errors import (
    AcknowledgementTimeout,
    DlsError,
    Holder,
    InvalidRequest,
    NotWritable,
    ServiceUnavailable,
    Unsupported,
    describe,
)
from .locks import REMOTE_DEVICE, FileLike, FileRef, Key, LockKind, LockState, check_timeout, key_bytes
from .replies import Grant, failure, holder, is_grant
from .trace import Tracer, reply_line, request_line

#: The first owner number a client gives a task: far above every native thread id (Linux's pid_max is at most
#: 2**22), so that the service's tables and an operator never take a task for a thread.
FIRST_OWNER = 1 << 30
#: Bytes the connection's write buffer may hold before a request waits for it to drain.
WRITE_HIGH_WATER = 256 * 1024


class _Box:
    """The replies to one request not yet taken by the task that awaits them, and its future while it waits."""

    __slots__ = ("messages", "waiter")

    def __init__(self) -> None:
        self.messages: deque[Message] = deque()
        self.waiter: asyncio.Future[Message] | None = None


class _Link:
    """One greeted connection to one lock server, read by its own task. Once failed it stays failed (the
    client opens another): every call raises the same ServiceUnavailable."""

    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ack_timeout: float | None, stray: Callable[[_Link, Message], None],
                 lost: Callable[[_Link, str, bool], None], tracer: Tracer) -> None:
        self.server = server
        #: The trace's line writer while the trace is on (JDLS VERBOSE or TRACE=), else None: a Client's lines.
        self._trace = tracer.verbose if tracer.enabled else None
        self.reader = reader
        self.writer = writer
        self.ack_timeout = ack_timeout
        self.conn = Connection(Role.CLIENT, max_frame=CLIENT_MAX_FRAME)
        self.welcome: Welcome | None = None
        self.max_frame = CLIENT_MAX_FRAME
        self.failure: ServiceUnavailable | None = None
        self._stray = stray
        self._lost = lost
        self._ids = itertools.count(1)
        self._boxes: dict[int, _Box] = {}
        self._encoders: dict[type[Message], Callable[[Message], bytes]] = {}
        self._reading: asyncio.Task[None] | None = None
        #: Frames sent since the loop last ran its callbacks, written together by ``_flush``.
        self._outgoing: list[bytes] = []

    @classmethod
    async def open(cls, server: Server, hello: Hello, config: Config, stray: Callable[[_Link, Message], None],
                   lost: Callable[[_Link, str, bool], None], tracer: Tracer) -> _Link:
        """Connect to ``server`` (within CONNECT_TIMEOUT, TLS as ``config`` says), greet it (within the
        acknowledgement timeout, JDLS TIMEOUT), and start reading; ServiceUnavailable says why not."""
        context = config.ssl_context()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    server.host, server.port, ssl=context, server_hostname=server.host if context else None)
        except OSError as exc:  # TimeoutError too
            raise ServiceUnavailable(f"connection failed for host '{server.host}', service '{server.port}', "
                                     f"error {_reason(exc)}") from None
        tune(writer.get_extra_info("socket"))
        link = cls(server, reader, writer, None if config.wait else config.timeout, stray, lost, tracer)
        try:
            await link._greet(hello, config.timeout)
        except BaseException:
            writer.close()
            raise
        return link

    async def _greet(self, hello: Hello, timeout: float) -> None:
        self.writer.write(self.conn.send(hello))
        reply: Message | None = None
        try:
            async with asyncio.timeout(timeout):
                while reply is None:
                    event = self.conn.next_event()
                    if isinstance(event, NeedData):
                        self.conn.receive_data(await self.reader.read(65536))
                    elif isinstance(event, ConnectionClosed):
                        raise ServiceUnavailable(f"lock service {self.server} closed the connection")
                    elif not isinstance(event, UnknownMessage):
                        reply = event
        except TimeoutError:
            raise ServiceUnavailable(f"lock service {self.server} did not answer within "
                                     f"{amount(timeout, 'second')}") from None
        except OSError as exc:
            raise ServiceUnavailable(f"connection to lock service {self.server} failed: {_reason(exc)}") from None
        except RemoteProtocolError as exc:
            raise ServiceUnavailable(f"lock service {self.server} sent bad data: {exc}") from None
        if isinstance(reply, Error):
            raise ServiceUnavailable(f"lock service {self.server} refused the connection: {reply.reason}")
        if not isinstance(reply, Welcome):
            raise ServiceUnavailable(f"lock service {self.server} answered Hello with {type(reply).__name__}")
        self.welcome = reply
        self.max_frame = reply.max_frame or CLIENT_MAX_FRAME
        self._encoders = {cls: self.conn.encoder(cls) for cls in (Lock, Unlock)}
        if self.ack_timeout is not None:  # the interim Waiting messages must come within it (as a Channel says)
            if reply.version >= SETTINGS_VERSION:
                self.send(Settings(self.next_id(), 0, min(max(1, round(self.ack_timeout * 1000)), 0xFFFFFFFF)))
            else:
                self.ack_timeout = max(self.ack_timeout, VERSION2_ACK_TIMEOUT)
        self._reading = asyncio.get_running_loop().create_task(self._read_loop(), name=f"dls reader {self.server}")

    @property
    def version(self) -> int:
        assert self.welcome is not None
        return self.welcome.version

    def next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF or next(self._ids)

    # -- sending ------------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Write a message now (the stream keeps frames whole and in order); InvalidRequest for one that no
        frame, or this server, takes; the link's ServiceUnavailable once it failed."""
        if self.failure is not None:
            raise self.failure
        if self._trace is not None:
            self._trace(f"AsyncClient: to {self.server}: {request_line(message)}")
        encode = self._encoders.get(type(message))
        try:
            if encode is None:
                raise LocalProtocolError("checked by the connection")
            data = encode(message)
        except Exception:  # a field no frame can carry: the connection's checks say which
            try:
                data = self.conn.send(message)
            except LocalProtocolError as exc:
                raise InvalidRequest(f"cannot send a {type(message).__name__} request: {exc}") from None
        if len(data) - HEADER_SIZE > self.max_frame:
            raise InvalidRequest(f"a {type(message).__name__} request of {len(data) - HEADER_SIZE} bytes is more "
                                 f"than lock service {self.server} takes ({self.max_frame}, its --max-frame)")
        if self.writer.is_closing():
            raise self.fail(f"connection to lock service {self.server} was closed")
        outgoing = self._outgoing
        if not outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        outgoing.append(data)

    def _flush(self) -> None:
        """Write the frames sent meanwhile in one write (one system call): the requests of many tasks cost one
        send, for one turn of the loop (nothing when ``flush`` wrote them already)."""
        if not self._outgoing:
            return
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        if self.failure is None:
            self.writer.write(data)

    async def _drained(self) -> None:
        """Let the write buffer drain when it grew large (a service slower to read than the loop writes)."""
        if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            try:
                await self.writer.drain()
            except OSError as exc:
                raise self.fail(f"sending to lock service {self.server} failed: {_reason(exc)}") from None

    def unlock(self, handle: int) -> None:
        """An Unlock of the server's lock ``handle``: unanswered unless it fails (a failure is stray)."""
        self.send(Unlock(self.next_id(), handle))

    def flush(self) -> None:
        """Write what was sent now, not at the loop's next turn: a release that returned has left this process,
        whatever the caller does next (blocks the loop, ends it)."""
        if self._outgoing:
            self._flush()

    async def ask(self, request: Message) -> Message:
        """Send ``request`` and return its last reply (the interim Waiting ones passed over). If the caller is
        cancelled, or the service stays silent for the acknowledgement timeout, the request is withdrawn
        (``_abandon``) and that is raised."""
        rid = request.request_id
        box = self._boxes[rid] = _Box()
        try:
            self.send(request)
        except BaseException:
            del self._boxes[rid]
            raise
        try:
            await self._drained()
            reply = await self._next(box)
            while type(reply) is Waiting:
                reply = await self._next(box)
        except BaseException:
            self._abandon(rid, box)
            raise
        del self._boxes[rid]
        return reply

    async def confirmed(self, message: Message) -> Message | None:
        """Send ``message``, a request answered only when it fails (a Release), and learn whether it did: an
        Echo follows it, answered after it (the service answers in order). Its answer, or None."""
        rid = message.request_id
        box = self._boxes[rid] = _Box()
        try:
            self.send(message)
            await self.ask(Echo(self.next_id(), b""))
        finally:
            self._boxes.pop(rid, None)
        return box.messages[0] if box.messages else None

    async def _next(self, box: _Box) -> Message:
        """The next reply in ``box``; AcknowledgementTimeout after the acknowledgement timeout of silence (JDLS
        TIMEOUT), when the connection is given up, as a Client gives it up: its lock server frees what it held
        when it closes (a request left waiting there with it), so its locks are lost."""
        if box.messages:
            return box.messages.popleft()
        if self.failure is not None:
            raise self.failure
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        box.waiter = waiter
        if self.ack_timeout is None:
            return await waiter
        try:
            async with asyncio.timeout(self.ack_timeout):
                return await waiter
        except TimeoutError:
            said = f"lock service {self.server} did not answer within {amount(self.ack_timeout, 'second')}"
            self.fail(f"{said}: connection given up")
            raise AcknowledgementTimeout(said) from None

    def _abandon(self, rid: int, box: _Box) -> None:
        """Nobody awaits request ``rid`` any more: its replies from now on are stray (a grant released, see
        AsyncClient._stray), so are those already come but not taken; if its last reply has not come, a
        Cancel withdraws it on the service (version 4; an older service grants it, and the grant is released)."""
        self._boxes.pop(rid, None)
        came = list(box.messages)
        waiter = box.waiter
        if waiter is not None and waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            came.append(waiter.result())
        finished = False
        for message in came:
            if type(message) is not Waiting:
                finished = True
                self._stray(self, message)
        if finished or self.failure is not None or self.version < LOCK_MANAGER_VERSION:
            return
        try:
            self.send(CancelRequest(self.next_id(), rid))
        except DlsError:
            pass  # the connection is lost: the request went with it

    # -- receiving ----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Read the connection to its end, each reply to the box of its request (or stray)."""
        conn, read, boxes = self.conn, self.reader.read, self._boxes
        why, closed = f"lock service {self.server} closed the connection", False
        try:
            while True:
                conn.receive_data(await read(65536))
                while True:
                    event = conn.next_event()
                    if isinstance(event, NeedData):
                        break
                    if isinstance(event, ConnectionClosed):
                        return
                    if isinstance(event, UnknownMessage):
                        continue
                    if self._trace is not None:
                        self._trace(f"AsyncClient: from {self.server}: {reply_line(event)}")
                    box = boxes.get(event.request_id)
                    if box is None:
                        self._stray(self, event)
                        continue
                    waiter = box.waiter  # kept in the box: a task cancelled before it resumed leaves the
                    if waiter is not None and not waiter.done():  # reply there for _abandon
                        waiter.set_result(event)
                    else:
                        box.messages.append(event)
        except RemoteProtocolError as exc:
            why = f"lock service {self.server} sent bad data: {exc}"
        except OSError as exc:
            why = f"connection to lock service {self.server} failed: {_reason(exc)}"
        except asyncio.CancelledError:  # close(), or the loop ending (asyncio.run cancels what is left)
            why, closed = f"connection to lock service {self.server} was closed", True
            raise
        finally:
            self.fail(why, closed=closed)

    def fail(self, why: str, *, closed: bool = False) -> ServiceUnavailable:
        """The connection is lost (``closed``: closed by the client): every request waiting on it fails with
        the same ServiceUnavailable, the client is told (its locks are lost, or released when closed), the
        stream is closed. The first cause found is kept."""
        if self.failure is None:
            self.failure = ServiceUnavailable(why)
            for box in self._boxes.values():
                if box.waiter is not None and not box.waiter.done():
                    box.waiter.set_exception(self.failure)
            self.writer.close()
            self._lost(self, why, closed)
        return self.failure

    async def close(self) -> None:
        """Close the connection (the client's own doing) and wait until its reader ended."""
        self.fail(f"connection to lock service {self.server} was closed", closed=True)
        if self._reading is not None and self._reading is not asyncio.current_task():
            self._reading.cancel()
            try:
                await self._reading
            except asyncio.CancelledError:
                pass
        try:
            await self.writer.wait_closed()
        except OSError:
            pass  # closed on a failed connection: nothing more to say


class AsyncHeldLock(LockState):
    """A lock granted to a task: HeldLock's state (``mode``, ``token``, ``value_block``, ``lost``...), its
    calls awaited. Release it with ``await held.release()`` or by leaving its ``async with`` block."""

    __slots__ = ("client",)

    def __init__(self, client: AsyncClient, grant: Grant, file: FileRef, key: bytes, thread: int) -> None:
        super().__init__(grant.handle, file, key, grant.mode, grant.value, thread)
        self.client = client
        if type(grant) is Acquired:
            self.token = grant.token

    def ensure_held(self) -> None:
        """LockLost if the lock was lost (its connection was), DlsError if it was released; no round trip."""
        if self.lost_reason is not None:
            raise self.lost_error()
        if self.released:
            raise DlsError(f"lock {describe(self.file.path, self.key)} was released")

    async def convert(self, mode: int, *, wait: bool = True, timeout: float | None = None,
                      value_block: bytes | None = None, invalidate: bool = False) -> None:
        """Convert the lock to ``mode`` in place, as ``HeldLock.convert`` (the same rules and exceptions);
        cancelling the task withdraws a conversion that waits, the lock still held in its old mode (unless the
        conversion was granted that instant: ``mode`` says which)."""
        check_timeout(timeout)
        self.ensure_held()
        if value_block is not None or invalidate:
            self._may_write()
        await self.client._convert(self, mode, wait, timeout, value_block, invalidate)

    async def release(self, value_block: bytes | None = None, invalidate: bool = False) -> None:
        """Release the lock (writing the value block, as ``HeldLock.release``); LockLost (once) if it was lost
        meanwhile. Releasing again does nothing."""
        if self.released:
            return
        if self.lost_reason is None:
            if value_block is not None or invalidate:
                self._may_write()
            try:
                await self.client._release(self, value_block, invalidate)
            except (NotWritable, Unsupported, InvalidRequest):
                raise  # refused before anything was done: the lock is still held
            except BaseException:
                self.released = True
                raise
        self.released = True
        if self.lost_reason is not None:
            raise self.lost_error()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        if et is None:
            await self.release()  # LockLost if the lock was lost inside the block
            return
        try:
            await self.release()
        except DlsError:
            pass  # the body's own exception is the one the caller must see


class Locking(Coroutine[Any, Any, "AsyncHeldLock"]):
    """``client.lock(...)``: awaited, the lock (``held = await client.lock(...)``); entered, the lock until
    the block ends (``async with client.lock(...) as held``); a coroutine too, so ``asyncio.create_task``,
    ``asyncio.wait_for`` and ``asyncio.shield`` take it. Its owner is the task that called ``client.lock``,
    fixed then: those helpers run it in a task of their own (wait_for does on Python 3.11), whose lock it
    would otherwise be, so that the caller would then wait for its own lock."""

    __slots__ = ("_args", "_client", "_coro", "_held")

    def __init__(self, client: AsyncClient,
                 args: tuple[FileRef, bytes, int, bool, float | None, bool, int | None]) -> None:
        self._client = client
        self._args = args
        self._held: AsyncHeldLock | None = None
        # Made when first used: a Locking only entered (async with) never makes it, so no "never awaited".
        self._coro: Coroutine[Any, Any, AsyncHeldLock] | None = None

    def _request(self) -> Coroutine[Any, Any, AsyncHeldLock]:
        if self._coro is None:
            self._coro = self._client._lock(*self._args)
        return self._coro

    def __await__(self) -> Generator[Any, None, AsyncHeldLock]:
        return self._request().__await__()

    def send(self, value: Any) -> Any:
        return self._request().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        return self._request().throw(typ, val, tb)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    async def __aenter__(self) -> AsyncHeldLock:
        self._held = await self._request()
        return self._held

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        held, self._held = self._held, None
        if held is not None:
            await held.__aexit__(et, ev, tb)


class AsyncClient:
    """Record locks through the lock service JDLS names (or ``config``), for asyncio tasks: see the module.

    Made in or out of a loop; it connects at the first request, in the loop that makes it, and serves
    that loop only. ``close()`` (or leaving ``async with``) closes the connection: the service releases
    every lock of the client.
    """

    def __init__(self, config: Config | None = None) -> None:
        """``config`` defaults to JDLS's (ConfigurationError when it is not valid); Unsupported with SERVER2."""
        self.config = config if config is not None else (Config.from_environment() or Config())
        if self.config.server2 is not None:
            raise Unsupported("the asyncio client (dls_client.aio.AsyncClient) does not do SERVER2 (a resilient "
                              "pair of services) yet: use dls_client.Client, from a worker thread")
        self.port = port_number()
        flags = LockFlag.NO_INTERIM if self.config.wait else LockFlag.NONE
        if self.config.oslocks:
            flags |= LockFlag.OSLOCK
        self._flags = flags
        self._kinds = _KINDS_OF[self.config.lock]
        self.trace = Tracer(self.config)
        #: Errors the service reported for requests nobody waited for (a failed unlock).
        self.async_errors: list[Error] = []
        self._link: _Link | None = None
        self._opening = asyncio.Lock()
        #: The locks held, by handle: a grant under the handle of one of them is that lock, converted.
        self._live: dict[int, AsyncHeldLock] = {}
        #: Each task's owner number (the protocol's thread field), given at its first request.
        self._owners: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()
        self._numbers = itertools.count(FIRST_OWNER)

    # -- the connection --------------------------------------------------------------------------

    async def connect(self) -> Welcome:
        """Connect now, if no request has yet (the first request would): the lock server's Welcome."""
        welcome = (await self._connected()).welcome
        assert welcome is not None
        return welcome

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.failure is None

    async def _connected(self) -> _Link:
        link = self._link
        if link is not None and link.failure is None:
            return link
        async with self._opening:
            link = self._link
            if link is None or link.failure is not None:
                server = self.config.server
                self.trace.verbose(f"AsyncClient: Using host '{server.host}', service '{server.port}'")
                link = self._link = await _Link.open(server, identity.hello(port=self.port), self.config,
                                                     self._stray, self._lost, self.trace)
            return link

    def _lost(self, link: _Link, why: str, closing: bool) -> None:
        """``link`` failed or was closed: the locks held through it are lost (no lock server keeps them for a
        reconnection of this client), unless the client closed it (``closing``: then released)."""
        if link is not self._link:
            return
        self._link = None
        live, self._live = self._live, {}
        for held in live.values():
            if closing:
                held.released = True
            else:
                held.lose(f"the connection to lock service {link.server} was lost ({why})")
        if not closing:
            self.trace.error(f"AsyncClient: {why}")

    def _stray(self, link: _Link, message: Message) -> None:
        """A reply nobody awaits: a grant to a request given up (its task cancelled) is released, unless it
        converted a lock still held (the same task's lock again, a conversion); a failed Unlock's Error is
        kept and said; anything else (a cancelled request's refusal) was awaited by nobody."""
        if is_grant(message):
            held = self._live.get(message.handle)
            if held is None:
                try:
                    link.unlock(message.handle)
                except DlsError:
                    pass  # the connection is lost: the lock went with it
                return
            held.mode = message.mode
            if type(message) is Acquired:
                held.token = message.token
            return
        if isinstance(message, Error):
            self.async_errors.append(message)
            self.trace.error(f"AsyncClient: lock service reported for request {message.request_id}: "
                             f"{message.reason}")

    async def close(self) -> None:
        """Close the connection: the service releases every lock of this client (they count as released).
        Used again, the client connects again."""
        link = self._link
        if link is not None:
            await link.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _owner(self) -> int:
        """The calling task's owner number."""
        task = asyncio.current_task()
        if task is None:
            raise DlsError("the asyncio client is called from a task of a running loop")
        number = self._owners.get(task)
        if number is None:
            number = self._owners[task] = next(self._numbers) & 0xFFFFFFFF
        return number

    def _lock_manager(self, link: _Link, what: str) -> None:
        """Unsupported unless ``link``'s service can do ``what`` (as Client._lock_manager)."""
        welcome = link.welcome
        assert welcome is not None
        if welcome.version < LOCK_MANAGER_VERSION:
            raise Unsupported(f"lock service {link.server} speaks protocol version {welcome.version}, which lacks "
                              f"{what}: upgrade the service")
        if welcome.mechanism == Mechanism.OSLOCKS:
            raise Unsupported(f"lock service {link.server} locks with OS file locks (jdls -ibD), which cannot do "
                              f"{what}: a service with a lock table can")

    # -- locks -----------------------------------------------------------------------------------

    def lock(self, file: FileLike, key: Key, mode: int = Mode.EX, *, wait: bool = True,
             timeout: float | None = None, kind: LockKind = "internal", value_block: bool = False) -> Locking:
        """Take a record lock, as ``Client.lock`` (the same arguments but the thread-bound ones, the same
        exceptions): ``held = await client.lock(...)``, or ``async with client.lock(...) as held``. The
        calling task is its owner. ``timeout`` is the request's own (the service's). Cancelling the task
        while it waits withdraws the request (CancelledError; the lock never left held)."""
        if kind not in self._kinds:
            raise kind_refused(kind, self.config.lock)
        check_timeout(timeout)
        ref = file if isinstance(file, FileRef) else FileRef.of(file)
        try:  # the caller's, not that of a task a helper (wait_for, create_task) runs the request in
            owner: int | None = self._owner()
        except (RuntimeError, DlsError):  # called out of a task: the task that awaits it, then
            owner = None
        return Locking(self, (ref, key_bytes(key), mode, wait, timeout, value_block, owner))

    async def try_lock(self, file: FileLike, key: Key, mode: int = Mode.EX) -> AsyncHeldLock:
        """Take a record lock only if it is free now (LockRefused otherwise)."""
        return await self.lock(file, key, mode, wait=False)

    async def _lock(self, ref: FileRef, key: bytes, mode: int, wait: bool, timeout: float | None,
                    value_block: bool, owner: int | None) -> AsyncHeldLock:
        link = await self._connected()
        flags = self._flags
        if value_block:
            self._lock_manager(link, "value blocks")
            flags |= LockFlag.VALUE_BLOCK
        thread = self._owner() if owner is None else owner
        reply = await link.ask(Lock(link.next_id(), mode, flags, _limit(wait, timeout, None), thread, ref.inode,
                                    REMOTE_DEVICE, key, ref.path))
        if not is_grant(reply):
            raise _refusal(reply, None, describe(ref.path, key))
        held = AsyncHeldLock(self, reply, ref, key, thread)
        if value_block and type(reply) is Acquired:
            _read_block(held, reply)
        old = self._live.get(held.handle)
        if old is None or old.released or old.lost:
            self._live[held.handle] = held
            return held
        old.took_over(held)  # the task locked the record again: its lock, converted
        return old

    def _through(self, held: AsyncHeldLock) -> _Link:
        """The link ``held`` is held through (LockLost if it was lost meanwhile)."""
        link = self._link
        if link is None or self._live.get(held.handle) is not held:
            if held.lost_reason is None:
                held.lose("its connection was closed")
            raise held.lost_error()
        return link

    async def _release(self, held: AsyncHeldLock, block: bytes | None, invalidate: bool) -> None:
        link = self._through(held)
        if block is None and not invalidate:
            del self._live[held.handle]
            link.unlock(held.handle)
            link.flush()
            return
        self._lock_manager(link, "value blocks")
        value_flags = (ValueFlag.WRITE if block is not None else ValueFlag.NONE) | (
            ValueFlag.INVALIDATE if invalidate else ValueFlag.NONE)
        answer = await link.confirmed(Release(link.next_id(), held.handle, value_flags, block or b""))
        if answer is not None:
            raise _refusal(answer, None, f"release of {describe(held.file.path, held.key)}", writing=True)
        self._live.pop(held.handle, None)

    async def _convert(self, held: AsyncHeldLock, mode: int, wait: bool, timeout: float | None,
                       block: bytes | None, invalidate: bool) -> None:
        link = self._through(held)
        self._lock_manager(link, "conversions")
        read = held.value_block is not None
        flags = (LockFlag.VALUE_BLOCK if read else LockFlag.NONE) | (self._flags & LockFlag.NO_INTERIM)
        value_flags = (ValueFlag.WRITE if block is not None else ValueFlag.NONE) | (
            ValueFlag.INVALIDATE if invalidate else ValueFlag.NONE)
        reply = await link.ask(Convert(link.next_id(), held.handle, mode, flags, value_flags,
                                       _limit(wait, timeout, None), block or b""))
        if not is_grant(reply):
            what = f"conversion of {describe(held.file.path, held.key)} to {Mode(mode).name}"
            raise _refusal(reply, None, what, writing=block is not None or invalidate)
        held.mode = reply.mode
        if type(reply) is Acquired:
            held.token = reply.token
            if read:
                _read_block(held, reply)

    async def status(self, file: FileLike, key: Key) -> tuple[int, Holder | None]:
        """Who holds a record lock: (0 free | 1 the calling task | 2 another owner, the holder)."""
        ref = FileRef.of(file)
        link = await self._connected()
        reply = await link.ask(Status(link.next_id(), self._owner(), ref.inode, REMOTE_DEVICE, key_bytes(key)))
        if isinstance(reply, StatusReply):
            return reply.state, (holder(reply) if reply.state else None)
        raise failure(reply, "lock status")

    async def release_all(self, *, all_tasks: bool = True) -> int:
        """Release every lock of this client (or of the calling task); how many were held."""
        link = await self._connected()
        owner = ALL_THREADS if all_tasks else self._owner()
        reply = await link.ask(UnlockAll(link.next_id(), owner))
        if not isinstance(reply, Unlocked):
            raise failure(reply, "release of all locks")
        for handle, held in list(self._live.items()):
            if all_tasks or held.thread == owner:
                held.released = True
                del self._live[handle]
        return reply.count


__all__ = ["AsyncClient", "AsyncHeldLock", "Locking"]

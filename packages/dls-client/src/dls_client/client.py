"""The remote client: record locks through the lock service JDLS names.

A process keeps one connection for its whole life (``get_client()``); every
thread uses it. Locking waits for the grant; unlocking does not wait for an
answer, because a release cannot be refused to its owner and the stream keeps
it in order before the next request: a lock/unlock cycle costs one round trip.
Which server a request goes to, what it holds there, and what a failed server
costs, is the Route's business (``route``, ``resilience``), not this module's;
finding a failure while the application makes no call is the watcher's
(``watcher``).
"""

from __future__ import annotations

import os
import signal
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from dls_proto import (
    ALL_THREADS,
    WAIT_FOREVER,
    Acquired,
    Blocking,
    BlockStatus,
    Convert,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Lock,
    LockFlag,
    Mechanism,
    Message,
    Mode,
    Refused,
    RefuseReason,
    Release,
    Server,
    Status,
    StatusReply,
    Unlocked,
    ValueFlag,
    Waiting,
    identity,
)
from dls_proto import Cancel as CancelRequest

from .base import ALL_KINDS, BaseClient, kind_refused
from .binary import LocalBinaryLock, execution_number
from .cancel import Cancel
from .channel import Channel, Connect, tcp_connect
from .config import Config, port_number
from .errors import Cancelled, DlsError, Holder, InvalidRequest, NotWritable, ServiceUnavailable, Unsupported, describe
from .lockinfo import LockInfo, to_json
from .locks import REMOTE_DEVICE, FileLike, FileRef, HeldLock, LockState, OnBlocking, OnLost, tell_lost
from .replies import Grant, failure, holder, is_grant
from .route import Events, Route
from .trace import Tracer
from .watcher import Watched, Watcher

if TYPE_CHECKING:
    from .blocking import BlockingNotices
    from .notice_reader import NoticeReader

#: The protocol version from which a lock service converts locks, keeps value blocks, gives fencing tokens and
#: takes Cancel.
LOCK_MANAGER_VERSION = 4

#: Which record-lock kinds each JDLS LOCK= value sends to the service.
_KINDS_OF = {"ALL": ALL_KINDS, "INTERNAL": frozenset(("internal",)), "EXTERNAL": frozenset(("external",))}


class Client(BaseClient):
    """A process's connection to the lock service JDLS names (or ``config``), made on first use and kept.

    Threads share it. Record locks go to the service; binary and execution locks
    too with JDLS BINARY, else they are OS file locks on this host. What the
    client holds and waits for is published to its lock server for the operator
    tools (see ``lockinfo``). A watcher thread (a daemon thread, from the first
    connection until ``close()``) finds a failed lock server at once.
    """

    def __init__(self, config: Config | None = None, *, connect: Connect = tcp_connect) -> None:
        """``config`` defaults to JDLS's (ConfigurationError when it is not valid); ``connect`` reaches a
        server (TCP by default; tests give in-process fakes)."""
        self.config = config if config is not None else (Config.from_environment() or Config())
        self._connect = connect
        self.port = port_number()
        flags = LockFlag.NO_INTERIM if self.config.wait else LockFlag.NONE
        if self.config.oslocks:
            flags |= LockFlag.OSLOCK  # the server takes the record locks as OS file locks
        self._flags = flags
        self._kinds = _KINDS_OF[self.config.lock]
        self.trace = Tracer(self.config)
        #: Errors the service reported for requests nobody waited for (a failed unlock).
        self.async_errors: list[Error] = []
        #: What this client knows of its locks, for proc/info (see dls_client.lockinfo).
        self.info = LockInfo()
        self._route = self._new_route()
        #: The callbacks of locks taken with on_blocking, and the thread that reads their notices (made with
        #: the first such lock).
        self._notices: BlockingNotices | None = None
        self._notice_reader: NoticeReader | None = None
        self._live = {}
        ref = weakref.ref(self)
        self._watcher = Watcher(lambda: _route_of(ref), self.trace.error)

    # -- the connection ----------------------------------------------------------------

    def _new_route(self) -> Route:
        config = self.config
        events = Events(self._connected, self._lost, self._gone)
        if config.server2 is None:
            return Route((config.server,), self._open_channel, self.trace, events)
        from .resilience import ResilientRoute  # only with SERVER2: a client of one service does without it

        return ResilientRoute((config.server, config.server2), self._open_channel, self.trace, events)

    def _open_channel(self, server: Server, timeout: float | None = None) -> Channel:
        self.trace.verbose(f"Client: Using host '{server.host}', service '{server.port}'")
        return Channel(server, identity.hello(port=self.port), ack_timeout=None if self.config.wait else
                       self.config.timeout, unsolicited=self._unsolicited, on_failure=self.trace.error,
                       connect=self._connect, open_timeout=timeout, tls_context=self.config.ssl_context(),
                       tracer=self.trace, greeting_timeout=self.config.timeout)

    def _connected(self, channel: Channel) -> None:
        """A new lock server serves this client (the first, or one connected again after a failure): watch
        it, and tell it what this client holds and waits for, which it does not know yet."""
        self._watcher.watch()
        self.info.changed = True
        self._publish_quietly()

    def _lost(self, locks: list[HeldLock]) -> None:
        """Locks were lost (already marked and logged by the route): forget them, and tell their holders."""
        for held in locks:
            self.info.released(held.handle)
        tell_lost(locks, self.trace.error)

    def _gone(self, why: str) -> None:
        """No lock service can be reached any more. With JDLS EXIT the process wraps up and exits, as the guide's
        client does: SIGTERM to itself, so that the application's handler (if it has one) runs, and the
        process ends otherwise; without it, requests raise ServiceUnavailable until a service answers again."""
        if not self.config.exit:
            return
        self.trace.error(f"Client: no lock service can be reached ({why}): wrapping up and exiting (JDLS EXIT)")
        os.kill(os.getpid(), signal.SIGTERM)

    def verify(self, held: HeldLock) -> None:
        """``held.ensure_held()``: settle the lock now if a socket it is held through hung up (a look that
        costs no round trip while the sockets are well; see Route.verify)."""
        self._route.verify(held.handle)

    def held_until(self, held: HeldLock) -> float:
        """Until when (time.monotonic()) ``held`` stays this process's even if it does nothing more from
        now on, its lock server dying meanwhile included (see Route.held_until): what a watchdog of this
        process, such as dls-lock's keeper, may allow the work done under the lock. No round trip."""
        return self._route.held_until(held.handle)

    def held_through(self, held: HeldLock) -> list[int]:
        """The descriptors of the connections ``held`` is held through now: a watchdog that keeps duplicates
        of them keeps the lock until it lets them go (see dls_client.kept_connections)."""
        return self._route.held_through(held.handle)

    def _watch_notices(self, held: HeldLock, callback: OnBlocking) -> None:
        """Tell ``callback`` of the blocking notices about ``held`` (on the notices' own thread), and read the
        connection for them while the application makes no request (``notice_reader``)."""
        if self._notices is None:
            from .blocking import BlockingNotices  # only with notices: a client's start-up does without them
            from .notice_reader import NoticeReader

            notices = self._notices = BlockingNotices(self.trace.error)
            route = self._route
            self._notice_reader = NoticeReader(lambda: route.channels(), notices.watching)
        self._notices.watch(held, callback)
        assert self._notice_reader is not None
        self._notice_reader.start()

    def _unsolicited(self, message: Message) -> None:
        if type(message) is Blocking:
            if self._notices is not None:
                self._notices.deliver(message.handle, message.mode)
            return
        if isinstance(message, Error):
            self.async_errors.append(message)
            self.trace.error(f"Client: lock service reported for request {message.request_id}: {message.reason}")

    @property
    def connected(self) -> bool:
        """Whether a lock server has been connected to (requests that never needed one do not connect)."""
        return self._route.connected

    def connect(self) -> Channel:
        """Connect now, if no request has yet (the first request would; connecting publishes the client's
        lock information): the channel requests go to, with the lock server's Welcome."""
        return self._route.current()

    def close(self) -> None:
        """Close the connection: the service releases every lock of this client (their HeldLocks count as
        released). Used again, the client connects again."""
        self._watcher.stop()
        if self._notices is not None:
            self._notices.close()
            self._notices = self._notice_reader = None
        route, self._route = self._route, self._new_route()
        route.close()
        self.info.released_all()

    # -- lock information -------------------------------------------------------------

    def publish_info(self) -> bool:
        """Send this client's lock information to its lock server if it changed since last sent.

        Call it when about to wait for input or to sleep, so that show-item-locks
        shows what this process holds while it idles. True when sent. Connects
        if not yet connected (which publishes). Raises ServiceUnavailable.
        """
        self.connect()
        return self.info.publish(self._send_info)

    def _send_info(self, document: dict[str, object]) -> None:
        self._route.publish(to_json(document).encode())

    def _publish_quietly(self) -> None:
        """Publish at the moments jDLS does; a failure here shows in the request that follows."""
        try:
            self.info.publish(self._send_info)
        except (DlsError, OSError) as exc:
            self.trace.verbose(f"Client: lock information not sent: {exc}")

    # -- locks -----------------------------------------------------------------------

    def _lock(self, ref: FileRef, key: bytes, mode: int, wait: bool, timeout: float | None,
              on_wait: Callable[[Holder], None] | None, on_lost: OnLost | None = None,
              flags: int | None = None, *, value_block: bool = False, cancel: Cancel | None = None,
              on_blocking: OnBlocking | None = None) -> HeldLock:
        """Send a lock request (with ``flags``, else JDLS's), take its answers up to the last, and return
        the lock (or raise); the Route asks again when the server fails under it."""
        if flags is None:
            flags = self._flags
        if value_block:
            flags |= LockFlag.VALUE_BLOCK
        if on_blocking is not None:
            if self.config.server2 is not None:
                raise Unsupported("blocking notices are not available with SERVER2 (a resilient client) yet")
            flags |= LockFlag.NOTIFY
        extras = value_block or cancel is not None or on_blocking is not None
        limit = _limit(wait, timeout, cancel)
        thread = identity.thread_id()
        route = self._route
        started = time.monotonic() if 0 < limit < WAIT_FOREVER else 0.0  # what a second service may still wait

        def attempt(channel: Channel) -> HeldLock:
            new_file = False
            granted: Grant
            # The lock and its maker made before the request goes, while the service works on it: from the
            # grant's arrival to the application, as little as can be (the maker fills in what the grant says).
            held = HeldLock(self, 0, ref, key, mode, 0, thread, on_lost)

            def make(handle: int) -> HeldLock:
                nonlocal new_file
                new_file = self.info.granted(handle, ref.path, ref.inode, key, granted.mode, thread)
                held.handle, held.mode, held.value = handle, granted.mode, granted.value
                if type(granted) is Acquired:
                    held.token = granted.token
                    if value_block:
                        _read_block(held, granted)
                return held

            request = Lock(channel.next_id(), mode, flags, limit, thread, ref.inode, REMOTE_DEVICE, key, ref.path)
            if extras:
                what = "value blocks" if value_block else "blocking notices" if on_blocking else "cancel"
                reply, waited = self._request(channel, request, cancel, what, on_wait)
            else:
                reply = channel.request(request)
                waited = type(reply) is Waiting
                if waited:
                    reply = self._wait(channel, request, reply, on_wait)
            if not is_grant(reply):
                raise _refusal(reply, cancel, f"binary lock {ref.path}" if flags & LockFlag.BINARY else
                               describe(ref.path, key))
            granted = reply
            held = route.held(channel, request, granted, make, started)
            if on_blocking is not None:
                self._watch_notices(held, on_blocking)
            if waited or new_file:
                self._publish_quietly()  # the wait ended, or a first lock in this file: publish the lock now held
            return held

        return route.ask(attempt)

    def _request(self, channel: Channel, request: Lock | Convert, cancel: Cancel | None, what: str,
                 on_wait: Callable[[Holder], None] | None) -> tuple[Message, bool]:
        """Send a request that needs the lock manager of protocol version 4 (``what`` it needs: Unsupported
        from a service that lacks it) and take its replies up to the last: (that reply, whether it waited).
        With ``cancel``, calling it (from any thread) sends a Cancel of the request, once the request is sent."""
        self._lock_manager(channel, what)
        rid = request.request_id
        if cancel is None:
            reply = channel.request(request)
        else:
            sent = False

            def withdraw() -> None:
                if sent:  # a Cancel before its request would be ignored: the request itself looks, once sent
                    try:
                        channel.send(CancelRequest(channel.next_id(), rid))
                    except ServiceUnavailable:
                        pass  # the connection is lost: the request goes with it
            with cancel.hooked(withdraw):
                channel.register(rid)
                channel.send(request)
                sent = True
                if cancel.requested:  # called meanwhile, perhaps before ``sent`` was set: said now (twice is harmless)
                    withdraw()
                reply = channel.expect(rid)
                waited = type(reply) is Waiting
                if waited:
                    reply = self._wait(channel, request, reply, on_wait)
                return reply, waited
        waited = type(reply) is Waiting
        if waited:
            reply = self._wait(channel, request, reply, on_wait)
        return reply, waited

    def _lock_manager(self, channel: Channel, what: str) -> None:
        """Unsupported unless ``channel``'s service can do ``what``: it speaks protocol version 4, and (but for
        a cancel) it locks in a lock table: OS file locks have neither conversions nor value blocks."""
        welcome = channel.welcome
        if welcome.version < LOCK_MANAGER_VERSION:
            raise Unsupported(f"lock service {channel.server} speaks protocol version {welcome.version}, which lacks "
                              f"{what} (conversions, value blocks, fencing tokens and cancel came with version "
                              f"{LOCK_MANAGER_VERSION}): upgrade the service")
        if welcome.mechanism == Mechanism.OSLOCKS and what != "cancel":
            raise Unsupported(f"lock service {channel.server} locks with OS file locks (jdls -ibD), which cannot do "
                              f"{what}: a service with a lock table can")

    def convert_held(self, held: HeldLock, mode: int, wait: bool, timeout: float | None, block: bytes | None,
                     invalidate: bool, cancel: Cancel | None) -> None:
        """Convert ``held`` in place through the services that hold it (see HeldLock.convert): a Convert,
        waiting as a lock waits; its mode, token and value block (when it reads it) set from the (primary's)
        answer. With SERVER2, on the primary and then on the secondary with what is left of the wait: a
        refusal there undoes the primary's conversion (a Convert back, not waiting) and is raised; if that
        cannot be undone (a conversion sideways, CW and PR), the services disagree and the lock is lost (kept
        where it is held until released). Unsupported from a service that lacks conversions."""
        holds = self._route.holds(held.handle)
        for channel, _ in holds:
            self._lock_manager(channel, "conversions")
        what = f"conversion of {describe(held.file.path, held.key)} to {Mode(mode).name}"
        old = held.mode
        started = time.monotonic()
        reply = self._convert(holds[0], mode, held.value_block is not None, wait, timeout, block, invalidate, cancel,
                              what)
        for done, hold in enumerate(holds[1:], 1):
            left = None if timeout is None else max(0.001, timeout - (time.monotonic() - started))
            try:
                self._convert(hold, mode, False, wait, left, block, invalidate, cancel, what)
            except ServiceUnavailable:
                self._route.failed(hold[0])  # given the lock in its new mode when it answers again
            except DlsError as exc:
                undo = f"undoing the {what} on {holds[0][0].server}"
                try:
                    for earlier in holds[:done]:
                        self._convert(earlier, old, False, False, None, None, False, None, undo)
                except DlsError as failed:
                    self._route.disagree(held.handle, f"{exc} on {hold[0].server}, and {failed}: the services hold "
                                                      "it in different modes")
                raise exc from None
        held.mode = reply.mode
        if type(reply) is Acquired:
            held.token = reply.token
            if held.value_block is not None:
                _read_block(held, reply)
        self._route.converted(held.handle, reply.mode)
        self.info.granted(held.handle, held.file.path, held.file.inode, held.key, reply.mode, held.thread)

    def _convert(self, hold: tuple[Channel, int], mode: int, read: bool, wait: bool, timeout: float | None,
                 block: bytes | None, invalidate: bool, cancel: Cancel | None, what: str) -> Grant:
        """A Convert of the lock ``hold`` names, to ``mode`` (``read``: with its value block); its grant, or the
        refusal raised (see ``_refusal``)."""
        channel, server_handle = hold
        flags = (LockFlag.VALUE_BLOCK if read else LockFlag.NONE) | (self._flags & LockFlag.NO_INTERIM)
        value_flags = (ValueFlag.WRITE if block is not None else ValueFlag.NONE) | (
            ValueFlag.INVALIDATE if invalidate else ValueFlag.NONE)
        request = Convert(channel.next_id(), server_handle, mode, flags, value_flags, _limit(wait, timeout, cancel),
                          block or b"")
        reply, _waited = self._request(channel, request, cancel, "conversions", None)
        if not is_grant(reply):
            raise _refusal(reply, cancel, what, writing=block is not None or invalidate)
        return reply

    def _wait(self, channel: Channel, request: Lock | Convert, reply: Message,
              on_wait: Callable[[Holder], None] | None) -> Message:
        """The request waits: publish that, and take the replies up to the last (published by the caller if granted)."""
        if isinstance(request, Convert):  # the lock is published as held: nothing more to say while it converts
            return channel.last_reply(request.request_id, reply,
                                      None if on_wait is None else lambda waiting: on_wait(holder(waiting)))
        token = self.info.wait_started(request.path, request.inode, request.key, request.mode, request.thread_id)
        self._publish_quietly()
        try:
            reply = channel.last_reply(request.request_id, reply,
                                       None if on_wait is None else lambda waiting: on_wait(holder(waiting)))
        finally:
            self.info.wait_ended(token)
            if not is_grant(reply) and channel.failure is None:
                self._publish_quietly()
        return reply

    def _kind_refused(self, kind: str) -> Exception:
        return kind_refused(kind, self.config.lock)

    def binary_lock(
        self, file: FileLike, mode: int = Mode.EX, *, wait: bool = True, timeout: float | None = None,
    ) -> HeldLock | LocalBinaryLock:
        """Take a binary (file-level) lock on ``file``.

        Without JDLS BINARY it is an OS file lock on the file itself on this host
        (LocalBinaryLock); with BINARY it is sent to the service (HeldLock, key
        b"", flagged BINARY) so that every host respects it.
        """
        if not self.config.binary:
            return super().binary_lock(file, mode, wait=wait, timeout=timeout)
        return self._lock(FileRef.of(file), b"", mode, wait, timeout, None, None, self._flags | LockFlag.BINARY)

    def execution_lock(
        self, number: int, mode: int = Mode.EX, *, wait: bool = True, timeout: float | None = None,
    ) -> HeldLock | LocalBinaryLock:
        """Take execution lock ``number`` (0 to 255).

        Without JDLS BINARY it is an OS file lock on ``execution_lock_NNN`` in
        $JDLS_BINARY_LOCK_DIR (default /tmp/jbase_lock, made on first use); with
        BINARY it goes to the service as the binary lock of key b"EXECnnn" on the
        pseudo file of inode 0 named "execution lock NNN" (the inode 0 is never a
        real file's, so it cannot collide with a file lock).
        """
        if not self.config.binary:
            return super().execution_lock(number, mode, wait=wait, timeout=timeout)
        ref = FileRef(0, f"execution lock {execution_number(number):03d}")
        return self._lock(ref, b"EXEC%03d" % number, mode, wait, timeout, None, None, self._flags | LockFlag.BINARY)

    def unlock(self, handle: int) -> None:
        """Release a lock by its handle (one this client no longer holds: nothing is sent); a failure is
        reported later (``async_errors``)."""
        self._route.unlock(handle)
        self.info.released(handle)

    def unlock_held(self, held: HeldLock, block: bytes | None = None, invalidate: bool = False) -> None:
        if block is not None or invalidate:
            self._release_writing(held, block, invalidate)
            return
        handle = held.handle
        self._forget(held)
        if self._notices is not None:
            self._notices.forget(handle)
        # A socket that hung up is settled first (one poll() while all is well): a process stopped longer
        # than the lock-delay releases a lock it lost meanwhile, and must be told (LockLost), not "released".
        self._route.release(handle)
        self.info.released(handle)

    def _release_writing(self, held: HeldLock, block: bytes | None, invalidate: bool) -> None:
        """Release ``held`` writing its value block (``block``) or marking it not valid, on every service that
        holds it (SERVER2: both, so that the block stays in step), each Release confirmed (a round trip): one
        refused by the first service leaves the lock held (NotWritable, InvalidRequest); by a later one, it is
        released there plainly, and said in the error trace."""
        self._route.verify(held.handle)  # a hold that hung up is settled first (LockLost, not "released")
        self._forget(held)
        if self._notices is not None:
            self._notices.forget(held.handle)
        if held.lost:
            return  # HeldLock.release says LockLost
        value_flags = (ValueFlag.WRITE if block is not None else ValueFlag.NONE) | (
            ValueFlag.INVALIDATE if invalidate else ValueFlag.NONE)
        what = f"release of {describe(held.file.path, held.key)}"

        def release(holds: list[tuple[Channel, int]]) -> None:
            for channel, _ in holds:
                self._lock_manager(channel, "value blocks")
            for index, (channel, server_handle) in enumerate(holds):
                answer = channel.confirmed(Release(channel.next_id(), server_handle, value_flags, block or b""))
                if answer is None:
                    continue
                if index == 0:
                    raise _refusal(answer, None, what, writing=True)
                self.trace.error(f"Client: {what} on {channel.server}: {_refusal(answer, None, what, writing=True)}; "
                                 "released there without the value block")
                channel.unlock(server_handle)

        self._route.release_with(held.handle, release)
        self.info.released(held.handle)

    def let_go(self, held: HeldLock) -> None:
        self._route.let_go(held.handle)

    def release_all(self, *, all_threads: bool = True) -> int:
        """Release every lock of this process (or of the calling thread); how many were held."""
        thread = ALL_THREADS if all_threads else identity.thread_id()
        reply = self._route.release_all(thread)
        if isinstance(reply, Unlocked):
            self.info.released_all(None if all_threads else thread)
            self._forget_all(None if all_threads else thread)
            return reply.count
        raise failure(reply, "release of all locks")

    def _status(self, ref: FileRef, key: bytes) -> tuple[int, Holder | None]:
        thread = identity.thread_id()
        reply = self._route.ask(lambda channel: channel.request(
            Status(channel.next_id(), thread, ref.inode, REMOTE_DEVICE, key)))
        if isinstance(reply, StatusReply):
            return reply.state, (holder(reply) if reply.state else None)
        raise failure(reply, "lock status")

    def echo(self, data: bytes) -> tuple[bytes, float]:
        """Send ``data`` through the service and back: (what came back, seconds taken)."""
        self.connect()  # first, so that the time is the round trip's
        start = time.perf_counter()
        reply = self._route.ask(lambda channel: channel.request(Echo(channel.next_id(), data)))
        if isinstance(reply, EchoReply):
            return reply.data, time.perf_counter() - start
        raise failure(reply, "echo")


def _limit(wait: bool, timeout: float | None, cancel: Cancel | None) -> int:
    """A request's ``timeout_ms``: 0 without waiting (or with a Cancel called already: withdrawn as soon as it
    would wait), WAIT_FOREVER without a timeout."""
    if not wait or (cancel is not None and cancel.requested):
        return 0
    return WAIT_FOREVER if timeout is None else min(max(1, int(timeout * 1000)), WAIT_FOREVER - 1)


def _read_block(held: LockState, acquired: Acquired) -> None:
    """The value block an Acquired carries, into ``held`` (None when the service sent none)."""
    if acquired.block_status == BlockStatus.NONE:
        held.value_block = None
        return
    held.value_block = acquired.block
    held.value_block_valid = acquired.block_status != BlockStatus.NOT_VALID


def _refusal(reply: Message, cancel: Cancel | None, what: str, *, writing: bool = False) -> Exception:
    """The exception for a request's answer other than a grant: ``failure``'s, but Cancelled for a request its
    Cancel withdrew, NotWritable or InvalidRequest for a value block refused (``writing``: the lock still held)."""
    if cancel is not None and cancel.requested and isinstance(reply, Refused) and reply.reason in (
            RefuseReason.CANCELLED, RefuseReason.BUSY):
        return Cancelled(f"{what}: cancelled while it waited")
    if writing and isinstance(reply, Error) and reply.code == ErrorCode.BAD_REQUEST:
        if "PW or EX" in reply.reason:
            return NotWritable(f"{what}: {reply.reason}")
        return InvalidRequest(f"{what}: {reply.reason}")
    return failure(reply, what)


def _route_of(ref: weakref.ref[Client]) -> Watched | None:
    """The route of the client ``ref`` names, for its watcher (None once the client is gone)."""
    client = ref()
    return None if client is None else client._route


__all__ = ["Client"]

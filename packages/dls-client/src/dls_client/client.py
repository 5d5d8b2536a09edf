"""The client API: record locks through the lock service named by JDLS.

A process keeps one connection for its whole life (``get_client()``); every
thread uses it. Locking waits for the grant; unlocking does not wait for an
answer, because a release cannot be refused to its owner and the stream keeps
it in order before the next request: a lock/unlock cycle costs one round trip.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from dls_proto import (
    ALL_THREADS,
    PROTOCOL_VERSIONS,
    WAIT_FOREVER,
    Echo,
    EchoReply,
    Error,
    Granted,
    Hello,
    InfoPut,
    Lock,
    LockFlag,
    Message,
    Mode,
    Refused,
    RefuseReason,
    Status,
    StatusReply,
    Unlock,
    UnlockAll,
    Unlocked,
    Waiting,
)

from . import identity, trace
from .channel import Channel
from .config import Config, Server
from .errors import (
    DlsError,
    Holder,
    LockCancelled,
    LockRefused,
    LockTimeout,
    RequestFailed,
    ServiceUnavailable,
)
from .lockinfo import LockInfo
from .resilience import Mirror

#: The device number of every record lock sent to the service: device numbers of
#: a shared file differ from host to host, so only the inode names the file.
REMOTE_DEVICE = -1

#: Where execution locks are taken on the local host when JDLS has no BINARY.
BINARY_LOCK_DIR_VARIABLE = "JDLS_BINARY_LOCK_DIR"
DEFAULT_BINARY_LOCK_DIR = "/tmp/jbase_lock"  # noqa: S108 - jBASE's shared lock directory, as the daemon's
#: Execution locks are numbered 0 to 255, as jBASE's.
EXECUTION_LOCKS = range(256)

Key = str | bytes
LockKind = Literal["internal", "external"]
#: Which record-lock kinds each JDLS LOCK= value sends to the service.
_KINDS_OF = {"ALL": frozenset(("internal", "external")), "INTERNAL": frozenset(("internal",)),
             "EXTERNAL": frozenset(("external",))}


class FileRef(NamedTuple):
    """A file as the lock service knows it: its inode, and its name for display."""

    inode: int
    path: str

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileRef:
        try:
            return cls(os.stat(path).st_ino, os.fspath(path))
        except OSError as exc:
            raise DlsError(f"cannot lock records of {os.fspath(path)!r}: {exc.strerror}") from None


FileLike = FileRef | str | os.PathLike[str]


class Unlocker(Protocol):
    """What a held lock needs of the client that took it: a way to let it go."""

    def unlock(self, handle: int) -> None: ...


class HeldLock:
    """A granted lock. Release it with ``release()`` or by leaving its ``with`` block."""

    __slots__ = ("client", "file", "handle", "key", "mode", "released", "value")

    def __init__(self, client: Unlocker, handle: int, file: FileRef, key: bytes, mode: int, value: int) -> None:
        self.client = client
        self.handle = handle
        self.file = file
        self.key = key
        self.mode = mode
        self.value = value
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.client.unlock(self.handle)

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<HeldLock {self.file.path}:{self.key!r} {Mode(self.mode).name} 0x{self.value:08x}>"


def _key_bytes(key: Key) -> bytes:
    return key if isinstance(key, bytes) else key.encode("utf-8")


def _limit(wait: bool, timeout: float | None) -> int:
    """The wait limit of a Lock request, in milliseconds: 0 try, WAIT_FOREVER, or the timeout."""
    if not wait:
        return 0
    if timeout is None:
        return WAIT_FOREVER
    return min(max(1, int(timeout * 1000)), WAIT_FOREVER - 1)


def _holder(reply: Refused | Waiting | StatusReply) -> Holder:
    return Holder(reply.holder_mode, reply.holder_pid, reply.holder_port, reply.holder_client_pid,
                  reply.holder_thread, reply.holder_ip)


class Client:
    """A connection to the lock service, made on first use and kept."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else (Config.from_environment() or Config())
        self.port = identity.port_number()
        self._channel: Channel | None = None
        self._connect_lock = threading.Lock()
        flags = LockFlag.NO_INTERIM if self.config.wait else LockFlag.NONE
        if self.config.oslocks:
            flags |= LockFlag.OSLOCK  # the server takes the record locks as OS file locks
        self._flags = flags
        #: The record-lock kinds JDLS LOCK= sends to the service.
        self._kinds = _KINDS_OF[self.config.lock]
        self.trace = trace.Tracer(self.config)
        #: Errors the service reported for requests nobody waited for (a failed unlock).
        self.async_errors: list[Error] = []
        #: What this client knows of its locks, for proc/info (see dls_client.lockinfo).
        self.info = LockInfo()
        #: Both servers of resilient mode (JDLS SERVER2), made on connection; None otherwise.
        self._mirror: Mirror | None = None

    # -- connection ------------------------------------------------------------------

    @property
    def channel(self) -> Channel:
        channel = self._channel
        if channel is None:
            with self._connect_lock:
                channel = self._channel
                if channel is None:
                    channel = self._channel = self._connect()
                    self.info.changed = True  # a new connection: the lock server knows nothing yet
                    self._publish_quietly(channel)
        if self._mirror is not None:
            return self._mirror.check()  # the primary of the moment
        return channel

    def publish_info(self) -> bool:
        """Send this client's lock information to its lock server if it changed since last sent.

        Call it when about to wait for input or to sleep, so that show-item-locks
        shows what this process holds while it idles. True when sent. Connects
        if not yet connected (which publishes). Raises ServiceUnavailable.
        """
        return self.info.publish(self._sender(self.channel))

    def _sender(self, channel: Channel) -> Callable[[dict[str, object]], None]:
        def send(document: dict[str, object]) -> None:
            payload = json.dumps(document).encode()
            mirror = self._mirror
            if mirror is None:
                channel.send(InfoPut(channel.next_id(), payload))
                return
            for each in mirror.channels():
                try:
                    each.send(InfoPut(each.next_id(), payload))
                except ServiceUnavailable as exc:
                    mirror.lost(each, exc)  # the other server, if any, is still in this loop
        return send

    def _publish_quietly(self, channel: Channel) -> None:
        """Publish at the moments jDLS does; a failure here shows in the request that follows."""
        try:
            self.info.publish(self._sender(channel))
        except (DlsError, OSError) as exc:
            self.trace.verbose(f"Client: lock information not sent: {exc}")

    def _connect(self) -> Channel:
        server2 = self.config.server2
        if server2 is None:
            try:
                return self._open_channel(self.config.server)
            except ServiceUnavailable as exc:
                self.trace.error(f"Client: unable to connect to distributed lock service, locks not enabled: {exc}")
                raise
        try:
            mirror = Mirror.connect((self.config.server, server2), self._open_channel, self.trace,
                                    self.config.timeout)
        except ServiceUnavailable as exc:
            self.trace.error(f"Client: unable to connect to distributed lock service, locks not enabled: {exc}")
            raise
        mirror.on_promote = self._promoted
        self._mirror = mirror
        return mirror.primary

    def _open_channel(self, server: Server) -> Channel:
        self.trace.verbose(f"Client: Using host '{server.host}', service '{server.port}'")
        hello = Hello(0, PROTOCOL_VERSIONS[0], PROTOCOL_VERSIONS[1], 0, self.port, os.getpid(),
                      identity.thread_id(), identity.host_name(), identity.program_name())
        return Channel(server, hello, ack_timeout=None if self.config.wait else self.config.timeout,
                       unsolicited=self._unsolicited, on_failure=self.trace.error)

    def _promote(self, channel: Channel, exc: ServiceUnavailable) -> None:
        """A server of a resilient client failed: go on with the one left (ServiceLost if none is)."""
        if self._mirror is None:
            raise exc
        self._mirror.lost(channel, exc)

    def _promoted(self, primary: Channel) -> None:
        """The secondary became the primary: it has this client's locks but not their description."""
        self.info.changed = True
        self._publish_quietly(primary)

    def _ask(self, make: Callable[[int], Message]) -> Message:
        """Send the request ``make(request_id)`` and return its answer; a resilient client asks on after a failover."""
        while True:
            channel = self.channel
            try:
                return channel.request(make(channel.next_id()))
            except ServiceUnavailable as exc:
                self._promote(channel, exc)

    def _unsolicited(self, message: Message) -> None:
        if isinstance(message, Error):
            self.async_errors.append(message)
            self.trace.error(f"Client: lock service reported for request {message.request_id}: {message.reason}")

    def close(self) -> None:
        if self._mirror is not None:
            for channel in self._mirror.channels():
                channel.close()
            self._mirror = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- locks -----------------------------------------------------------------------

    def lock(
        self, file: FileLike, key: Key, mode: int = Mode.EX, *, wait: bool = True, timeout: float | None = None,
        on_wait: Callable[[Holder], None] | None = None, kind: LockKind = "internal",
    ) -> HeldLock:
        """Take a record lock; wait for it unless ``wait`` is False, at most ``timeout`` seconds.

        Raises LockRefused (held, not waiting), LockTimeout, ServiceUnavailable,
        RequestFailed. ``on_wait`` is called with the holder whenever the service
        reports the request still waits. ``kind`` says whose lock it is: "internal"
        (the application's own records, the default) or "external" (one an external
        database driver would otherwise take with its own lock handler); a kind that
        JDLS ``LOCK=`` does not send to the service raises DlsError, nothing is sent.
        """
        if kind not in self._kinds:
            raise self._kind_refused(kind)
        ref = file if isinstance(file, FileRef) else FileRef.of(file)
        kb = _key_bytes(key)
        return self._take(ref, kb, mode, self._flags, _limit(wait, timeout), on_wait)

    def _take(self, ref: FileRef, kb: bytes, mode: int, flags: int, limit: int,
              on_wait: Callable[[Holder], None] | None) -> HeldLock:
        """Send a lock request, take its answers up to the last, and return the lock (or raise)."""
        thread = identity.thread_id()
        while True:
            channel = self.channel
            request = Lock(channel.next_id(), mode, flags, limit, thread, ref.inode, REMOTE_DEVICE, kb, ref.path)
            try:
                reply = channel.request(request)
                waited = type(reply) is Waiting
                if waited:
                    reply = self._wait(channel, request, reply, on_wait)
            except ServiceUnavailable as exc:
                self._promote(channel, exc)  # resilient: ask the promoted secondary; otherwise raises
                continue
            if type(reply) is not Granted:
                what = f"binary lock {ref.path}" if flags & LockFlag.BINARY else \
                    f"{ref.path} {kb.decode('utf-8', 'replace')}"
                raise self._failure(reply, what)
            handle = reply.handle
            if self._mirror is not None:
                mirrored = self._mirror.mirrored(channel, request, reply)
                if mirrored is None:
                    continue  # the primary failed after granting: its grant went with it
                handle = mirrored
            self.info.granted(handle, ref.path, ref.inode, kb, reply.mode, thread)
            if waited:
                self._publish_quietly(self.channel)  # the wait ended: publish the lock now held
            return HeldLock(self, handle, ref, kb, reply.mode, reply.value)

    def _wait(self, channel: Channel, request: Lock, reply: Message,
              on_wait: Callable[[Holder], None] | None) -> Message:
        """The request waits: publish that, and take the replies up to the last (published by the caller if granted)."""
        token = self.info.wait_started(request.path, request.inode, request.key, request.mode, request.thread_id)
        self._publish_quietly(channel)
        try:
            while type(reply) is Waiting:
                if on_wait is not None:
                    on_wait(_holder(reply))
                reply = channel.expect(request.request_id)
        finally:
            self.info.wait_ended(token)
            if type(reply) is not Granted and channel.failure is None:
                self._publish_quietly(channel)
        return reply

    def _kind_refused(self, kind: str) -> Exception:
        if kind not in ("internal", "external"):
            return ValueError(f"lock kind {kind!r} is not 'internal' or 'external'")
        return DlsError(f"record locks of kind {kind!r} are not handled by the lock service "
                        f"(JDLS LOCK={self.config.lock}); the caller's own lock handler must take them")

    def binary_lock(
        self, file: FileLike, mode: int = Mode.EX, *, wait: bool = True, timeout: float | None = None,
    ) -> HeldLock | LocalBinaryLock:
        """Take a binary (file-level) lock on ``file``.

        Without JDLS BINARY it is an OS file lock on the file itself on this host
        (LocalBinaryLock); with BINARY it is sent to the service (HeldLock, key
        b"", flagged BINARY) so that every host respects it.
        """
        if self.config.binary:
            ref = file if isinstance(file, FileRef) else FileRef.of(file)
            return self._service_binary_lock(ref, b"", mode, wait, timeout)
        path = file.path if isinstance(file, FileRef) else os.fspath(file)
        return LocalBinaryLock.take(path, mode, wait=wait, timeout=timeout, create=False)

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
        if isinstance(number, bool) or not isinstance(number, int) or number not in EXECUTION_LOCKS:
            raise ValueError(f"execution lock number {number!r} is not in the range 0 to 255")
        if self.config.binary:
            ref = FileRef(0, f"execution lock {number:03d}")
            return self._service_binary_lock(ref, b"EXEC%03d" % number, mode, wait, timeout)
        directory = os.environ.get(BINARY_LOCK_DIR_VARIABLE) or DEFAULT_BINARY_LOCK_DIR
        try:
            os.makedirs(directory, mode=0o777, exist_ok=True)
        except OSError as exc:
            raise DlsError(f"cannot make the binary lock directory {directory!r}: {exc.strerror}") from None
        path = os.path.join(directory, f"execution_lock_{number:03d}")
        return LocalBinaryLock.take(path, mode, wait=wait, timeout=timeout, create=True)

    def _service_binary_lock(self, ref: FileRef, kb: bytes, mode: int, wait: bool,
                             timeout: float | None) -> HeldLock:
        return self._take(ref, kb, mode, self._flags | LockFlag.BINARY, _limit(wait, timeout), None)

    def try_lock(self, file: FileLike, key: Key, mode: int = Mode.EX) -> HeldLock:
        """Take a record lock only if it is free now (LockRefused otherwise)."""
        return self.lock(file, key, mode, wait=False)

    def unlock(self, handle: int) -> None:
        """Release a lock by its handle; a failure is reported later (``async_errors``)."""
        if self._mirror is not None:
            self.info.released(handle)
            self._mirror.unlock(handle)
            return
        channel = self.channel
        channel.send(Unlock(channel.next_id(), handle))
        self.info.released(handle)

    def release_all(self, *, all_threads: bool = True) -> int:
        """Release every lock of this process (or of the calling thread); how many were held."""
        thread = ALL_THREADS if all_threads else identity.thread_id()
        if self._mirror is not None:
            self.channel  # noqa: B018 - connects
            reply = self._mirror.release_all(thread, all_threads)
        else:
            channel = self.channel
            reply = channel.request(UnlockAll(channel.next_id(), thread))
        if isinstance(reply, Unlocked):
            self.info.released_all(None if all_threads else thread)
            return reply.count
        raise self._failure(reply, "release of all locks")

    def status(self, file: FileLike, key: Key) -> tuple[int, Holder | None]:
        """Who holds a record lock: (0 free | 1 this thread | 2 another, the holder)."""
        ref = file if isinstance(file, FileRef) else FileRef.of(file)
        thread, kb = identity.thread_id(), _key_bytes(key)
        reply = self._ask(lambda rid: Status(rid, thread, ref.inode, REMOTE_DEVICE, kb))
        if isinstance(reply, StatusReply):
            return reply.state, (_holder(reply) if reply.state else None)
        raise self._failure(reply, "lock status")

    def echo(self, data: bytes) -> tuple[bytes, float]:
        """Send ``data`` through the service and back: (what came back, seconds taken)."""
        self.channel  # noqa: B018 - connects first, so that the time is the round trip's
        start = time.perf_counter()
        reply = self._ask(lambda rid: Echo(rid, data))
        if isinstance(reply, EchoReply):
            return reply.data, time.perf_counter() - start
        raise self._failure(reply, "echo")

    @staticmethod
    def _failure(reply: Message, what: str) -> DlsError:
        if isinstance(reply, Refused):
            holder = _holder(reply)
            if reply.reason == RefuseReason.TIMEOUT:
                return LockTimeout(f"{what}: still held by {holder.describe()} when the wait ended", holder)
            if reply.reason == RefuseReason.CANCELLED:
                return LockCancelled(f"{what}: request cancelled", holder)
            return LockRefused(f"{what}: held by {holder.describe()}", holder)
        if isinstance(reply, Error):
            return RequestFailed(f"{what}: {reply.reason}", reply.code)
        return DlsError(f"{what}: unexpected answer {type(reply).__name__}")


# -- local binary locks ------------------------------------------------------------

#: Open-file-description locks where the OS has them (Linux): owned by the open
#: file, so two locks of one process exclude each other and closing another
#: descriptor of the file does not drop them; they conflict with POSIX fcntl locks.
_SETLK = getattr(fcntl, "F_OFD_SETLK", fcntl.F_SETLK)
_SETLKW = getattr(fcntl, "F_OFD_SETLKW", fcntl.F_SETLKW)
_FLOCK = "hhqqi4x"  # struct flock (l_type, l_whence, l_start, l_len, l_pid) on 64-bit Linux
_BUSY = (errno.EAGAIN, errno.EACCES)


class LocalBinaryLock:
    """A binary lock taken as an OS file lock (fcntl, the whole file) on this host."""

    __slots__ = ("fd", "mode", "path", "released")

    def __init__(self, fd: int, path: str, mode: int) -> None:
        self.fd = fd
        self.path = path
        self.mode = mode
        self.released = False

    @classmethod
    def take(cls, path: str, mode: int, *, wait: bool, timeout: float | None, create: bool) -> LocalBinaryLock:
        """Lock ``path`` whole: shared for NL, CR and PR, exclusive for CW, PW and EX."""
        shared = mode in (Mode.NL, Mode.CR, Mode.PR)
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                fd = os.open(path, flags, 0o666)
            except PermissionError:
                if not shared:
                    raise
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise DlsError(f"cannot take the binary lock of {path!r}: {exc.strerror}") from None
        arg = struct.pack(_FLOCK, fcntl.F_RDLCK if shared else fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        deadline = None if timeout is None or not wait else time.monotonic() + timeout
        pause = 0.005
        try:
            while True:
                try:
                    fcntl.fcntl(fd, _SETLKW if wait and deadline is None else _SETLK, arg)
                    return cls(fd, path, mode)
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno not in _BUSY:
                        raise DlsError(f"cannot take the binary lock of {path!r}: {exc.strerror}") from None
                if not wait:
                    raise LockRefused(f"binary lock {path}: held by another process on this host", _LOCAL_HOLDER)
                assert deadline is not None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockTimeout(f"binary lock {path}: still held by another process on this host "
                                      "when the wait ended", _LOCAL_HOLDER)
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.1)
        except BaseException:
            os.close(fd)
            raise

    def release(self) -> None:
        if not self.released:
            self.released = True
            os.close(self.fd)  # closing the descriptor releases its lock

    def __enter__(self) -> LocalBinaryLock:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<LocalBinaryLock {self.path} {Mode(self.mode).name}>"


#: The holder reported for a local binary lock: the OS does not say who (pid 0).
_LOCAL_HOLDER = Holder(0, 0, 0, 0, 0, "this host")


if TYPE_CHECKING:
    from .local import LocalClient

_process_client: Client | LocalClient | None = None
_process_pid = 0
_process_lock = threading.Lock()


def get_client() -> Client | LocalClient:
    """This process's client, connected on first use (a forked child gets its own).

    With JDLS unset and dls-shm installed (``dls-client[local]``), a LocalClient
    locking directly on this host (shown as 0.0.0.0): in the instance's table when
    it exists, else as OS file locks in $JDLS_LOCK_DIR (default /tmp/jbase), as a
    lock service without a table does. Otherwise a Client through the listener
    JDLS names (see dls_client.local).
    """
    global _process_client, _process_pid
    with _process_lock:
        if _process_client is None or _process_pid != os.getpid():
            from .local import LocalClient, local_mechanism

            mechanism = local_mechanism() if "JDLS" not in os.environ else None
            _process_client = Client() if mechanism is None else LocalClient()
            _process_pid = os.getpid()
        return _process_client

"""One connection to one lock service, shared by all threads of a process.

There is no reader thread: whichever thread needs a reply and finds the socket
free reads it, delivering what belongs to others into their mailboxes (the
leader/follower pattern). A lone thread therefore pays one ``send`` and one
``recv`` per request, and a thread whose lock waits on the server does not
keep other threads from getting their answers: while it reads, it hands theirs
over as they come.

Replies for requests nobody awaits (an Unlock is not answered unless it fails)
go to ``unsolicited``.

A channel that failed stays failed (a new one is opened, see dls_client.route);
it keeps when it failed and the lock-delay its Welcome gave, which together say
until when the service keeps the locks held through it.
"""

from __future__ import annotations

import errno
import itertools
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dls_proto import (
    CLIENT_MAX_FRAME,
    HEADER_SIZE,
    SINCE,
    Connection,
    ConnectionClosed,
    Echo,
    Error,
    Event,
    Hello,
    InfoPut,
    LocalProtocolError,
    Lock,
    Message,
    NeedData,
    RemoteProtocolError,
    Role,
    Server,
    Settings,
    SpinningReader,
    UnknownMessage,
    Unlock,
    Waiting,
    Welcome,
    jdls,
)
from dls_proto.text import amount

from .errors import AcknowledgementTimeout, InvalidRequest, ServiceUnavailable
from .replies import is_grant
from .trace import Tracer, reply_line, request_line

if TYPE_CHECKING:
    import ssl  # and dls_proto.tls: imported when a channel speaks TLS, not by a plain client

#: Seconds a server has to accept a connection (and its TLS handshake): dls-proto's, which jdls -C and
#: dls-test use too.
CONNECT_TIMEOUT = jdls.CONNECT_TIMEOUT
#: The first protocol version whose lock server can be told the client's acknowledgement timeout (Settings).
SETTINGS_VERSION = SINCE[Settings]
#: A lock server of protocol version 2 cannot be told: its interim messages come this often (seconds), and a
#: client of a shorter TIMEOUT waits this long for its answers instead (dls-proto's, which dls-jdls(7) states).
VERSION2_INTERIM_PERIOD = jdls.VERSION2_INTERIM_PERIOD
VERSION2_ACK_TIMEOUT = jdls.VERSION2_ACK_TIMEOUT
_KEEPALIVE = (2, 1, 3)  # idle, interval, probes (seconds, seconds, count)
#: Seconds within which a lock server that went silent (its host down, the link cut) is found dead: by
#: keepalive while the connection is idle (2 s, then 3 probes 1 s apart), by TCP_USER_TIMEOUT (set to it)
#: while something sent stays unacknowledged. A client must reclaim its locks this long before the
#: service's lock-delay ends, since the service may have counted the delay from the failure itself.
DEAD_SERVER_BOUND = float(_KEEPALIVE[0] + _KEEPALIVE[1] * _KEEPALIVE[2])
#: What a look for a hang-up polls a socket for: a hang-up or an error, never data (a live connection never
#: reports these, however many replies wait on it).
HANGUP = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
#: The messages of the lock path, whose encoders a channel checks once (``Connection.encoder``), not at
#: every message: in every protocol version, once greeted.
_LOCK_PATH = (Lock, Unlock)


def tcp_connect(server: Server, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A TCP connection to ``server`` within ``timeout`` seconds, without Nagle's delay, found dead within
    DEAD_SERVER_BOUND if the server goes silent (OSError when it cannot be made)."""
    sock = jdls.connect(server, timeout)
    tune(sock)
    return sock


def tune(sock: socket.socket) -> None:
    """A connection to a lock server without Nagle's delay, found dead within DEAD_SERVER_BOUND if the server
    goes silent (``tcp_connect``'s, and the asyncio client's, dls_client.aio)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, probes = _KEEPALIVE
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(DEAD_SERVER_BOUND * 1000))


#: How a channel reaches its server within a timeout: a connected socket, or OSError (tests give one end of
#: a socketpair).
Connect = Callable[[Server, float], socket.socket]


class Channel:
    """One greeted connection to one lock server: requests out, each reply to the thread awaiting it.

    ``ack_timeout`` is how long a request may wait in silence (JDLS TIMEOUT; None
    with WAIT); ``unsolicited`` gets the replies nobody awaits (a failed unlock's
    Error); ``on_failure`` hears, once, why the connection was lost. Once lost, a
    channel stays lost: every call raises the same ServiceUnavailable.
    ``connect`` reaches the server (TCP by default). ``open_timeout`` bounds the
    connection and the greeting (default: CONNECT_TIMEOUT to connect, then
    ack_timeout), for a client that must know within a deadline. With WAIT
    (``ack_timeout`` None) the greeting is still bounded, by ``greeting_timeout``
    (JDLS TIMEOUT): WAIT lets a lock request wait, not a stopped or hung
    listener keep the client forever (dls-jdls(7): TIMEOUT includes the greeting).
    """

    def __init__(
        self, server: Server, hello: Hello, *, ack_timeout: float | None,
        unsolicited: Callable[[Message], None], on_failure: Callable[[str], None] | None = None,
        connect: Connect = tcp_connect, open_timeout: float | None = None, tls_context: ssl.SSLContext | None = None,
        tracer: Tracer | None = None, greeting_timeout: float = jdls.DEFAULT_TIMEOUT,
    ) -> None:
        self.server = server
        #: Who this client said it is (its port and pid: how a holder the service names is known as this one).
        self.hello = hello
        self.ack_timeout = ack_timeout
        self._tracer = tracer
        #: The trace's line writer while the trace is on, else None: the hot path tests only this.
        self._trace = tracer.verbose if tracer is not None and tracer.enabled else None
        #: While tracing: when each request was sent (time.perf_counter()), by request id, for its replies.
        self._sent_at: dict[int, float] = {}
        self._unsolicited = unsolicited
        self._on_failure = on_failure
        connect_timeout = CONNECT_TIMEOUT if open_timeout is None else max(open_timeout, 0.001)
        try:
            self.sock = connect(server, connect_timeout)
            if tls_context is not None:
                from dls_proto import tls

                self.sock = tls.wrap(self.sock, tls_context, server.host, connect_timeout)
        except OSError as exc:
            raise ServiceUnavailable(
                f"connection failed for host '{server.host}', service '{server.port}', error {_reason(exc)}"
            ) from None
        self.sock.settimeout(None)
        # A kernel receive timeout keeps the socket blocking (one syscall per recv)
        # and still lets a reader notice silence. An SSL socket would retry its read
        # at once when the kernel's timeout passes: it gets a socket timeout instead.
        slice_ = 1.0 if ack_timeout is None else min(ack_timeout, 1.0)
        #: Over TLS, held by every use of the SSL object (threads may not share one at once); the socket is
        #: then non-blocking and the reader waits for data with a poll, outside the lock (SpinningReader).
        self._tls_guard = threading.Lock() if tls_context is not None else None
        if tls_context is not None:
            self.sock.settimeout(0.0)
        else:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(slice_),
                                                                                    int(slice_ % 1 * 1e6)))
        self.conn = Connection(Role.CLIENT, max_frame=CLIENT_MAX_FRAME)
        self._read_socket = SpinningReader(self.sock, guard=self._tls_guard, slice_=slice_).read
        #: ``hung_up``'s poll, made once: the lock path looks at every release (Route.release).
        self._hangup = select.poll()
        self._hangup.register(self.sock.fileno(), HANGUP)
        #: The encoders of the lock path's messages, and the packer of its Unlock frames (``unlock``), checked
        #: once greeted (until then, every message goes through the connection's checks).
        self._encoders: dict[type[Message], Callable[[Message], bytes]] = {}
        self._pack_unlock: Callable[..., bytes] | None = None
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._cond = threading.Condition()
        self._mail: dict[int, list[Message]] = {}
        self._followers = 0
        self._failing = threading.Lock()
        self.failure: ServiceUnavailable | None = None
        #: When the channel failed (time.monotonic()), None while it works.
        self.failed_at: float | None = None
        #: The largest frame body the server takes (Welcome's max_frame; unbounded until it says).
        self.max_frame = CLIENT_MAX_FRAME
        greeting = open_timeout if open_timeout is not None else ack_timeout if ack_timeout is not None else \
            greeting_timeout
        self.welcome = self._greet(hello, greeting)
        self.max_frame = self.welcome.max_frame or CLIENT_MAX_FRAME
        self._encoders = {cls: self.conn.encoder(cls) for cls in _LOCK_PATH}
        self._pack_unlock = self.conn.packer(Unlock)

    @property
    def lock_delay(self) -> float:
        """Seconds the service keeps the locks of a client whose connection it lost (its Welcome's)."""
        return self.welcome.lock_delay_ms / 1000

    def _greet(self, hello: Hello, timeout: float) -> Welcome:
        self.send(hello)
        try:
            reply = self._expect(hello.request_id, time.monotonic() + timeout, timeout)
        except ServiceUnavailable:
            self.close()
            raise
        if isinstance(reply, Error):
            self.close()
            raise ServiceUnavailable(f"lock service {self.server} refused the connection: {reply.reason}")
        if not isinstance(reply, Welcome):
            self.close()
            raise ServiceUnavailable(f"lock service {self.server} answered Hello with {type(reply).__name__}")
        self._tell_timeout(reply.version)
        return reply

    def _tell_timeout(self, version: int) -> None:
        """Make the lock server's interim messages come within the acknowledgement timeout: tell it the timeout
        (version 3 on); a lock server of version 2 cannot be told, so wait for it long enough to hear its
        interim messages (VERSION2_ACK_TIMEOUT), and say so."""
        timeout = self.ack_timeout
        if timeout is None:
            return  # JDLS WAIT: no interim messages, no timeout
        if version >= SETTINGS_VERSION:
            self.send(Settings(self.next_id(), 0, min(max(1, round(timeout * 1000)), 0xFFFFFFFF)))
        elif timeout < VERSION2_ACK_TIMEOUT:
            self.ack_timeout = VERSION2_ACK_TIMEOUT
            if self._tracer is not None:
                self._tracer.error(
                    f"Client: lock service {self.server} speaks protocol version {version}, whose interim messages "
                    f"come every {VERSION2_INTERIM_PERIOD:g} s: answers are awaited {VERSION2_ACK_TIMEOUT:g} s, "
                    f"not TIMEOUT={timeout:g}")

    def next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF or next(self._ids)

    def send(self, message: Message) -> None:
        """Send a message; if it expects replies, ``expect`` its request id afterwards."""
        if self.failure is not None:
            raise self.failure
        if self._trace is not None:
            self._trace_sent(message)
        encode = self._encoders.get(type(message))
        if encode is None:
            data = self._encode(message)
        else:
            try:
                data = encode(message)
            except Exception:  # a field no frame can carry
                data = self._encode(message)  # which says which (InvalidRequest)
        if len(data) - HEADER_SIZE > self.max_frame:  # the server would drop the connection, every lock with it
            raise InvalidRequest(f"a {type(message).__name__} request of {len(data) - HEADER_SIZE} bytes is more "
                                 f"than lock service {self.server} takes ({self.max_frame}, its --max-frame)")
        self._write(data)

    def unlock(self, handle: int) -> None:
        """Send an Unlock of the service's lock ``handle`` (unanswered unless it fails): ``send``'s, without the
        message (the lock path's; its frame packed from the fields once greeted)."""
        pack = self._pack_unlock
        if pack is None or self._trace is not None:
            self.send(Unlock(self.next_id(), handle))
            return
        if self.failure is not None:
            raise self.failure
        self._write(pack(self.next_id(), handle))

    def _write(self, data: bytes) -> None:
        """Write a whole frame (threads one at a time: frames are never interleaved); the channel fails if the
        connection does."""
        self._send_lock.acquire()  # not ``with``: its calls cost more than the lock (twice per lock/unlock cycle)
        try:
            if self._tls_guard is None:
                self.sock.sendall(data)
            else:
                self._send_tls(data)
        except OSError as exc:
            raise self.fail(f"sending to lock service {self.server} failed: {_reason(exc)}") from None
        finally:
            self._send_lock.release()

    def _encode(self, message: Message) -> bytes:
        """The frame of ``message``, through the connection's checks; InvalidRequest for a field no frame can
        carry (a FileRef's name that is not text)."""
        try:
            return self.conn.send(message)
        except LocalProtocolError as exc:
            raise InvalidRequest(f"cannot send a {type(message).__name__} request: {exc}") from None

    def hung_up(self) -> bool:
        """Whether the socket says now that the service hung up or failed (a poll that does not wait; the
        first look of a closed socket says so too): no round trip, one system call."""
        try:
            return bool(self._hangup.poll(0))
        except RuntimeError:  # another thread is looking through it this instant (threads share a channel)
            fd = self.sock.fileno()
            if fd < 0:
                return True  # closed by another thread as the channel failed
            poller = select.poll()
            poller.register(fd, HANGUP)
            return bool(poller.poll(0))

    def _send_tls(self, data: bytes) -> None:
        """``sendall`` over TLS on the non-blocking socket, touching the SSL object only under the guard; a
        full socket buffer is waited for outside it (a reader may need the guard to drain what the service
        sends meanwhile). TimeoutError when the service takes nothing for a dead-server bound."""
        import ssl  # loaded already: the socket is a TLS one

        guard = self._tls_guard
        assert guard is not None
        view = memoryview(data)
        fd = self.sock.fileno()
        if fd < 0:  # closed by another thread as the channel failed: an OSError, as a send on it would be
            raise OSError(errno.EBADF, "the connection was closed")
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while view:
            with guard:
                try:
                    view = view[self.sock.send(view):]
                    continue
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    pass
            if not poller.poll(int(DEAD_SERVER_BOUND * 1000)):
                raise TimeoutError("the lock service takes nothing that is sent")

    def _trace_sent(self, message: Message) -> None:
        """The trace line of a request (or Hello) about to be sent; its time is kept for its replies'."""
        assert self._trace is not None
        if type(message) not in _UNANSWERED:
            self._sent_at[message.request_id] = time.perf_counter()
        self._trace(f"Client: to {self.server}: {request_line(message)}")

    def _trace_received(self, message: Message) -> None:
        """The trace line of a reply just read: what it says, and the time since its request was sent (an interim
        Waiting keeps that time for the replies after it)."""
        assert self._trace is not None
        rid = message.request_id
        sent = self._sent_at.get(rid) if type(message) is Waiting else self._sent_at.pop(rid, None)
        took = "" if sent is None else f" after {(time.perf_counter() - sent) * 1000:.3f} ms"
        self._trace(f"Client: from {self.server}: {reply_line(message)}{took}")

    def request(self, message: Message) -> Message:
        """Send a request and return its first reply."""
        rid = message.request_id
        self._mail[rid] = []  # register(rid) and expect(rid), without their calls: this is the lock path
        self.send(message)
        return self._expect(rid, None if self.ack_timeout is None else time.monotonic() + self.ack_timeout)

    def last_reply(self, rid: int, reply: Message, on_interim: Callable[[Waiting], None] | None = None) -> Message:
        """The last reply to request ``rid``, whose first reply was ``reply``: each interim Waiting before it
        goes to ``on_interim``."""
        while type(reply) is Waiting:
            if on_interim is not None:
                on_interim(reply)
            reply = self.expect(rid)
        return reply

    def confirmed(self, message: Message) -> Message | None:
        """Send ``message``, a request answered only when it fails (a Release), and learn whether it failed: its
        answer (an Error), or None. An Echo follows it, whose reply comes after any answer of the request (the
        service answers in order): one round trip, for a request that must not fail unseen."""
        rid = message.request_id
        self.register(rid)
        try:
            self.send(message)
            self.request(Echo(self.next_id(), b""))
        finally:
            box = self._mail.pop(rid, None)
        return box[0] if box else None

    def register(self, rid: int) -> None:
        """Announce that replies to ``rid`` will be awaited (call before sending)."""
        self._mail[rid] = []

    def forget(self, rid: int) -> None:
        """Replies to ``rid`` are no longer awaited (its caller gave up): they go to ``unsolicited``."""
        self._mail.pop(rid, None)

    def expect(self, rid: int, *, until: float | None = None) -> Message:
        """The next message for request ``rid``; AcknowledgementTimeout after ack_timeout of silence (or at
        ``until``, time.monotonic(), when given)."""
        if until is None and self.ack_timeout is not None:
            until = time.monotonic() + self.ack_timeout
        return self._expect(rid, until)

    def _expect(self, rid: int, deadline: float | None, allowed: float | None = None) -> Message:
        """``expect``, until ``deadline``; the AcknowledgementTimeout then says ``allowed`` seconds (default:
        ack_timeout) were given."""
        box = self._mail.get(rid)
        if box is None:  # not registered by its caller
            box = self._mail[rid] = []
        while True:
            if box:
                message = box.pop(0)
                if not box and type(message) is not Waiting:  # the last reply to rid: nothing more comes
                    self._mail.pop(rid, None)
                return message
            if self.failure is not None:
                self._mail.pop(rid, None)
                raise self.failure
            if self._read_lock.acquire(blocking=False):
                try:
                    read = self._read(rid, box, deadline)
                finally:
                    self._read_lock.release()
                    if self._followers:
                        with self._cond:
                            self._cond.notify_all()
                if read is not None:  # read by this thread, nothing before it: the box stays empty
                    if type(read) is not Waiting:
                        self._mail.pop(rid, None)
                    return read
            else:
                with self._cond:
                    self._followers += 1
                    try:
                        self._cond.wait_for(lambda: bool(box) or not self._read_lock.locked()
                                            or self.failure is not None,
                                            None if deadline is None else max(0.0, deadline - time.monotonic()))
                    finally:
                        self._followers -= 1
            if not box and deadline is not None and time.monotonic() >= deadline:
                self._mail.pop(rid, None)
                timeout = AcknowledgementTimeout(
                    f"lock service {self.server} did not answer within "
                    f"{amount(allowed if allowed is not None else self.ack_timeout or 0, 'second')}")
                timeout.channel = self
                raise timeout

    def _read(self, rid: int, box: list[Message], deadline: float | None) -> Message | None:
        """Read until a message for ``rid`` arrives (returned, or found in ``box``: None), the deadline passes
        (None), or the service is lost."""
        next_event, feed, read = self.conn.next_event, self.conn.receive_data, self._read_socket
        event: Event | NeedData | None
        while not box:
            try:  # dls_proto.receive, without its call: this is the lock path
                event = next_event()
                while isinstance(event, NeedData):
                    feed(read())
                    event = next_event()
            except BlockingIOError:  # a receive-timeout slice passed: look at the deadline
                event = None
            except RemoteProtocolError as exc:
                raise self.fail(f"lock service {self.server} sent bad data: {exc}") from None
            except OSError as exc:
                raise self.fail(f"connection to lock service {self.server} failed: {_reason(exc)}") from None
            if isinstance(event, ConnectionClosed):
                raise self.fail(f"lock service {self.server} closed the connection")
            if event is not None and not isinstance(event, UnknownMessage):
                if self._trace is not None:
                    self._trace_received(event)
                target = event.request_id
                if target == rid:
                    return event
                self._deliver(target, event)
            if deadline is not None and time.monotonic() >= deadline:
                return None
        return None

    def read_idle(self) -> bool:
        """Read what has come while no request thread reads the connection (a blocking notice, say), without
        waiting for more: each message goes where a reader would send it (``_deliver``). False when a request
        thread reads now (it delivers them itself) or the connection failed; True when what was there is read.
        Only a client with locks that asked for blocking notices calls it (``notice_reader``)."""
        if self.failure is not None or not self._read_lock.acquire(blocking=False):
            return False
        try:
            while True:
                event = self.conn.next_event()
                if isinstance(event, NeedData):
                    data = self._recv_now()
                    if data is None:
                        return True
                    self.conn.receive_data(data)
                    continue
                if isinstance(event, ConnectionClosed):
                    self.fail(f"lock service {self.server} closed the connection")
                    return False
                if not isinstance(event, UnknownMessage):
                    if self._trace is not None:
                        self._trace_received(event)
                    self._deliver(event.request_id, event)
        except RemoteProtocolError as exc:
            self.fail(f"lock service {self.server} sent bad data: {exc}")
            return False
        except OSError as exc:
            self.fail(f"connection to lock service {self.server} failed: {_reason(exc)}")
            return False
        finally:
            self._read_lock.release()
            if self._followers:
                with self._cond:
                    self._cond.notify_all()

    def _recv_now(self) -> bytes | None:
        """What the socket holds now (b"" at its end), None when nothing: never waits."""
        if self._tls_guard is None:
            try:
                return self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
        import ssl  # imported already with TLS in use (dls_proto.tls); a client without TLS does without it

        with self._tls_guard:  # the SSL socket is non-blocking already
            try:
                return self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return None

    def _deliver(self, target: int, event: Message) -> None:
        """Hand a reply to the thread awaiting it, or to ``unsolicited`` when none does."""
        other = self._mail.get(target)
        if other is None:
            if is_grant(event):  # a grant nobody awaits (its request gave up): no lock held for nobody
                self.unlock(event.handle)
            self._unsolicited(event)
            return
        other.append(event)
        if self._followers:
            with self._cond:
                self._cond.notify_all()

    def fail(self, message: str) -> ServiceUnavailable:
        """The connection is lost (``message`` says how; the first cause found is kept): close it, wake
        every thread waiting on it, and say so once. Whoever finds it calls this: a reader, a sender,
        or the client's watcher."""
        with self._failing:
            first = self.failure is None
            if first:
                self.failure = ServiceUnavailable(message)
                self.failed_at = time.monotonic()
                _shut(self.sock)
        if first and self._on_failure is not None:
            self._on_failure(f"Client: {message}")
        with self._cond:
            self._cond.notify_all()
        assert self.failure is not None
        return self.failure


    def close(self) -> None:
        """Close the connection (the client's own doing: nothing is said)."""
        with self._failing:
            if self.failure is None:
                self.failure = ServiceUnavailable(f"connection to lock service {self.server} was closed")
                self.failed_at = time.monotonic()
            _shut(self.sock)
        with self._cond:
            self._cond.notify_all()


def _shut(sock: socket.socket) -> None:
    """Shut the socket down first, so that a thread blocked reading it wakes up, then close it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


#: Requests answered only if they fail: the trace keeps no sending time for them.
_UNANSWERED = frozenset({Unlock, InfoPut, Settings})



def _reason(exc: OSError) -> str:
    """What a failed connection says of ``exc`` (dls_proto.tls.failure: ssl is imported for it only when a
    connection has failed)."""
    from dls_proto import tls

    return tls.failure(exc)


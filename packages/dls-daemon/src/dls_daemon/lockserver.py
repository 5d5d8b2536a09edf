"""A lock server: one process, one thread, one client connection.

One process per client, forked by the listener, so that a client's locks are
held by a process that lives exactly as long as its connection. How the
conversation ends decides what becomes of them, in the ``finally`` of ``run``:

- the client is gone (EOF or a reset: its process ended, the kernel closed its
  connection), or it spoke garbage: everything is freed at once;
- the client may live on but is not reachable through this process (SIGTERM
  from ``jdls -k``, its host silent: TCP keepalive or TCP_USER_TIMEOUT within
  the dead-client bound, an unreachable host, or an error of our own): its
  table locks are kept (``keep_owner``: KEPT for the table's lock-delay), for
  the client to take back through a new connection with ``Reclaim``; its
  queued requests are dropped. Its locks are keepable from the start (the
  Owner says so) so that a lock server killed outright (SIGKILL, which runs no
  ``finally``) leaves them keepable too: whoever finds it dead keeps them.

OS file locks go with the process however it dies: nothing of them can be
kept.

A peer is a stranger until proven otherwise: the greeting must be complete
within one deadline measured from accept (however slowly the bytes come); on
a ``-P`` table the port it names must not be another live client's
(``port_claims``); the lock snapshot and the server's host name go only to the
operator addresses (``--admin-allow``); and an Error tells it a code and a
short reason, the detail (paths, geometry, the mechanism's words) going to
the log only. Nothing is shared with the listener after the fork, so the listener may
stop or restart under it.

In a conversation of protocol version 4 the lock server is a lock manager
(issue 14): Lock and Convert are answered with Acquired (a fencing token, and
the value block when asked), a Convert waits as a Lock waits (below), Release
writes the value block, Cancel withdraws a waiting request, a deadlock's victim
is refused DEADLOCK, and a client lost while holding locks has them released as
abandoned (a PW or EX lock leaves its value block not valid). Conversations of
versions 2 and 3 go on exactly as before (Granted).

One thread: requests are answered in the order they came, each by the handler
of its message kind. A Lock that must wait is kept in ``pending`` rather than
blocking: while none waits the server sleeps in ``recv``; while some do, in
``select`` on the socket and its doorbell, until one of them speaks or a timer
is due (a deadline, an interim Waiting message, or the next look the
mechanism's ``pauses()`` asks for). So a waiting request neither blocks the
client's other requests nor costs more than a few system calls a second.

On a TLS port the lock server does the TLS handshake first, within the
handshake timeout, before it reads the Hello: here, in the forked process,
so that a slow handshake never holds up the listener's accept loop. A failed
one (a plain client, a certificate not accepted, none given when one is
required) ends the connection, logged with the reason. From then on the
socket is an SSL socket: bytes already decrypted wait in it where select
cannot see them, so they are taken before any wait.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dls_proto import ALL_THREADS as WIRE_ALL_THREADS
from dls_proto import (
    LOCK_MODES,
    NEED_DATA,
    PROTOCOL_VERSIONS,
    WAIT_FOREVER,
    Acquired,
    Blocking,
    BlockStatus,
    Cancel,
    Connection,
    ConnectionClosed,
    Convert,
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
    Message,
    Reclaim,
    Refused,
    RefuseReason,
    Release,
    RemoteProtocolError,
    Role,
    Settings,
    SpinningReader,
    Status,
    StatusReply,
    UnknownMessage,
    Unlock,
    UnlockAll,
    Unlocked,
    ValueFlag,
    Waiting,
    Welcome,
    choose_version,
    generate_codecs,
    kind_since,
    not_a_mode,
    receive,
    tls,
)
from dls_shm import (
    INDEX_BITS,
    Conflict,
    Deadlock,
    Doorbell,
    Grant,
    GroupFull,
    Holder,
    HolderWatch,
    LockMechanism,
    NotHeld,
    NoticeBell,
    NotWritable,
    Owner,
    PidRecord,
    Queued,
    TableError,
    TableMissing,
    TableServes,
    Unsupported,
    pack_ip,
    pidfiles,
    readable,
    unpack_ip,
)
from dls_shm.info import Written

from . import client_info, local_peer, port_claims
from .context import FIRST_INTERIM_DELAY, ServerContext, in_ranges, interim_period_for, peer_ip
from .exitcodes import ExitCode
from .mechanisms import Mechanisms
from .meter import Meter
from .service_snapshot import snapshot

# dls-proto generates each message kind's codec on first use (a client's start-up needs few): here, in the
# listener, before it forks the lock servers, rather than again in each lock server on its first messages.
generate_codecs()

#: Why a peer is refused the lock snapshot: its address is not an operator's (--admin-allow), or it is a
#: local user (loopback, which every local user connects from) who may not read the lock table itself.
NOT_AN_OPERATOR_ADDRESS = "this address is not in the service's --admin-allow"
NOT_AN_OPERATOR_USER = ("a local user must be an operator: the service's user, root, or a member of the "
                        "service's group")
#: The highest mode a Lock may ask for (the wire's field is unsigned, so that bounds it).
_MAX_MODE = LOCK_MODES[-1]
#: The OSLOCK flag as a plain int, for the lock path (IntFlag arithmetic is slower).
_OSLOCK = int(LockFlag.OSLOCK)
#: The Lock flags of version 4, and VALUE_BLOCK alone, as plain ints (the lock path tests them).
_V4_FLAGS = int(LockFlag.VALUE_BLOCK | LockFlag.NOTIFY)
_VALUE_BLOCK = int(LockFlag.VALUE_BLOCK)
_NOTIFY = int(LockFlag.NOTIFY)
#: The Lock flags a Convert may carry: the value block read at the grant, notices, no interim messages.
_CONVERT_FLAGS = int(LockFlag.VALUE_BLOCK | LockFlag.NOTIFY | LockFlag.NO_INTERIM)
#: The value flags a Convert or a Release may carry.
_VALUE_FLAGS = int(ValueFlag.WRITE | ValueFlag.INVALIDATE)
#: The protocol version from which Lock and Convert are answered with Acquired (fencing token, value block).
ACQUIRED_VERSION = 4
#: TCP keepalive probes a silent client gets before it is given up (the times follow from the bound).
KEEPALIVE_PROBES = 5
#: The shortest time data sent to a client may stay unacknowledged (ms), however long it was silent.
MIN_USER_TIMEOUT_MS = 1000
#: struct tcp_info (Linux): tcpi_last_ack_recv, milliseconds since the peer last acknowledged anything.
_TCP_INFO_SIZE = 104
_LAST_ACK_RECV = struct.Struct("=I")
_LAST_ACK_RECV_OFFSET = 56
#: Refused reclaims a connection is answered at once; each one after them waits RECLAIM_TARPIT seconds, so that
#: guessing the handle of a kept lock takes longer than the lock is kept, while a client whose kept locks
#: have expired is told so about as fast as before.
FREE_RECLAIM_FAILURES = 32
_INDEX_MASK = (1 << INDEX_BITS) - 1
#: A seal fills a handle above the slot index.
_SEAL_BYTES = (64 - INDEX_BITS) // 8
RECLAIM_TARPIT = 0.01
#: Connection errors that say the client's host cannot be reached, not that the client has gone.
_UNREACHABLE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})


def keepalive_for(bound: float) -> tuple[int, int, int]:
    """TCP keepalive (idle, interval, count) in whole seconds that gives up on a silent client within
    ``bound`` seconds (the dead-client bound; 15 s gives jDLS-like 5 s idle, then 5 probes 2 s apart)."""
    whole = max(2, int(bound))
    idle = max(1, whole // 3)
    interval = max(1, (whole - idle) // KEEPALIVE_PROBES)
    return idle, interval, max(1, (whole - idle) // interval)


def _holder_fields(h: Holder) -> tuple[int, int, int, int, int, str]:
    """A holder as Refused, Waiting and StatusReply carry it: mode, pid, port, client pid, thread, address."""
    return h.mode, h.pid, h.port, h.client_pid, h.thread, unpack_ip(h.ip)


def _sooner(retry_at: float, expires: float, now: float) -> float:
    """When to look again at a waiting request: at ``retry_at`` (monotonic), or when the kept lock in its
    way expires (``expires``, wall clock; 0: none), whichever comes first: nobody rings at an expiry."""
    return min(retry_at, now + max(0.0, expires - time.time())) if expires else retry_at


class ClientGone(Exception):
    """The conversation is over; the reason says how it ended."""


class HandshakeFailed(ClientGone):
    """The TLS handshake failed: the reason says why (a plain client, a certificate not accepted)."""


@dataclass
class _Pending:
    """A Lock, or a Convert, that waits: looked at again when the doorbell rings or one of its timers is due.
    ``handle`` is the waiting request's (a conversion waits in a slot of its own, the lock held meanwhile in
    its old mode); ``thread`` is the owner thread (a Convert's is its lock's)."""

    request: Lock | Convert
    thread: int
    handle: int
    holder: Holder
    started: float
    deadline: float | None
    next_interim: float | None
    mechanism: LockMechanism
    pauses: Iterator[float]  # the mechanism's pauses between looks when not rung
    retry_at: float
    #: The processes whose end may let it on (``Queued.watched``), watched while it waits.
    watch: tuple[int, ...] = ()
    #: Those found ended whose locks stay in the way (kept for their clients): not watched again.
    ended: set[int] = field(default_factory=set)


class Stats:
    """What this lock server has done for its client, appended to the client's proc/info document each time the
    client publishes it (the guide's "appended statistics"): counted here as it happens, one integer addition a
    request, and written only with the document.

    ``granted``: locks granted (at once, after a wait, or reclaimed); ``waited``: requests that had to wait;
    ``retries``: looks again at a waiting request that did not grant it; ``refused``: requests refused at once
    because the lock was held (no wait asked); ``timeouts``: waits that ended without the lock;
    ``released``: locks released by the client; ``info_updates``: documents received.
    """

    __slots__ = ("granted", "info_updates", "refused", "released", "retries", "started", "timeouts", "waited")

    def __init__(self) -> None:
        self.started = time.time()
        self.granted = self.waited = self.retries = self.refused = self.timeouts = self.released = 0
        self.info_updates = 0

    def document(self, server: LockServer) -> dict[str, object]:
        """The figures as the document's "stats" object, with what the server holds and queues now."""
        return {
            "connected": self.started, "locks_granted": self.granted, "lock_waits": self.waited,
            "lock_retries": self.retries, "locks_refused": self.refused, "lock_timeouts": self.timeouts,
            "locks_released": self.released, "locks_held": len(server.held), "requests_waiting": len(server.pending),
            "info_updates": self.info_updates,
        }


class LockServer:
    """Serves one client connection, in a process of its own forked by the listener: takes locks on
    the client's behalf, answers its requests in order, and releases everything it held when it goes.

    One request, one path: ``_loop`` hands each event to the handler of its kind; a Lock that must
    wait is kept in ``pending`` and served from the same loop, so it never blocks the client's other
    requests.
    """

    def __init__(self, sock: socket.socket, peer: tuple[str, int], ctx: ServerContext,
                 record: PidRecord | None = None) -> None:
        self.sock = sock
        self.peer = peer
        self.ctx = ctx
        self.log = ctx.log
        self.conn = Connection(Role.SERVER, max_frame=ctx.limits.max_frame)
        self.pid = os.getpid()
        self.hello: Hello | None = None
        self.held: dict[int, int] = {}  # handle -> thread id, of every mechanism
        self.routes: dict[int, LockMechanism] = {}  # handle -> mechanism, for handles not of the main one
        self.pending: dict[int, _Pending] = {}  # request id -> waiting request
        self.owners: dict[int, Owner] = {}
        #: Whether this client's locks are keepable: the table has a lock-delay (read at the greeting).
        self._keep = False
        self._bell: Doorbell | None = None
        self._token = 0  # the doorbell's, once made
        #: The doorbell the table sends this client's blocking notices to (made with the first Lock asking for
        #: them, NOTIFY), and the locks that asked: their handle and the id of the Lock that took each.
        self._notices: NoticeBell | None = None
        self._notice_ids: dict[int, int] = {}
        self._finished = False
        #: The processes that waiting requests wait on, watched: the end of one wakes this lock server.
        self._watch = HolderWatch()
        self.ip = pack_ip(peer[0]) if peer[0] else pack_ip("0.0.0.0")  # noqa: S104 - an address to display, not to bind
        self.info_path: Written | None = None
        #: This lock server's pid and start time, named in its client's document (its pid file's, else found on its
        #: first InfoPut).
        self._record = record
        self.stats = Stats()
        #: What /metrics counts of this lock server, sent to the monitor at most once a second (``meter``).
        self.meter = Meter(ctx.instance.run_dir)
        #: When the doorbell last woke this lock server for its waiting requests (0: not in that round).
        self._rang_at = 0.0
        self._deadline = 0.0  # of the greeting, set when the conversation starts (run)
        #: Reclaims refused on this connection (past FREE_RECLAIM_FAILURES, each answer is delayed).
        self._failed_reclaims = 0
        #: The handles the client knows of its table locks (a random seal in place of the table's sequential
        #: ticket, see ``_granted``), both ways; other mechanisms' handles are the client's as they are.
        self._outer: dict[int, int] = {}
        self._inner: dict[int, int] = {}
        self._seal_bytes = b""
        self._seal_at = 0
        #: The descriptor holding this client's port on a -P table (see port_claims); None otherwise.
        self._port_claim: int | None = None
        #: Whether the peer is an operator's (--admin-allow): it may read the lock snapshot.
        self._admin: bool | None = None  # found when first asked (see ``admin``)
        #: Why the peer is not an operator (see ``admin``), as the refusal says it.
        self._not_admin = NOT_AN_OPERATOR_ADDRESS
        self.mechanisms = Mechanisms(ctx.table, ctx.lock_dir, ctx.binary_lock_dir, ctx.instance.key, gid=ctx.gid)
        #: The connection's mechanism: the table if the listener has one, else OS record locks.
        self.main = self.mechanisms.main
        self._routed = self.mechanisms.routed
        #: Whether the log said how this client's OSLOCK requests are served (once per connection).
        self._told_oslock = False
        self._max_locks = ctx.limits.max_locks_per_client
        self._handlers: dict[type, Callable[[Any], None]] = {
            Lock: self._lock, Unlock: self._unlock, UnlockAll: self._unlock_all, Status: self._status,
            Echo: self._echo, InfoPut: self._info_put, InfoGet: self._info_get, UnknownMessage: self._unknown,
            ConnectionClosed: self._closed, Reclaim: self._reclaim, Settings: self._settings,
            Convert: self._convert, Release: self._release, Cancel: self._cancel,
        }
        #: Whether Lock and Convert are answered with Acquired (the conversation's version is 4 or later).
        self._acquired = False
        #: Seconds between interim Waiting messages: the limits', or shorter for a client whose
        #: acknowledgement timeout is short (protocol version 3's Settings).
        self.interim_period = ctx.limits.interim_period

    # -- the conversation ------------------------------------------------------

    def run(self) -> int:
        """Greet the client, serve it until it goes; then release what it held, or keep it for the client
        to reclaim when the client may live on (see the module's docstring); the exit status."""
        self._configure_socket()
        #: The greeting (TLS handshake and Hello) must be done by then, however slowly its bytes come.
        self._deadline = time.monotonic() + self.ctx.limits.handshake_timeout
        keep = False
        try:
            try:
                self._serve()
            except HandshakeFailed as exc:
                self.log.warning("closing connection from %s: TLS handshake failed: %s", self._who(), exc)
            except Stopped as stop:
                keep = True
                self.log.info("serving %s no more: %s", self._who(), stop)
            except ClientGone as gone:
                self.log.info("client %s closed: %s", self._who(), gone)
            except RemoteProtocolError as exc:
                self.log.warning("closing connection from %s: %s", self._who(), exc)
                self._send_quietly(Error(0, ErrorCode.PROTOCOL, str(exc)))
            except TimeoutError as exc:
                if self.hello is None:
                    self.log.warning("closing connection from %s: no Hello within %s s", self._who(),
                                     self.ctx.limits.handshake_timeout)
                else:  # keepalive or unacknowledged data: the client's host is silent, the client may live
                    keep = True
                    self.log.info("connection from %s lost: %s (its host is silent)", self._who(), exc)
            except (ConnectionError, OSError) as exc:
                keep = exc.errno in _UNREACHABLE
                self.log.info("connection from %s lost: %s", self._who(), exc)
            except BaseException:
                keep = True  # an end the client had no part in: it may be alive and holding on
                raise
            finally:
                while True:
                    try:
                        self._finish(keep)
                        break
                    except Stopped:  # the signal came before the end began: the client may live on
                        keep = True
        except Stopped as late:  # a SIGTERM while the end above was being decided: that end is made
            self.log.info("serving %s no more: %s", self._who(), late)
        return ExitCode.OK

    def _serve(self) -> None:
        if self.ctx.tls is not None:
            self._start_tls(self.ctx.tls)
        self._greet()
        self._loop()

    def _finish(self, keep: bool) -> None:
        """End once: from now a SIGTERM (jdls -k reaching a lock server already ending) changes nothing; it
        used to break the release off half done, with a traceback."""
        global _ending
        _ending = True  # first: from here on, _stop raises nothing
        if self._finished:
            return
        self._finished = True
        try:
            self._end(keep)
        finally:
            self.meter.stop()  # the last counts to the monitor
        self.sock.close()

    def _end(self, keep: bool) -> None:
        """Let go of everything, keeping the table locks (``keep``) for a client that may live on; say so."""
        released, kept = self.release_everything(keep=keep)
        if kept:
            delay = self.mechanisms.table.lock_delay if self.mechanisms.table is not None else 0.0
            self.log.info("kept %d lock(s) of %s for %g s, for it to reclaim", kept, self._who(), delay)
        if released:
            self.log.info("released %d lock(s) of %s", released, self._who())

    def _configure_socket(self) -> None:
        """No Nagle; and a client host that vanishes without a word is given up within the dead-client
        bound: by keepalive while the connection is idle, by TCP_USER_TIMEOUT while data sent to it
        (an interim Waiting message, say) stays unacknowledged."""
        sock = self.sock
        bound = self.ctx.limits.dead_client_bound
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = keepalive_for(bound)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(MIN_USER_TIMEOUT_MS, int(bound * 1000)))

    def _who(self) -> str:
        hello = self.hello
        where = f"{self.peer[0]}:{self.peer[1]}"
        return f"{where} (port {hello.port}, pid {hello.pid})" if hello else where

    def _start_tls(self, context: ssl.SSLContext) -> None:
        """The TLS handshake, within the handshake deadline; HandshakeFailed says why it failed."""
        timeout = self.ctx.limits.handshake_timeout
        self.sock = sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        sock.settimeout(max(0.001, self._deadline - time.monotonic()))  # one deadline for the whole handshake
        try:
            sock.do_handshake()
        except ssl.SSLError as exc:
            raise HandshakeFailed(tls.describe(exc)) from None
        except TimeoutError:
            raise HandshakeFailed(f"not done within {timeout:g} s") from None
        except OSError as exc:
            raise HandshakeFailed(f"connection lost: {exc.strerror or exc}") from None
        sock.settimeout(None)
        subject = (sock.getpeercert() or {}).get("subject")
        self.log.debug("TLS with %s: %s, %s%s", self._who(), sock.version(), (sock.cipher() or ("?",))[0],
                       f", client certificate of {subject}" if subject else "")

    def _greet(self) -> None:
        """Read the Hello within the handshake deadline, counted from accept (the TLS handshake included): a
        peer that sends a byte now and then gets no more time than a silent one. Then answer it (Welcome), or
        refuse it (Error)."""
        deadline = self._deadline

        def read() -> bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("handshake deadline passed")
            self.sock.settimeout(left)
            return self.sock.recv(65536)

        event = receive(self.conn, read)
        self.sock.settimeout(None)
        if not isinstance(event, Hello):
            raise ClientGone("closed before Hello")
        version = choose_version(event)
        if version is None:
            self._send(Error(event.request_id, ErrorCode.VERSION,
                             f"client speaks versions {event.min_version}..{event.max_version}, server speaks "
                             f"{PROTOCOL_VERSIONS[0]}..{PROTOCOL_VERSIONS[1]}"))
            raise ClientGone("no common protocol version")
        self.hello = event
        self._acquired = version >= ACQUIRED_VERSION
        table = self.mechanisms.table
        if table is not None and table.port_owners:
            self._claim_port(event)
        delay = table.lock_delay if table is not None else 0.0
        self._keep = delay > 0
        # What jdls -C shows an operator's address; nobody else's business (the user is looked up only for the
        # snapshot: a greeting costs no scan of the system's connections).
        host = socket.gethostname() if in_ranges(self.peer[0], self.ctx.admin_ranges) else ""
        self._send(Welcome(event.request_id, version, self.mechanisms.kind, 0, self.pid, self.ctx.limits.max_frame,
                           min(round(delay * 1000), 0xFFFFFFFF), self.peer[0], host))
        self.log.info("client %s connected", self._who())

    def _claim_port(self, hello: Hello) -> None:
        """On a -P table, hold the port the Hello names (port_claims); refuse the peer when another client's
        live connection holds it."""
        table = self.mechanisms.table
        assert table is not None
        try:
            self._port_claim = port_claims.claim(self.ctx.instance, hello.port, self.peer[0])
            user = port_claims.used_elsewhere(table, hello.port, self.peer[0])
            if user:
                raise port_claims.PortTaken(f"process {user} holds locks under port {hello.port} in the table")
        except port_claims.PortTaken as exc:
            if self._port_claim is not None:  # a refused peer holds nothing, not even for a moment
                os.close(self._port_claim)
                self._port_claim = None
            self.log.warning("refused client %s: it claims port %d: %s", self._who(), hello.port, exc)
            self._send(Error(hello.request_id, ErrorCode.FORBIDDEN, f"port {hello.port} is in use by another client"))
            self.hello = None  # it is no client of ours: nothing of it is kept or released by port
            raise ClientGone("port claimed by another client") from None
        except OSError as exc:
            self.log.error("client %s: cannot claim port %d: %s", self._who(), hello.port, exc)
            self._send(Error(hello.request_id, ErrorCode.INTERNAL, "the service cannot serve this port now"))
            self.hello = None
            raise ClientGone("port claim failed") from None

    def _loop(self) -> None:
        """Hand each event to the handler of its kind; read (or wait, see ``_wait_with_pending``) when
        none is complete. Events first: bytes that came with the Hello are already buffered.

        No request kind is handled inline here: the dispatch costs nothing measurable. The lock
        server's own CPU time per lock+unlock cycle (table, loopback TCP, 2026-11-30, 9 runs each,
        medians) was 23.2 µs with Lock and Unlock inline in this loop and 22.8 µs dispatched, one
        request at a time; 13.4 and 13.3 µs with 50 requests pipelined.
        """
        next_event = self.conn.next_event
        receive = self.conn.receive_data
        read = SpinningReader(self.sock).read
        handlers = self._handlers
        self._token = self._doorbell().token
        while True:
            event = next_event()
            if event is NEED_DATA:
                if self.pending:
                    self._wait_with_pending()
                elif self._notice_ids:
                    self._wait_with_notices()
                else:
                    receive(read())
                continue
            try:
                handlers.get(type(event), self._unexpected)(event)
            except TableError as exc:  # the table was removed, or a lock file cannot be used
                self._table_error(getattr(event, "request_id", 0), exc)

    def _wait_with_pending(self) -> None:
        """Sleep on the socket and the doorbell until either speaks or a timer is due.

        A ring makes every waiting request be looked at; otherwise a request is
        looked at when one of its timers is due (its next look, its deadline, its
        next interim message), even while the client keeps the socket busy.
        """
        now = time.monotonic()
        due = min(self._due(p) for p in self.pending.values())
        bell = self._doorbell()
        holders, ended = self._watch_holders()
        # Bytes decrypted already (TLS) are data poll does not see: do not sleep on them.
        decrypted = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
        notices = [self._notices.fileno()] if self._notices is not None else []
        ready = readable([self.sock.fileno(), bell.fileno(), *holders, *notices],
                         0.0 if decrypted or ended else max(0.0, due - now))
        if notices and notices[0] in ready:
            self._send_notices()
        rung = bell.fileno() in ready
        if rung:
            self._rang_at = time.monotonic()
            bell.drain()
        for pid in self._watch.ended(ready):
            self._ended(pid)
            ended = True
        self._retry_pending(rung, every=ended)
        self._rang_at = 0.0
        if decrypted or self.sock.fileno() in ready:
            self._read_ready()

    def _wait_with_notices(self) -> None:
        """Nothing waits, but locks asked for blocking notices: sleep on the socket and the notice doorbell,
        sending each notice as it comes (the common path, with neither, reads the socket alone)."""
        assert self._notices is not None
        decrypted = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
        ready = readable([self.sock.fileno(), self._notices.fileno()], 0.0 if decrypted else None)
        if self._notices.fileno() in ready:
            self._send_notices()
        if decrypted or self.sock.fileno() in ready:
            self._read_ready()

    def _notice_token(self) -> int:
        """The token of this lock server's notice doorbell, made on first use."""
        if self._notices is None:
            self._notices = NoticeBell()
        return self._notices.token

    def _send_notices(self) -> None:
        """Tell the client of each blocking notice that came for a lock it still holds (Blocking, named by the
        request that took the lock and the handle the client knows): once each, none lost (``NoticeBell``)."""
        assert self._notices is not None
        for handle, mode in self._notices.heard(self._notices_due):
            rid = self._notice_ids.get(handle)
            if rid is not None and handle in self.held:
                self._send_unsolicited(Blocking(rid, self._outer.get(handle, handle), mode))

    def _notices_due(self) -> list[tuple[int, int]]:
        """Which of this client's locks that asked for notices have one standing (the table's word)."""
        table = self.mechanisms.table
        try:
            return [] if table is None else table.notices_due(list(self._notice_ids))
        except TableError as exc:
            self.log.error("client %s: blocking notices not looked up: %s", self._who(), exc)
            return []

    def _watch_holders(self) -> tuple[list[int], bool]:
        """Watch the processes that block the waiting requests (a lock nobody frees when its holder dies: the
        table's waiters watch theirs the same way, ``LockMechanism.acquire``): the descriptors to select on,
        and whether one has ended already (look again now, once per process)."""
        wanted = {pid for p in self.pending.values() for pid in p.watch if pid not in p.ended}
        fds, gone = self._watch.follow(wanted)
        for pid in gone:
            self._ended(pid)
        return fds, bool(gone)

    def _ended(self, pid: int) -> None:
        """``pid``, which blocks waiting requests, has ended: they look again now, and do not watch it again
        (its lock may stay: kept for its client, or a zombie's the system hides)."""
        for p in self.pending.values():
            if pid in p.watch:
                p.ended.add(pid)

    def _read_ready(self) -> None:
        """Read what select said is there, without blocking: over TLS a readable socket may hold only part
        of a record, or a record with nothing for the conversation, and waiting requests must not wait on it."""
        sock = self.sock
        if not isinstance(sock, ssl.SSLSocket):
            self.conn.receive_data(sock.recv(65536))
            return
        sock.setblocking(False)
        try:
            data = sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        finally:
            sock.setblocking(True)
        self.conn.receive_data(data)

    @staticmethod
    def _due(p: _Pending) -> float:
        """When a waiting request must next be looked at without being rung."""
        due = p.retry_at
        if p.deadline is not None and p.deadline < due:
            due = p.deadline
        if p.next_interim is not None and p.next_interim < due:
            due = p.next_interim
        return due

    def _send(self, message: Message) -> None:
        if type(message) is Error:  # counted for /metrics by its code
            self.meter.error(message.code)
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

    def _owner(self, thread: int) -> Owner:
        owner = self.owners.get(thread)
        if owner is None:
            hello = self.hello
            assert hello is not None
            # A client of a version before 4 does not know DEADLOCK: another member of a cycle is refused first.
            owner = self.owners[thread] = Owner(self.pid, thread, hello.port, hello.pid, self.ip, self._keep,
                                                not self._acquired)
        return owner

    def _lock(self, req: Lock) -> None:
        """Take a lock: Granted, Refused (held, not waiting), or queued to wait (``_queue``); Error when
        the request is bad, over the limit, or the mechanism fails. The common case, a record lock of
        the main mechanism granted at once, runs straight down."""
        if req.mode > _MAX_MODE or len(self.held) + len(self.pending) >= self._max_locks:  # each takes a slot
            self._refuse_request(req)
            return
        if req.flags & _OSLOCK and not self._told_oslock:
            self._told_oslock = True  # once per connection
            if self.mechanisms.table is not None:
                self.log.info("client %s asks for record locks as OS file locks (JDLS OSLOCKS): served by the "
                              "lock table like every record lock here, so that a record has one holder", self._who())
        if req.flags & self._routed:
            if not self.ctx.limits.os_locks:
                self.log.warning("client %s asked for an OS file lock (flags %#x), refused: --refuse-os-locks",
                                 self._who(), req.flags)
                self._send(Error(req.request_id, ErrorCode.FORBIDDEN, "OS file locks are not served here"))
                return
            mechanism = self.mechanisms.for_flags(req.flags)
        else:
            mechanism = self.main
        if req.flags & _V4_FLAGS and self._acquired and self._unserved(req.request_id, mechanism, req.flags, 0):
            return
        thread = req.thread_id
        # Blocking notices are version 4's: the bit from an older client means nothing.
        notify = self._notice_token() if req.flags & _NOTIFY and self._acquired else 0
        try:
            result = mechanism.lock(self.owners.get(thread) or self._owner(thread), req.inode, req.device,
                                    req.key, req.mode, wait_token=self._token if req.timeout_ms else 0,
                                    notify=notify)
        except TableError as exc:
            self._table_error(req.request_id, exc)
            return
        if isinstance(result, Grant):
            self.stats.granted += 1
            self.meter.granted(result.mode)
            outer = self._granted(result, thread, mechanism)
            if notify:
                self._notice_ids[result.handle] = req.request_id
            if not self._acquired:
                self._send(Granted(req.request_id, outer, result.mode, result.value))
            elif req.flags & _VALUE_BLOCK:
                self._send(self._answer(req.request_id, outer, result, req.flags, mechanism))
            else:  # the common case of version 4, made here: the lock path
                self._send(Acquired(req.request_id, outer, result.mode, result.value, result.token, 0, b""))
        elif isinstance(result, Conflict):
            self.stats.refused += 1
            self._send(self._refusal(req.request_id, RefuseReason.BUSY, result.holder))
        else:
            self.stats.waited += 1
            self._queue(req, thread, result, mechanism)

    def _answer(self, rid: int, outer: int, grant: Grant, flags: int, mechanism: LockMechanism) -> Acquired:
        """A grant as a conversation of version 4 is told it (Acquired): with its fencing token, and the value
        block when the request asked for it (read now, right after the grant, as it is what the grant gives)."""
        if not flags & _VALUE_BLOCK:
            return Acquired(rid, outer, grant.mode, grant.value, grant.token, BlockStatus.NONE, b"")
        try:
            block, valid = mechanism.value_block(grant.handle)
        except TableError as exc:  # gone the moment it was granted (tidied, the table removed): said as not read
            self.log.error("client %s: the value block of lock %#x not read: %s", self._who(), grant.handle, exc)
            return Acquired(rid, outer, grant.mode, grant.value, grant.token, BlockStatus.NONE, b"")
        return Acquired(rid, outer, grant.mode, grant.value, grant.token,
                        BlockStatus.VALID if valid else BlockStatus.NOT_VALID, block)

    def _unserved(self, rid: int, mechanism: LockMechanism, flags: int, value_flags: int, *,
                  convert: bool = False, block: bytes = b"") -> bool:
        """Refuse (Error BAD_REQUEST, saying why) what a request of version 4 asks that cannot be done: value
        flags unknown, blocking notices (not served yet), or a conversion or value block of a lock that is an OS
        file lock (a binary lock, or a service without a table, jdls -ibD), which has neither; True if refused."""
        why = None
        if value_flags & ~_VALUE_FLAGS:
            why = f"unknown value flags 0x{value_flags:02x}"
        elif convert and flags & ~_CONVERT_FLAGS:
            why = f"lock flags 0x{flags & ~_CONVERT_FLAGS:02x} mean nothing to a conversion"
        elif block and not value_flags & ValueFlag.WRITE:
            why = "a value block came without the WRITE value flag: nothing would be written"
        elif flags & LockFlag.NOTIFY and mechanism is not self.mechanisms.table:
            why = ("OS file locks cannot send blocking notices (this lock is an OS file lock: a binary lock, or a "
                   "service run without a lock table, jdls -ibD); the lock table can")
        elif mechanism is not self.mechanisms.table and (convert or flags & _VALUE_BLOCK or value_flags):
            what = "convert a lock in place" if convert else "keep value blocks"
            why = (f"OS file locks cannot {what} (this lock is an OS file lock: a binary lock, or a service run "
                   "without a lock table, jdls -ibD); the lock table can")
        if why is None:
            return False
        self.log.warning("client %s: request %d refused: %s", self._who(), rid, why)
        self._send(Error(rid, ErrorCode.BAD_REQUEST, why))
        return True

    def _convert(self, req: Convert) -> None:
        """Convert a lock this client holds, in place: Acquired at once (down, or up when nothing is in the
        way), Refused BUSY (``timeout_ms`` 0), or queued to wait as a Lock waits (``_queue``), the lock held in
        its old mode meanwhile; Error when the lock is not this client's, or what is asked cannot be done."""
        rid = req.request_id
        handle = self._inner.get(req.handle, req.handle)
        thread = self.held.get(handle)
        if thread is None:
            self.log.warning("client %s: conversion of lock handle %#x, which it does not hold", self._who(), handle)
            self._send(Error(rid, ErrorCode.NOT_HELD, "not held"))
            return
        if req.mode > _MAX_MODE:
            self._send(Error(rid, ErrorCode.BAD_REQUEST, not_a_mode(req.mode)))
            return
        mechanism = self.routes.get(handle, self.main)
        if self._unserved(rid, mechanism, req.flags, req.value_flags, convert=True, block=req.block):
            return
        if any(isinstance(p.request, Convert) and p.request.handle == req.handle for p in self.pending.values()):
            self._send(Error(rid, ErrorCode.BAD_REQUEST, "a conversion of this lock waits already"))
            return
        try:
            result = mechanism.convert(handle, req.mode, wait_token=self._token if req.timeout_ms else 0,
                                       block=req.block if req.value_flags & ValueFlag.WRITE else None,
                                       invalidate=bool(req.value_flags & ValueFlag.INVALIDATE))
        except (NotWritable, Unsupported, ValueError) as exc:  # the lock stays held as it was
            self._send(Error(rid, ErrorCode.BAD_REQUEST, str(exc)))
            return
        except NotHeld:
            self._send(Error(rid, ErrorCode.NOT_HELD, "not held"))
            return
        if isinstance(result, Grant):
            self.stats.granted += 1
            self.meter.granted(result.mode)
            self._send(self._answer(rid, req.handle, result, req.flags, mechanism))
        elif isinstance(result, Conflict):
            self.stats.refused += 1
            self._send(self._refusal(rid, RefuseReason.BUSY, result.holder))
        else:
            self.stats.waited += 1
            self._queue(req, thread, result, mechanism)

    def _cancel(self, req: Cancel) -> None:
        """Withdraw the waiting request ``target``: answered Refused CANCELLED. A target that waits no more (its
        answer went, or never asked) is no error: nothing to cancel. One handed its lock a moment ago, which
        the client was not told yet, gives it back (the table's ``cancel``): it is cancelled all the same."""
        p = self.pending.get(req.target)
        if p is None:
            return
        if p.mechanism.cancel(p.handle):
            del self.pending[req.target]
            self.meter.cancelled()
            self._send(self._refusal(req.target, RefuseReason.CANCELLED, p.holder))
        else:  # neither waiting nor handed its lock (tidied away, refused to break a deadlock): looked at now
            p.retry_at = 0.0

    def _refuse_request(self, req: Lock | Reclaim) -> None:
        """A Lock (or Reclaim) that is not even tried: a mode out of range, or the client over its limit of
        locks."""
        if req.mode > _MAX_MODE:
            self._send(Error(req.request_id, ErrorCode.BAD_REQUEST, not_a_mode(req.mode)))
            return
        limit = self._max_locks
        self.log.warning("client %s is over the limit of %d locks", self._who(), limit)
        self._send(Error(req.request_id, ErrorCode.LIMIT, f"limit of {limit} locks per client reached"))

    def _granted(self, grant: Grant, thread: int, mechanism: LockMechanism, sealed: int | None = None) -> int:
        """Record a grant; the handle the client is given for it (``sealed``: the one it reclaimed it with).

        A table's handle carries a sequential ticket anyone can guess from his own handles; a client's table
        lock gets a handle of its own instead, the slot's index under a random seal that the table keeps with
        the lock (``seal``), so that only the client can reclaim it after this lock server has gone.
        """
        handle = grant.handle
        self.held[handle] = thread
        if mechanism is not self.main:
            self.routes[handle] = mechanism
            return handle
        outer = self._outer.get(handle)
        if outer is None and mechanism is self.mechanisms.table:
            if sealed is None:
                seal = self._next_seal()
                self.mechanisms.table.seal(handle, seal)
                sealed = seal << INDEX_BITS | handle & _INDEX_MASK
            outer = self._outer[handle] = sealed
            self._inner[outer] = handle
        return handle if outer is None else outer

    def _next_seal(self) -> int:
        """A random seal (never 0), from the system's generator read a page at a time: a read per lock would
        cost the lock path a system call."""
        while True:
            if self._seal_at >= len(self._seal_bytes):
                self._seal_bytes, self._seal_at = os.urandom(_SEAL_BYTES * 512), 0
            at = self._seal_at
            self._seal_at = at + _SEAL_BYTES
            seal = int.from_bytes(self._seal_bytes[at:at + _SEAL_BYTES], "little")
            if seal:
                return seal

    def _forget_handle(self, handle: int) -> None:
        if self._notice_ids.pop(handle, None) is not None and self._notices is not None:
            self._notices.forget(handle)
        outer = self._outer.pop(handle, None)
        if outer is not None:
            del self._inner[outer]

    def _table_error(self, rid: int, exc: TableError) -> None:
        """The mechanism failed request ``rid``: logged in full, and answered with an Error (GROUP_FULL or
        INTERNAL) that says no more than the client needs: not the table's geometry, nor a path."""
        self.log.error("client %s: %s", self._who(), exc)
        if isinstance(exc, GroupFull):
            self._send(Error(rid, ErrorCode.GROUP_FULL, "lock table full (the group of this record's lock)"))
        elif isinstance(exc, TableMissing):
            self._send(Error(rid, ErrorCode.INTERNAL, "the lock table was removed"))
        elif isinstance(exc, TableServes):
            self._send(Error(rid, ErrorCode.INTERNAL, "a lock table now serves this instance: no OS file lock is "
                             "taken any more (connect again)"))
        else:
            self._send(Error(rid, ErrorCode.INTERNAL, "the lock service failed this request (see its log)"))

    def _queue(self, req: Lock | Convert, thread: int, queued: Queued, mechanism: LockMechanism) -> None:
        now = time.monotonic()
        deadline = None if req.timeout_ms == WAIT_FOREVER else now + req.timeout_ms / 1000
        interim = not req.flags & LockFlag.NO_INTERIM
        pauses = mechanism.pauses()
        # The first interim message after FIRST_INTERIM_DELAY, not at once: a hand-off costs no message.
        pending = _Pending(req, thread, queued.handle, queued.holder, now, deadline,
                           now + min(FIRST_INTERIM_DELAY, self.interim_period) if interim else None,
                           mechanism, pauses, _sooner(now + next(pauses), queued.expires, now), queued.watched())
        self.pending[req.request_id] = pending
        self._watch.drop_ended()

    def _retry_pending(self, rung: bool, *, every: bool = False) -> None:
        """Look at the waiting requests: those with a timer due, those the doorbell's ring may be for when it
        rang (``_rung``), and ``every`` one when a watched process ended (its locks may be in anyone's way).

        Not every one at each ring: the doorbell is the connection's, and N waiters of one resource, each
        looked at, cost N scans of N slots a hand-off (500: 2 hand-offs a second)."""
        now = time.monotonic()
        concerned = self._rung() if rung and not every else set()
        for rid, p in list(self.pending.items()):
            if not every and rid not in concerned and now < self._due(p):
                continue
            try:
                result = p.mechanism.retry(p.handle)
            except NotHeld:
                # Tidied away under us: take the request again from the top.
                del self.pending[rid]
                self._handlers[type(p.request)](p.request)
                continue
            except Deadlock:  # chosen to be refused, so that the other members of a cycle of waiters go on
                del self.pending[rid]
                self._send_unsolicited(self._refusal(rid, RefuseReason.DEADLOCK, p.holder))
                continue
            except TableError as exc:  # a table now serves the instance, say: the request ends
                del self.pending[rid]
                self._table_error(rid, exc)
                continue
            if isinstance(result, Grant):
                del self.pending[rid]
                self.stats.granted += 1
                request = p.request
                if isinstance(request, Convert):  # the held lock, in its new mode: the handle the client has
                    outer = request.handle
                else:
                    outer = self._granted(result, p.thread, p.mechanism)
                    if request.flags & _NOTIFY and self._acquired:
                        self._notice_ids[result.handle] = rid
                self._send_unsolicited(self._answer(rid, outer, result, request.flags, p.mechanism) if
                                       self._acquired else Granted(rid, outer, result.mode, result.value))
                self._metered_grant(result.mode, p.started)
                continue
            self.stats.retries += 1
            p.holder, p.watch = result.holder, result.watched()
            if now >= p.retry_at:
                p.retry_at = now + next(p.pauses)
            p.retry_at = _sooner(p.retry_at, result.expires, now)
            if p.deadline is not None and now >= p.deadline:
                del self.pending[rid]
                p.mechanism.cancel(p.handle)
                self.stats.timeouts += 1
                self._send_unsolicited(self._refusal(rid, RefuseReason.TIMEOUT, p.holder))
            elif p.next_interim is not None and now >= p.next_interim:
                p.next_interim = now + self.interim_period
                self._send_unsolicited(self._waiting(p, now))

    def _rung(self) -> set[int]:
        """The waiting requests (their ids) that a ring of the doorbell may be for, as their mechanisms say
        (``LockMechanism.rung``); every one of a mechanism that fails to say (its retry says why)."""
        waiting: dict[int, tuple[LockMechanism, dict[int, int]]] = {}
        for rid, p in self.pending.items():
            waiting.setdefault(id(p.mechanism), (p.mechanism, {}))[1][p.handle] = rid
        concerned: set[int] = set()
        for mechanism, rids in waiting.values():
            try:
                handles = mechanism.rung(list(rids))
            except TableError:
                handles = rids.keys()
            concerned.update(rids[handle] for handle in handles if handle in rids)
        return concerned

    def _metered_grant(self, mode: int, started: float) -> None:
        """A waiting request's grant, sent: its wait, and its hand-off when the doorbell woke this round."""
        now = time.monotonic()
        meter = self.meter
        meter.granted(mode)
        meter.waited(now - started)
        if self._rang_at:
            meter.handed_off(now - self._rang_at)

    def _send_unsolicited(self, message: Message) -> None:
        """Send what the client did not just ask for (an answer after a wait, an interim message).

        The client may have been silent for a while, and keepalive does not probe
        while data is unacknowledged; so what is sent now may stay unacknowledged
        only for what is left of the dead-client bound since the client last
        acknowledged anything (TCP_USER_TIMEOUT counts from the send).
        """
        bound_ms = int(self.ctx.limits.dead_client_bound * 1000)
        try:
            tcp_info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
            silent = _LAST_ACK_RECV.unpack_from(tcp_info, _LAST_ACK_RECV_OFFSET)[0]
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                 max(MIN_USER_TIMEOUT_MS, bound_ms - silent))
        except (OSError, struct.error):
            pass  # not TCP, or no tcp_info: the bound set at the start applies
        self._send(message)

    def _reclaim(self, req: Reclaim) -> None:
        """Take back a lock that a lock server of this client kept when it ended (killed, stopped, its
        client's host silent): Granted under the same handle, or Error NOT_HELD with the reason (what the
        table says: no more than this client may know)."""
        if req.mode > _MAX_MODE or len(self.held) + len(self.pending) >= self._max_locks:
            self._refuse_request(req)
            return
        table = self.mechanisms.table
        try:
            if table is not None and self.main is table:  # the client's handle: the slot under its seal
                grant = table.reclaim(req.handle, self._owner(req.thread_id), req.inode, req.device, req.key,
                                      req.mode, secret=req.handle >> INDEX_BITS)
            else:
                grant = self.main.reclaim(req.handle, self._owner(req.thread_id), req.inode, req.device, req.key,
                                          req.mode)
        except NotHeld as exc:
            # One answer whatever the reason (a handle guessed right but still held, or expired, must not read
            # differently from a wrong one), and slower after a few: a handle is not a secret.
            self._failed_reclaims += 1
            self.log.warning("client %s: reclaim of %#x refused (%d so far): %s", self._who(), req.handle,
                             self._failed_reclaims, exc)
            if self._failed_reclaims > FREE_RECLAIM_FAILURES:
                time.sleep(RECLAIM_TARPIT)
            said = (f"no lock of this client, file, key and mode is kept under handle {req.handle:#x}"
                    if self.main is self.mechanisms.table else str(exc))  # OS locks keep nothing: nothing to guess
            self._send(Error(req.request_id, ErrorCode.NOT_HELD, said))
            return
        self.stats.granted += 1
        self.meter.granted(grant.mode)
        outer = self._granted(grant, req.thread_id, self.main, sealed=req.handle)  # the client keeps its handle
        self.log.info("client %s reclaimed lock %#x", self._who(), grant.handle)
        self._send(Granted(req.request_id, outer, grant.mode, grant.value))

    def _unlock(self, req: Unlock) -> None:
        """Release a lock; Error when the handle is not one this client holds. No answer otherwise. A
        conversion of it that waits is withdrawn first (Refused CANCELLED)."""
        outer = req.handle
        if self.pending:
            self._withdraw_conversion(outer)
        handle = self._inner.pop(outer, outer)
        if handle != outer:
            del self._outer[handle]
        if self.held.pop(handle, None) is None:  # another client's, or none: nothing more is told
            self.log.warning("client %s: unlock of lock handle %#x, which it does not hold", self._who(), handle)
            self._send(Error(req.request_id, ErrorCode.NOT_HELD, "not held"))
            return
        try:
            self.routes.pop(handle, self.main).unlock(handle)
            self.stats.released += 1
        except NotHeld as exc:
            self.log.warning("client %s: %s", self._who(), exc)
            self._send(Error(req.request_id, ErrorCode.NOT_HELD, "not held"))

    def _withdraw_conversion(self, outer: int) -> None:
        """Withdraw the waiting conversion of lock ``outer`` (the client's handle), if one waits: its lock is
        being released, and must not be left to the table as a request of its own."""
        for rid, p in list(self.pending.items()):
            if isinstance(p.request, Convert) and p.request.handle == outer:
                del self.pending[rid]
                p.mechanism.cancel(p.handle)
                self._send(self._refusal(rid, RefuseReason.CANCELLED, p.holder))

    def _release(self, req: Release) -> None:
        """Unlock with the value block written (ValueFlag.WRITE) or marked not valid (INVALIDATE) as the lock
        goes; Error when it cannot be (not this client's lock, not PW or EX: still held then). No answer
        otherwise, as Unlock."""
        if not req.value_flags and not req.block:
            self._unlock(Unlock(req.request_id, req.handle))
            return
        rid = req.request_id
        handle = self._inner.get(req.handle, req.handle)
        if handle not in self.held:
            self.log.warning("client %s: release of lock handle %#x, which it does not hold", self._who(), handle)
            self._send(Error(rid, ErrorCode.NOT_HELD, "not held"))
            return
        table = self.mechanisms.table
        if self._unserved(rid, self.routes.get(handle, self.main), 0, req.value_flags, block=req.block):
            return
        assert table is not None  # _unserved refuses value flags on any other mechanism
        self._withdraw_conversion(req.handle)
        try:
            table.unlock(handle, block=req.block if req.value_flags & ValueFlag.WRITE else None,
                         invalidate=bool(req.value_flags & ValueFlag.INVALIDATE))
        except (NotWritable, ValueError) as exc:  # still held: the client may release it plainly
            self._send(Error(rid, ErrorCode.BAD_REQUEST, f"{exc} (the lock is still held)"))
            return
        except NotHeld as exc:  # gone from the table (tidied): not held any more, forgotten below all the same
            self.log.warning("client %s: %s", self._who(), exc)
            self._send(Error(rid, ErrorCode.NOT_HELD, "not held"))
        del self.held[handle]
        self._forget_handle(handle)
        self.stats.released += 1

    def _unlock_all(self, req: UnlockAll) -> None:
        """Withdraw the waiting requests and release the locks of one thread, or of all; say how many."""
        thread = None if req.thread_id == WIRE_ALL_THREADS else req.thread_id
        count = 0
        for rid, p in list(self.pending.items()):
            if thread is None or p.thread == thread:
                del self.pending[rid]
                p.mechanism.cancel(p.handle)
                self._send(self._refusal(rid, RefuseReason.CANCELLED, p.holder))
        for handle, owner_thread in list(self.held.items()):
            if thread is None or owner_thread == thread:
                del self.held[handle]
                self._forget_handle(handle)
                try:
                    self.routes.pop(handle, self.main).unlock(handle)
                    count += 1
                except NotHeld:
                    pass
        self.stats.released += count
        self._send(Unlocked(req.request_id, count))

    def _status(self, req: Status) -> None:
        """Who holds a record lock: every record lock is the main mechanism's (OSLOCK ones too)."""
        state, holder = self.main.status(self._owner(req.thread_id), req.inode, req.device, req.key)
        if holder is None:
            self._send(StatusReply(req.request_id, state, 0, 0, 0, 0, 0, ""))
        else:
            self._send(StatusReply(req.request_id, state, *_holder_fields(holder)))

    def _info_put(self, req: InfoPut) -> None:
        hello = self.hello
        assert hello is not None
        try:
            self.stats.info_updates += 1
            if self._record is None:
                self._record = pidfiles.record_of(self.pid)
            self.info_path = client_info.write(self.ctx.instance, hello, self.peer[0], self._record, req.payload,
                                               self.stats.document(self))
        except ValueError as exc:  # client_info.Refused, or what json makes of it: the client's fault, it may hear why
            self.log.warning("client %s: its lock information refused: %s", self._who(), exc)
            self._send(Error(req.request_id, ErrorCode.BAD_REQUEST, f"lock information refused: {exc}"))
        except OSError as exc:  # ours: the path and the reason stay here
            self.log.error("client %s: cannot keep its lock information: %s", self._who(), exc)
            self._send(Error(req.request_id, ErrorCode.INTERNAL, "lock information not kept (see the service's log)"))

    @property
    def admin(self) -> bool:
        """Whether the peer is an operator: its address is in --admin-allow, and a loopback peer's user may
        read the lock table on this host anyway (local_peer); every local user connects from loopback."""
        if self._admin is None:
            admin = in_ranges(self.peer[0], self.ctx.admin_ranges)
            ip = peer_ip(self.peer[0])
            if admin and ip is not None and ip.is_loopback:
                try:
                    ours = self.sock.getsockname()
                    admin = local_peer.is_operator((ours[0], ours[1]), (self.peer[0], self.peer[1]), self.ctx.gid)
                except OSError:
                    admin = False
                self._not_admin = NOT_AN_OPERATOR_USER
            self._admin = admin
        return self._admin

    def _info_get(self, req: InfoGet) -> None:
        """The lock snapshot (every lock, every client): for operator addresses only (--admin-allow)."""
        if not self.admin:
            self.log.warning("client %s asked for the lock snapshot, refused: %s", self._who(), self._not_admin)
            self._send(Error(req.request_id, ErrorCode.FORBIDDEN, f"not permitted: {self._not_admin}"))
            return
        self._send(InfoSnapshot(req.request_id, snapshot(self.ctx)))

    def _settings(self, req: Settings) -> None:
        """The client's acknowledgement timeout (version 3): interim messages from now on come often enough for
        it, a waiting request's next one included. Unanswered; flags it does not know are refused."""
        if req.flags:
            self._send(Error(req.request_id, ErrorCode.BAD_REQUEST, f"unknown Settings flags 0x{req.flags:04x}"))
            return
        self.interim_period = interim_period_for(req.ack_timeout_ms, self.ctx.limits.interim_period)
        now = time.monotonic()
        for p in self.pending.values():
            if p.next_interim is not None:
                p.next_interim = min(p.next_interim, now + self.interim_period)
        self.log.debug("client %s: acknowledgement timeout %g s, interim messages every %g s", self._who(),
                       req.ack_timeout_ms / 1000, self.interim_period)

    def _echo(self, req: Echo) -> None:
        self._send(EchoReply(req.request_id, req.data))

    def _unknown(self, event: UnknownMessage) -> None:
        self.log.warning("client %s sent unknown message kind 0x%02x", self._who(), event.kind)
        since = kind_since(event.kind)
        if since is not None:  # a kind of a later version than this conversation's: the client's mistake
            said = (f"message kind 0x{event.kind:02x} needs protocol version {since}; this conversation speaks "
                    f"version {self.conn.version}")
        else:
            said = f"message kind 0x{event.kind:02x} is not known to this server"
        self._send(Error(event.request_id, ErrorCode.UNKNOWN_MESSAGE, said))

    @staticmethod
    def _closed(_event: ConnectionClosed) -> None:
        raise ClientGone("end of stream")

    @staticmethod
    def _unexpected(event: Event) -> None:
        raise RemoteProtocolError(f"unexpected {type(event).__name__}")

    def _refusal(self, rid: int, reason: int, h: Holder) -> Refused:
        """A Refused answer (counted for /metrics by its reason)."""
        self.meter.refused(reason)
        return Refused(rid, reason, *_holder_fields(h))

    @staticmethod
    def _waiting(p: _Pending, now: float) -> Waiting:
        waited = min(int((now - p.started) * 1000), 0xFFFFFFFF)
        return Waiting(p.request.request_id, waited, *_holder_fields(p.holder))

    # -- the end -------------------------------------------------------------------

    def release_everything(self, *, keep: bool = False) -> tuple[int, int]:
        """Free every lock and request of this client, whatever state the conversation is in: (released,
        kept). With ``keep`` (the client may live on) its table locks are kept for it to reclaim instead,
        as far as the table keeps them (``keep_owner``); its requests go all the same."""
        count = kept = 0
        try:
            # The requests first: one handed its lock a moment ago, which the client never heard of, gives it on
            # (cancel) rather than being kept for a client that cannot reclaim it.
            for p in self.pending.values():
                try:
                    p.mechanism.cancel(p.handle)
                except TableError as exc:
                    self.log.error("cancelling a request of %s: %s", self._who(), exc)
            self.pending.clear()
            table = self.mechanisms.table
            if keep and table is not None:
                try:
                    kept = table.keep_owner(self.pid)
                except TableError as exc:
                    self.log.error("keeping the locks of %s: %s", self._who(), exc)
                self.held = {handle: thread for handle, thread in self.held.items() if handle in self.routes}
            for handle in self.held:
                try:  # the client ended holding it: a PW or EX lock leaves its value block not valid
                    self.routes.get(handle, self.main).abandon(handle)
                    count += 1
                except NotHeld:
                    pass
                except TableError as exc:
                    self.log.error("releasing a lock of %s: %s", self._who(), exc)
            self.held.clear()
            self.routes.clear()
            if self.mechanisms.table is not None:
                try:
                    count += self.main.release_owner(self.pid, lost=True)  # the safety net: anything we lost track of
                except TableError as exc:
                    self.log.error("releasing the locks of %s: %s", self._who(), exc)
            count += self.mechanisms.close()  # closing the lock files drops any OS lock left
        finally:
            if self.info_path:
                client_info.remove(self.info_path)
            if self._port_claim is not None:  # the port is free for the client's next connection
                os.close(self._port_claim)
                self._port_claim = None
            if self._bell is not None:
                self._bell.close()
            if self._notices is not None:
                self._notices.close()
        return count, kept


class Stopped(ClientGone):
    """SIGTERM: the operator stops the service (jdls -k); keep the client's locks for it to reclaim, and go."""


#: Set as the lock server begins to end (``LockServer._finish``): a SIGTERM then interrupts nothing.
_ending = False


def _stop(signum: int, _frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the release short
    if not _ending:
        raise Stopped(f"stopped by {signal.Signals(signum).name}")


def serve(sock: socket.socket, peer: tuple[str, int], ctx: ServerContext, record: PidRecord | None = None) -> int:
    """Serve one client connection until it goes away; release its locks; return an exit status.

    ``record`` is this process's pid record (its pid file's), when the caller has it. SIGTERM ends the
    conversation: the handler raises in the main loop, whose
    ``finally`` keeps the client's locks for it to reclaim (the service is
    stopping or restarting; the client is not gone).
    """
    signal.signal(signal.SIGTERM, _stop)
    # A hang-up meant for the monitor or listener (log rotation, a closed terminal) must not end a client's
    # conversation; the log file is followed without it (a WatchedFileHandler).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server = LockServer(sock, (peer[0], peer[1]), ctx, record)
    server.meter.start()
    return server.run()

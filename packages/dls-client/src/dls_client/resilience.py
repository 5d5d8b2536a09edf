"""Resilient mode (JDLS SERVER2): every lock held on two lock servers, so that either may fail.

The rules are the jDLS guide's (the README says them for users), and each is
there to keep two owners from ever holding one lock: a lock goes to the
secondary only after the primary granted it, and the primary's answer stands;
a failed primary is replaced by the secondary, which already holds every lock
of the process; a failed server is never contacted again (its lock server
released this process's locks when the connection went); with no server left
the process must wrap up (ServiceLost, on every later request too).

The two servers number their locks independently, so a resilient client gives
out handles of its own and keeps, for each, the (channel, server handle) pairs
of the servers holding it; only resilient clients pay for that. A request
waiting on the secondary waits at most TIMEOUT seconds; longer is a
difference, logged, and the lock is then held on the primary alone.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import TypeVar

from dls_proto import ALL_THREADS, Granted, InfoPut, Lock, Message, Server, Unlock, UnlockAll

from .channel import Channel
from .errors import ServiceLost, ServiceUnavailable, describe
from .link import OpenChannel
from .locks import HeldLock
from .route import IDLE_TICK, Events
from .trace import Tracer

T = TypeVar("T")

#: One server's hold of a lock: the channel to that server and the handle it gave.
Hold = tuple[Channel, int]


class _Entry:
    """One lock of a resilient client: its owner thread, what it is (for the trace), and its holds."""

    __slots__ = ("holds", "thread", "what")

    def __init__(self, thread: int, what: str, holds: list[Hold]) -> None:
        self.thread = thread
        self.what = what
        self.holds = holds


class ResilientRoute:
    """A primary and a secondary lock server (SERVER2), and which of this client's locks each holds."""

    def __init__(self, servers: tuple[Server, ...], open_channel: OpenChannel, trace: Tracer,
                 events: Events, timeout: float) -> None:
        self.servers = servers
        self._open = open_channel
        self.trace = trace
        self._events = events
        self.primary: Channel | None = None
        self._connect_lock = threading.Lock()
        self.secondary: Channel | None = None
        self.timeout_ms = max(1, int(timeout * 1000))
        #: Set when no server is left: every later request raises it.
        self.wrapped_up: ServiceLost | None = None
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        #: This client's handle of each (channel, server handle), so that a lock taken again (a conversion,
        #: for which a server answers with the handle it gave before) stays one lock.
        self._own: dict[tuple[int, int], int] = {}
        self._handles = itertools.count(1)
        self._releases = 0  # release_all calls so far: a lock mirrored across one is released
        self._failed: list[str] = []

    # -- connecting, and failures -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.primary is not None

    def current(self) -> Channel:
        self._check_left()
        primary = self.primary
        if primary is None:
            primary = self._connect()
        return primary

    def ask(self, attempt: Callable[[Channel], T]) -> T:
        while True:
            channel = self.current()
            try:
                return attempt(channel)
            except ServiceUnavailable as exc:
                self.lost(channel, exc)

    def _connect(self) -> Channel:
        with self._connect_lock:
            primary = self.primary
            if primary is not None:
                return primary
            try:
                primary = self.primary = self._connect_all()
            except ServiceUnavailable as exc:
                self.trace.error(f"Client: unable to connect to distributed lock service, locks not enabled: {exc}")
                raise
        for channel in self.channels():
            self._events.connected(channel)
        return primary

    def failed(self, channel: Channel, reason: str | None = None) -> None:
        if channel.failure is None:
            channel.fail(reason or f"lock service {channel.server} hung up")
        try:
            self.lost(channel, channel.failure or ServiceUnavailable("lost"))
        except ServiceUnavailable:
            pass

    def tick(self) -> float:
        return IDLE_TICK

    def publish(self, payload: bytes) -> None:
        for channel in self.channels():
            try:
                channel.send(InfoPut(channel.next_id(), payload))
            except ServiceUnavailable as exc:
                self.lost(channel, exc)

    def close(self) -> None:
        for channel in self.channels():
            channel.close()

    def _check_left(self) -> None:
        """ServiceLost once no server is left."""
        if self.wrapped_up is not None:
            raise self.wrapped_up

    def channels(self) -> list[Channel]:
        return [c for c in (self.primary, self.secondary) if c is not None]

    def _connect_all(self) -> Channel:
        """Connect to both servers; one that cannot be reached is dropped (logged), as if it failed at once.

        Called again by each request until a server answers: the failures said are this attempt's.
        """
        self._failed = []
        channels: list[Channel] = []
        for role, server in zip(("primary", "secondary"), self.servers, strict=True):
            try:
                channels.append(self._open(server, None))
            except ServiceUnavailable as exc:
                self._failed.append(f"{role} {server}: {exc}")
                self.trace.error(f"Client: {role} lock service {server} cannot be reached; not used by this process")
        if not channels:
            raise ServiceLost(f"no lock service can be reached ({'; '.join(self._failed)})")
        if len(channels) == 1:
            self.trace.error(f"Client: using lock service {channels[0].server} alone; this process is not resilient")
        else:
            self.secondary = channels[1]
        return channels[0]

    def lost(self, channel: Channel, exc: ServiceUnavailable) -> None:
        """``channel`` failed (``exc``): close it for good and go on with the server left, or ServiceLost."""
        promoted: Channel | None = None
        with self._lock:
            if channel is self.secondary:
                self.secondary = None
                self._failed.append(f"secondary {channel.server}: {exc}")
                self.trace.error(f"Client: secondary lock service {channel.server} lost ({exc}); carrying on with "
                                 f"the primary {self._primary_server()} alone, no longer resilient")
            elif channel is self.primary:
                self._failed.append(f"primary {channel.server}: {exc}")
                if self.secondary is not None:
                    promoted = self.secondary
                    self.primary, self.secondary = promoted, None
                    self.trace.error(f"Client: primary lock service {channel.server} lost ({exc}); secondary "
                                     f"{promoted.server} promoted to primary, no longer resilient")
                    self._report_unheld(promoted)
                elif self.wrapped_up is None:
                    self.wrapped_up = ServiceLost(
                        f"no lock service left ({'; '.join(self._failed)}); this process must wrap up: "
                        "the lock servers released its locks")
                    self.trace.error(f"Client: {self.wrapped_up}")
            channel.close()  # never contacted again
        if promoted is not None:
            self._events.connected(promoted)
        if self.wrapped_up is not None:
            raise self.wrapped_up

    def _primary_server(self) -> Server | None:
        return None if self.primary is None else self.primary.server

    def _report_unheld(self, primary: Channel) -> None:
        """Locks the promoted server does not hold (its answer differed) are held nowhere now: say so."""
        for entry in self._entries.values():
            if entry.holds and not any(c is primary for c, _ in entry.holds):
                entry.holds = []
                self.trace.error(f"Client: lock {entry.what} was held on the failed primary alone (the secondary's "
                                 "answer differed); it is no longer held")

    # -- locks ---------------------------------------------------------------------------

    def held(self, channel: Channel, request: Lock, granted: Granted, make: Callable[[int], HeldLock]) -> HeldLock:
        return make(self._held(channel, request, granted))

    def _held(self, channel: Channel, request: Lock, granted: Granted) -> int:
        """``channel`` granted ``request``: take it on the secondary too; this client's handle for it.

        ServiceUnavailable when the grant is void because ``channel`` failed
        meanwhile and the promoted server does not hold the lock: ``ask``
        then asks again on the server left.
        """
        with self._lock:
            if channel is not self.primary:
                raise self._void(channel)
            secondary, releases = self.secondary, self._releases
        holds: list[Hold] = [(channel, granted.handle)]
        if secondary is not None:
            held = self._on_secondary(secondary, request, granted)
            if held is not None:
                holds.append((secondary, held))
        with self._lock:
            live = [(c, h) for c, h in holds if c is self.primary or c is self.secondary]
            void = not any(c is self.primary for c, _ in live)
            if void or releases != self._releases:
                # Held where nobody would release it (no primary holds it, or a release_all came
                # between): let it go; a release_all's caller gets a handle that holds nothing.
                stray, live = live, []
            else:
                stray = []
            handle = self._own.get((id(channel), granted.handle)) if live else None
            if handle is None and not void:
                handle = next(self._handles)
                self._entries[handle] = _Entry(request.thread_id, _what(request), live)
                for c, h in live:
                    self._own[id(c), h] = handle
        for c, h in stray:
            self._send_unlock(c, h)
        if handle is None:
            raise self._void(channel)
        return handle

    @staticmethod
    def _void(channel: Channel) -> ServiceUnavailable:
        return channel.failure or ServiceUnavailable(f"lock service {channel.server} failed after granting")

    def _on_secondary(self, secondary: Channel, request: Lock, granted: Granted) -> int | None:
        """Duplicate a granted request on the secondary; its handle, or None (failed or different)."""
        rid = secondary.next_id()
        duplicate = request._replace(request_id=rid, timeout_ms=min(request.timeout_ms, self.timeout_ms)
                                     if request.timeout_ms else self.timeout_ms)
        try:
            reply = secondary.last_reply(rid, secondary.request(duplicate))
        except ServiceUnavailable as exc:
            self.lost(secondary, exc)
            return None
        if type(reply) is Granted:
            if (reply.mode, reply.value) != (granted.mode, granted.value):
                self._difference(_what(request), f"granted mode {granted.mode} value 0x{granted.value:08x}",
                                 f"granted mode {reply.mode} value 0x{reply.value:08x}")
            return reply.handle
        self._difference(_what(request), f"granted mode {granted.mode} value 0x{granted.value:08x}",
                         f"answered {reply!r}")
        return None

    def _difference(self, what: str, primary: str, secondary: str) -> None:
        self.trace.error(f"Client: lock responses differ for {what}: primary {self._primary_server()} {primary}, "
                         f"secondary {secondary}")

    def unlock(self, handle: int) -> None:
        """Release this client's lock ``handle`` on every live server holding it."""
        with self._lock:
            entry = self._entries.pop(handle, None)
            if entry is not None:
                for c, h in entry.holds:
                    self._own.pop((id(c), h), None)
        if entry is None:
            self._check_left()
            self.trace.error(f"Client: unlock of handle {handle}, which this process does not hold")
            return
        for channel, server_handle in entry.holds:
            self._send_unlock(channel, server_handle)

    def _send_unlock(self, channel: Channel, server_handle: int) -> None:
        if channel is self.primary or channel is self.secondary:
            try:
                channel.send(Unlock(channel.next_id(), server_handle))
            except ServiceUnavailable as exc:
                self.lost(channel, exc)

    def release_all(self, thread: int) -> Message:
        """UnlockAll on every live server; the primary's answer (a different count is logged)."""
        self.current()  # connects, as every request does (ServiceLost once no server is left)
        with self._lock:
            self._releases += 1
            for handle, entry in list(self._entries.items()):
                if thread == ALL_THREADS or entry.thread == thread:
                    del self._entries[handle]
                    for c, h in entry.holds:
                        self._own.pop((id(c), h), None)
        replies: list[Message] = []
        for channel in self.channels():
            try:
                replies.append(channel.request(UnlockAll(channel.next_id(), thread)))
            except ServiceUnavailable as exc:
                self.lost(channel, exc)  # raises ServiceLost when none is left
        if len(replies) == 2 and replies[0]._replace(request_id=0) != replies[1]._replace(request_id=0):
            self._difference("release of all locks", repr(replies[0]), repr(replies[1]))
        if not replies:
            raise self.wrapped_up or ServiceLost("no lock service left; this process must wrap up")
        return replies[0]



def _what(request: Lock) -> str:
    return describe(request.path, request.key)

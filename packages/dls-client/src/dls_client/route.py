"""Where a client's requests go, what the client holds there, and what a failed lock server costs it.

The client builds requests and reads answers; a Route says which lock server
gets them (connecting on first use), records every lock granted through it,
and recovers when a channel fails, whoever finds the failure first (a request,
or the client's watcher thread): in one place, one recovery at a time.

Recovery connects again and sends Reclaim, with the handle its grant gave, for
every lock held through the failed channel: the service keeps the locks of a
client it lost for its lock-delay (the Welcome says how long), so a lock
reclaimed is held as if nothing happened. A lock the service no longer keeps
is lost, and so is every lock still unreclaimed when the lock-delay is about
to end (``link.reclaim_deadline``): the lock is marked (HeldLock.lost), and the
client is told (``Events.lost``) outside every lock of the Route, so that an
``on_lost`` callback may call the client. While the service cannot be reached
the watcher tries again every second; a request tries at once (a request after
a failure reconnects by itself), and raises ServiceUnavailable if it cannot.

One server (JDLS SERVER alone) is this class; SERVER2 adds a secondary
(``resilience.ResilientRoute``); the client does not know which it has.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import ClassVar, NamedTuple, TypeVar

from dls_proto import ALL_THREADS, Error, Granted, InfoPut, Lock, Message, Reclaim, Server, Unlock, UnlockAll

from .channel import Channel
from .errors import ServiceUnavailable, describe
from .link import Link, OpenChannel, exchange_all, reclaim_deadline, unkept_reason
from .locks import HeldLock
from .trace import Tracer

T = TypeVar("T")
#: How long the watcher may sleep when no recovery is under way (seconds).
IDLE_TICK = 1.0
#: One service's hold of a lock: the channel it was granted (or reclaimed) through, and the service's handle.
Hold = tuple[Channel, int]


class Events(NamedTuple):
    """What a Route tells its client, always outside every lock of the Route."""

    #: A new channel is in use (its locks reclaimed): tell it what the client holds, and watch it.
    connected: Callable[[Channel], None]
    #: These locks were just marked lost: forget them, and run their callbacks.
    lost: Callable[[list[HeldLock]], None]


class Holding:
    """One lock of the client: the HeldLocks the application has of it (a conversion the service answers
    with the same handle adds one), the request that took it, its granted mode, and its hold on each of
    the Route's links (None where it is not held)."""

    __slots__ = ("holds", "locks", "mode", "request")

    def __init__(self, request: Lock, mode: int, held: HeldLock, holds: list[Hold | None]) -> None:
        self.request = request
        self.mode = mode
        self.locks = [held]
        self.holds = holds

    def what(self) -> str:
        return describe(self.request.path, self.request.key)


class Route:
    """The lock server this client's requests go to, and the locks held there (one server)."""

    #: The role of each link, by how many servers there are.
    ROLES: ClassVar[dict[int, tuple[str, ...]]] = {1: ("",), 2: ("primary", "secondary")}

    def __init__(self, servers: tuple[Server, ...], open_channel: OpenChannel, trace: Tracer, events: Events) -> None:
        self.trace = trace
        self._events = events
        self.links = [Link(server, role, open_channel)
                      for server, role in zip(servers, self.ROLES[len(servers)], strict=True)]
        #: One recovery (connect, reclaim, give up) at a time; held over I/O, never on the lock path.
        self._recovery = threading.RLock()
        #: The holdings, held briefly and never over I/O.
        self._state = threading.Lock()
        #: The client's locks by the handle the application holds.
        self._holdings: dict[int, Holding] = {}
        #: Some lock is held through a failed channel: the watcher's ticks settle it.
        self._unsettled = False
        #: Locks marked lost and channels opened, to be told outside the locks.
        self._lost: list[HeldLock] = []
        self._opened: list[Channel] = []
        self._closed = False

    # -- where requests go ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a lock server has been connected to."""
        return any(link.channel is not None for link in self.links)

    def current(self) -> Channel:
        """The channel requests go to, connected on first use and again after a failure (with the locks
        held through the failed one reclaimed); ServiceUnavailable when the service cannot be reached."""
        channel = self.links[0].channel
        if channel is not None and channel.failure is None:
            return channel
        return self._reach(0)

    def ask(self, attempt: Callable[[Channel], T]) -> T:
        """``attempt(channel)`` on the current channel; if the channel fails under it, recover and ask once
        more on the new one. No answer within TIMEOUT (the channel still works) is the caller's."""
        for last in (False, True):
            channel = self.current()
            try:
                return attempt(channel)
            except ServiceUnavailable:
                if channel.failure is None or last:
                    raise
                self.failed(channel)
        raise AssertionError("unreachable")

    def channels(self) -> list[Channel]:
        """The live channels (none before the first connection): the watcher's and publish's."""
        return [channel for link in self.links if (channel := link.live()) is not None]

    # -- what the client asks -----------------------------------------------------------

    def held(self, channel: Channel, request: Lock, granted: Granted, make: Callable[[int], HeldLock]) -> HeldLock:
        """``channel`` granted ``request``: the HeldLock ``make`` gives for the handle the application will
        hold, recorded so that it can be reclaimed; LockLost if it was lost before this returned."""
        handle = granted.handle
        held = make(handle)
        holding = Holding(request, granted.mode, held, [(channel, handle)])
        with self._state:
            known = self._holdings.setdefault(handle, holding)
        if known is not holding:
            self._again(known, holding, channel)
        if channel is not self.links[0].channel or channel.failure is not None:
            # granted through a channel that failed meanwhile: reclaim it now, or lose it
            self._recover(0, eager=True)
            if held.lost:
                raise held.lost_error()
        return held

    def _again(self, known: Holding, holding: Holding, channel: Channel) -> None:
        """A grant of a handle already held: a conversion (the service answered with the handle it gave
        before, through the same channel) adds the lock to the holding; anything else replaces it."""
        with self._state:
            first = known.holds[0]
            if first is not None and first[0] is channel:
                known.locks.extend(holding.locks)
                known.mode = holding.mode
            else:
                self._holdings[holding.locks[0].handle] = holding

    def unlock(self, handle: int) -> None:
        """Release lock ``handle`` on every service holding it; unanswered unless it fails (the failure comes
        as an unsolicited Error). A lock held through a failed channel is left to its service, which frees
        it when its lock-delay ends."""
        with self._state:
            holding = self._holdings.pop(handle, None)
        if holding is None:
            return  # released already (by release_all, a conversion's other lock, close), or lost
        for held in holding.locks:
            held.released = True
        for hold in holding.holds:
            if hold is not None:
                channel, server_handle = hold
                if channel.failure is None:
                    try:
                        channel.send(Unlock(channel.next_id(), server_handle))
                    except ServiceUnavailable:
                        self.failed(channel)

    @staticmethod
    def _send_unlock(channel: Channel, server_handle: int) -> None:
        """Send an Unlock during a recovery (a failure found doing so is for the recovery to see)."""
        if channel.failure is None:
            try:
                channel.send(Unlock(channel.next_id(), server_handle))
            except ServiceUnavailable:
                pass

    def release_all(self, thread: int) -> Message:
        """UnlockAll of ``thread`` (ALL_THREADS: every thread); the server's answer."""
        channel = self.current()
        self._forget(thread)
        try:
            return channel.request(UnlockAll(channel.next_id(), thread))
        except ServiceUnavailable:
            if channel.failure is not None:
                self.failed(channel)
            raise

    def _forget(self, thread: int) -> list[Holding]:
        """Drop the holdings of ``thread`` (ALL_THREADS: all), their locks released; those dropped."""
        with self._state:
            dropped = [h for h in self._holdings.values() if thread == ALL_THREADS or h.request.thread_id == thread]
            for handle in [k for k, h in self._holdings.items() if h in dropped]:
                del self._holdings[handle]
        for holding in dropped:
            for held in holding.locks:
                held.released = True
        return dropped

    def publish(self, payload: bytes) -> None:
        """Send the client's lock information (an InfoPut) to every server that serves it."""
        for channel in self.channels():
            try:
                channel.send(InfoPut(channel.next_id(), payload))
            except ServiceUnavailable:
                self.failed(channel)

    def close(self) -> None:
        """Close every channel; the locks go with them (the client makes a new Route if it is used again)."""
        self._closed = True
        self._forget(ALL_THREADS)
        for link in self.links:
            if link.channel is not None:
                link.channel.close()

    # -- failures, found by a request or by the watcher -------------------------------------------

    def failed(self, channel: Channel, reason: str | None = None) -> None:
        """``channel`` failed (``reason`` says how, if it does not know yet): recover its service's locks."""
        if channel.failure is None:
            channel.fail(reason or f"lock service {channel.server} hung up")
        if self._closed:
            return
        for index, link in enumerate(self.links):
            if link.channel is channel:
                link.next_attempt = 0.0  # the first attempt to reach it again is now
                self._recover(index, eager=False)
                return

    def tick(self) -> float:
        """The watcher's timer: try again to reach a service whose locks wait to be reclaimed, give up those
        whose time is out; how many seconds until it wants to run again."""
        if self._closed or not self._unsettled:
            return IDLE_TICK
        if not self._recovery.acquire(blocking=False):
            return 0.05  # a request is recovering: look again soon
        try:
            for index in range(len(self.links)):
                self._settle(index, eager=False)
        finally:
            self._recovery.release()
            self._tell()
        return self._next_tick()

    def _reach(self, index: int) -> Channel:
        """A live channel of link ``index`` for a request: connect (again) at once, reclaiming what waits."""
        link = self.links[index]
        try:
            with self._recovery:
                self._settle(index, eager=True)
        finally:
            self._tell()
        channel = link.live()
        if channel is None:
            raise link.unreachable or ServiceUnavailable(f"{link.name()} cannot be reached")
        return channel

    def _recover(self, index: int, *, eager: bool) -> None:
        try:
            with self._recovery:
                self._settle(index, eager=eager)
        finally:
            self._tell()

    def _settle(self, index: int, *, eager: bool) -> None:
        """Bring back every lock held through a failed channel of link ``index``, or give it up: those past
        their deadline are unheld; the others are reclaimed through a live channel, opened if need be (at
        once when ``eager``, else when the link's next attempt is due). Called under the recovery lock."""
        link = self.links[index]
        for _ in range(2):  # a channel opened here may fail under the reclaims: one more go
            stale = self._expire(index, self._stale(index))
            channel = link.live()
            if channel is None:
                if not (eager or (stale and time.monotonic() >= link.next_attempt)):
                    break
                try:
                    channel = self._open(link, min((reclaim_deadline(h[0]) for _, _, h in stale), default=None))
                except ServiceUnavailable:
                    break
            if not stale or self._reclaim(index, channel, stale):
                break
        self._unsettled = self._any_stale()

    def _stale(self, index: int) -> list[tuple[int, Holding, Hold]]:
        """The locks held on link ``index`` through a channel that is not its live one."""
        with self._state:
            live = self.links[index].live()
            return [(handle, holding, hold) for handle, holding in self._holdings.items()
                    if (hold := holding.holds[index]) is not None and hold[0] is not live]

    def _any_stale(self) -> bool:
        return any(self._stale(index) for index in range(len(self.links)))

    def _expire(self, index: int, stale: list[tuple[int, Holding, Hold]]) -> list[tuple[int, Holding, Hold]]:
        """Unhold on link ``index`` the stale locks whose service no longer keeps them; the others."""
        now = time.monotonic()
        left = []
        for handle, holding, hold in stale:
            if now >= reclaim_deadline(hold[0]):
                self._unheld(handle, holding, index, unkept_reason(hold[0]))
            else:
                left.append((handle, holding, hold))
        return left

    def _reclaim(self, index: int, channel: Channel, stale: list[tuple[int, Holding, Hold]]) -> bool:
        """Reclaim the ``stale`` locks of link ``index`` through ``channel``; False if it failed meanwhile."""
        link = self.links[index]
        requests = [Reclaim(channel.next_id(), server_handle, holding.mode, holding.request.thread_id,
                            holding.request.inode, holding.request.device, holding.request.key)
                    for _, holding, (_, server_handle) in stale]
        try:
            replies = exchange_all(channel, requests)
        except ServiceUnavailable:
            return False
        kept = 0
        for (handle, holding, _), reply in zip(stale, replies, strict=True):
            if type(reply) is Granted:
                with self._state:
                    wanted = self._holdings.get(handle) is holding
                    if wanted:
                        holding.holds[index] = (channel, reply.handle)
                if wanted:
                    kept += 1
                else:  # released while it was being reclaimed
                    self._send_unlock(channel, reply.handle)
            else:
                said = reply.reason if isinstance(reply, Error) else type(reply).__name__
                self._unheld(handle, holding, index, f"{link.name()} no longer holds it ({said})")
        if kept:
            self.trace.error(f"Client: {kept} lock(s) reclaimed on {link.name()}")
        return True

    def _unheld(self, handle: int, holding: Holding, index: int, reason: str) -> None:
        """Link ``index`` no longer holds the lock: held nowhere now, it is lost."""
        with self._state:
            if self._holdings.get(handle) is not holding:
                return
            holding.holds[index] = None
            if any(holding.holds):
                return
            del self._holdings[handle]
            lost = [held for held in holding.locks if held.lose(reason)]
            self._lost.extend(lost)
        if lost:
            self.trace.error(f"Client: lock {holding.what()} lost: {reason}")

    def _open(self, link: Link, deadline: float | None) -> Channel:
        """A new channel for ``link`` (within ``deadline``), to be told to the client; ServiceUnavailable."""
        first, said = link.channel is None, link.unreachable is not None
        try:
            channel = link.open(deadline)
        except ServiceUnavailable as exc:
            if first:
                self.trace.error(f"Client: unable to connect to distributed lock service, locks not enabled: {exc}")
            elif not said:
                self.trace.error(f"Client: cannot connect again to {link.name()}: {exc}")
            raise
        if not first:
            self.trace.error(f"Client: connected again to {link.name()}")
        with self._state:
            self._opened.append(channel)
        return channel

    def _tell(self) -> None:
        """Tell the client what recovery did (channels opened, locks lost), outside every lock."""
        with self._state:
            opened, self._opened = self._opened, []
            lost, self._lost = self._lost, []
        for channel in opened:
            if channel.failure is None:
                self._events.connected(channel)
        if lost:
            self._events.lost(lost)

    def _next_tick(self) -> float:
        """Seconds until the watcher's next tick: the next deadline or attempt of an unsettled link."""
        if not self._unsettled:
            return IDLE_TICK
        now, due = time.monotonic(), IDLE_TICK
        for index, link in enumerate(self.links):
            stale = self._stale(index)
            if stale:
                due = min(due, link.next_attempt - now, *(reclaim_deadline(h[0]) - now for _, _, h in stale))
        return max(0.01, due)

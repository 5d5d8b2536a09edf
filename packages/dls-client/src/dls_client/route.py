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
to end (``link.reclaim_deadline``; at once for a lock the service held as an OS
file lock, which no lock server keeps): the lock is marked (HeldLock.lost), and the
client is told (``Events.lost``) outside every lock of the Route, so that an
``on_lost`` callback may call the client. While the service cannot be reached
the watcher tries again every second; a request tries at once (a request after
a failure reconnects by itself), and raises ServiceUnavailable if it cannot.

One server (JDLS SERVER alone) is this class; SERVER2 adds a secondary
(``resilience.ResilientRoute``); the client does not know which it has.
"""


# No ``from __future__ import annotations`` (as in dls_proto.messages): the NamedTuple's fields would be
# strings, each compiled when the class is made, and the first compile() of a process costs about 2 ms.
import threading
import time
from collections.abc import Callable
from typing import ClassVar, NamedTuple, TypeVar

from dls_proto import ALL_THREADS, Error, InfoPut, Lock, Message, Reclaim, Server, UnlockAll

from .channel import Channel
from .errors import AcknowledgementTimeout, DlsError, ServiceUnavailable, describe
from .link import Link, OpenChannel, exchange_all, kept_after_silence, reclaim_deadline, unkept_reason
from .locks import HeldLock
from .replies import Grant, is_grant
from .trace import Tracer
from .watcher import hung_up

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
    #: No lock service can be reached any more (each was lost, and the attempts to reach it again failed for
    #: longer than its locks could be reclaimed, or a lock was lost meanwhile): why. Told once; the client
    #: may wrap up (JDLS EXIT).
    gone: Callable[[str], None] = lambda _why: None


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
        #: Locks lost while still held on some service (SERVER2: refused where they were taken again), by
        #: the application's handle: let go there only when the application releases them (``let_go``),
        #: so that nobody else is granted a lock its holder may still be using, not yet knowing it lost it.
        self._fenced: dict[int, Holding] = {}
        #: Locks marked lost and channels opened, to be told outside the locks.
        self._lost: list[HeldLock] = []
        self._opened: list[Channel] = []
        self._closed = False
        #: Why no lock service can be reached any more, to be told (Events.gone); "" once told, None before.
        self._gone: str | None = None
        #: Every service lost and none reached again: why, and until when (time.monotonic()) the services
        #: keep this client's locks for it to reclaim (``_unreachable_until``); None while one answers. A
        #: restart of the service (jdls -k, jdls -ib) within that time is survived: the watcher keeps trying.
        self._unreachable: tuple[str, float] | None = None

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
        """``attempt(channel)`` on the current channel; if the channel fails under it, recover and ask again
        on the channel current then (once per service). No answer within TIMEOUT (the channel still works)
        is the caller's."""
        channel = self.current()
        try:
            return attempt(channel)
        except AcknowledgementTimeout as exc:
            if channel.failure is None and exc.channel in (None, channel):  # not another's, given up already
                self.abandon(channel, str(exc))
            raise
        except ServiceUnavailable:
            if channel.failure is None:
                raise
        for last in [False] * (len(self.links) - 1) + [True]:
            self.failed(channel)
            channel = self.current()
            try:
                return attempt(channel)
            except ServiceUnavailable:
                if channel.failure is None or last:
                    raise
        raise AssertionError("unreachable")

    def verify(self, handle: int) -> None:
        """``ensure_held`` of lock ``handle``: a look at the sockets it is held through, no round trip while
        they are well. One that hung up or failed is settled now, in this thread (reclaimed, or the lock
        lost), rather than left to the watcher: a process stopped (SIGSTOP, a frozen VM) longer than the
        lock-delay may run its application before its watcher when it resumes, and its lock may be
        another's by then, although nothing was marked lost while it slept."""
        with self._state:
            holding = self._holdings.get(handle)
            holds = [] if holding is None else list(enumerate(holding.holds))
        for index, hold in holds:
            if hold is None:
                continue
            channel = hold[0]
            if self._through_working(index, channel):
                reason = hung_up(channel)
                if reason is None:
                    continue  # the common case: one poll() of the socket
                self.failed(channel, reason)
            self._recover(index, eager=True)

    def held_until(self, handle: int) -> float:
        """Until when (time.monotonic()) lock ``handle`` stays this client's even if the client does
        nothing more from now on (its process stopped, say): the latest of its holds, since a lock held
        on any service is held (``_unheld``). A hold on a working channel is good for ``kept_after_silence``
        from now; one whose socket has hung up, for nothing (the failure may be old: a process that was
        stopped finds it only now); one on a failed channel, until its ``reclaim_deadline``. Now for a
        lock not held. One poll() per hold: no round trip."""
        now = time.monotonic()
        with self._state:
            holding = self._holdings.get(handle)
            holds = [] if holding is None else [(index, hold) for index, hold in enumerate(holding.holds)
                                                if hold is not None]
            flags = 0 if holding is None else holding.request.flags
        until = now
        for index, (channel, _handle) in holds:
            if not self._through_working(index, channel):
                until = max(until, reclaim_deadline(channel, flags))
            elif hung_up(channel) is None:
                until = max(until, now + kept_after_silence(channel, flags))
        return until

    def held_through(self, handle: int) -> list[int]:
        """The descriptors of the working connections lock ``handle`` is held through now (see
        dls_client.kept_connections)."""
        with self._state:
            holding = self._holdings.get(handle)
            channels = [] if holding is None else [hold[0] for index, hold in enumerate(holding.holds)
                                                   if hold is not None and hold[0] is self.links[index].channel]
        return [fd for channel in channels if channel.failure is None and (fd := channel.sock.fileno()) >= 0]

    def channels(self) -> list[Channel]:
        """The live channels (none before the first connection): the watcher's and publish's."""
        return [channel for link in self.links if (channel := link.live()) is not None]

    # -- what the client asks -----------------------------------------------------------

    def held(self, channel: Channel, request: Lock, granted: Grant, make: Callable[[int], HeldLock],
             started: float = 0.0) -> HeldLock:
        """``channel`` granted ``request`` (asked at ``started``, time.monotonic()): the HeldLock ``make``
        gives for the handle the application will hold (the service's), recorded so that it can be
        reclaimed; LockLost if it was lost before this returned. On the lock path: kept short."""
        handle = granted.handle
        self._state.acquire()  # not ``with`` (the lock path: its calls cost more than the lock)
        try:
            holding = self._holdings.get(handle)
            held = make(handle)
            if holding is not None and (hold := holding.holds[0]) is not None and hold[0] is channel:
                holding.locks.append(held)  # a conversion: the service answered with the handle it gave before
                holding.mode = granted.mode
            else:
                if holding is not None:  # the handle of a lock waiting to be reclaimed, given to another
                    self._drop(handle, holding, "the lock service gave its handle to another lock: it no longer "
                               "holds it")
                self._holdings[handle] = Holding(request, granted.mode, held, [(channel, handle)])
        finally:
            self._state.release()
        if channel is not self.links[0].channel or channel.failure is not None or self._lost:
            self._settle_grant([(channel, handle)], held)
        return held

    def _settle_grant(self, holds: list[Hold | None], held: HeldLock) -> None:
        """A lock just recorded was granted through a channel that failed meanwhile: reclaim it now (or lose
        it, and say LockLost); and tell what recording it did."""
        for index, hold in enumerate(holds):
            if hold is not None and (hold[0] is not self.links[index].channel or hold[0].failure is not None):
                self._recover(index, eager=True)
        self._tell()
        if held.lost:
            raise held.lost_error()

    def _remove(self, handle: int) -> Holding | None:
        """Forget lock ``handle`` (under the state lock); its holding, if it was held."""
        return self._holdings.pop(handle, None)

    def release(self, handle: int) -> None:
        """HeldLock.release's: ``verify`` then ``unlock``, with one look at the lock's holds while their sockets
        are well (the lock path: a poll() per hold, and nothing else before the Unlock goes)."""
        holding = self._holdings.get(handle)  # a look without the state lock: ``verify`` and ``unlock`` take it
        if holding is not None:
            for index, hold in enumerate(holding.holds):
                if hold is not None and (not self._through_working(index, channel := hold[0]) or channel.hung_up()):
                    self.verify(handle)  # a hold to settle first: it may be lost (LockLost, not "released")
                    break
        self.unlock(handle)

    def holds(self, handle: int) -> list[Hold]:
        """Where lock ``handle`` is held, for a request about it that every service holding it must grant (a
        conversion), in the order of the links: its channel, which works, and the service's handle. DlsError
        when it is not held; the channel's failure when it failed (one server)."""
        with self._state:
            holding = self._holdings.get(handle)
            hold = None if holding is None else holding.holds[0]
        if hold is None:
            raise DlsError("the lock is not held")
        if hold[0].failure is not None:
            raise hold[0].failure
        return [hold]

    def disagree(self, handle: int, reason: str) -> None:
        """The services hold lock ``handle`` in different modes (a conversion granted by one, refused by
        another, and not undone): it is lost, kept where it is held until its holder releases it (``_lose``)."""
        with self._state:
            holding = self._holdings.get(handle)
        if holding is not None:
            self._lose(handle, holding, reason)
        self._tell()

    def converted(self, handle: int, mode: int) -> None:
        """Lock ``handle`` was converted to ``mode``: the mode it is reclaimed in from now on."""
        with self._state:
            holding = self._holdings.get(handle)
            if holding is not None:
                holding.mode = mode

    def release_with(self, handle: int, release: Callable[[list[Hold]], None]) -> None:
        """Release lock ``handle`` by ``release``, given its holds through working channels, which it releases
        on each service (a Release with a value block, say); if it raises, the lock is still held. A hold
        through a failed channel is left to its service, as ``unlock`` leaves it."""
        with self._state:
            holding = self._holdings.get(handle)
        if holding is None:
            return  # released already, or lost
        release([hold for index, hold in enumerate(holding.holds)
                 if hold is not None and self._through_working(index, hold[0])])
        with self._state:
            if self._holdings.get(handle) is holding:
                self._remove(handle)
        for held in holding.locks:
            held.released = True

    def _through_working(self, index: int, channel: Channel) -> bool:
        """Whether a hold through link ``index`` is through its working channel (not failed, not replaced)."""
        return channel.failure is None and channel is self.links[index].channel

    def unlock(self, handle: int) -> None:
        """Release lock ``handle`` on every service holding it; unanswered unless it fails (the failure comes
        as an unsolicited Error). A lock held through a failed channel is left to its service, which frees
        it when its lock-delay ends."""
        self._state.acquire()  # not ``with`` (the lock path: its calls cost more than the lock)
        try:
            holding = self._remove(handle)
        finally:
            self._state.release()
        if holding is None:
            return  # released already (by release_all, a conversion's other lock, close), or lost
        try:
            for hold in holding.holds:
                if hold is not None:
                    channel, server_handle = hold
                    if channel.failure is None:
                        try:
                            channel.unlock(server_handle)
                        except ServiceUnavailable:
                            self.failed(channel)
        finally:
            for held in holding.locks:  # once the Unlock went: the service works on it meanwhile
                held.released = True

    @staticmethod
    def _send_unlock(channel: Channel, server_handle: int) -> None:
        """Send an Unlock during a recovery (a failure found doing so is for the recovery to see)."""
        if channel.failure is None:
            try:
                channel.unlock(server_handle)
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
            handles = [k for k, h in self._holdings.items() if thread == ALL_THREADS or h.request.thread_id == thread]
            dropped = [holding for handle in handles if (holding := self._remove(handle)) is not None]
            self._fenced = {k: h for k, h in self._fenced.items()  # released by the UnlockAll (or close) that follows
                            if thread != ALL_THREADS and h.request.thread_id != thread}
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

    def abandon(self, channel: Channel, reason: str) -> None:
        """``channel``'s service did not answer within TIMEOUT: give the connection up. Its lock server frees
        what it held when the connection closes (and with it a request left waiting there, whose grant
        could otherwise come later, unawaited), so every lock held through it is lost first, its holders
        told, and only then is the connection closed; requests go to a new connection from now on."""
        for index, link in enumerate(self.links):
            if link.channel is channel:
                with self._state:
                    held = [(handle, holding) for handle, holding in self._holdings.items()
                            if (hold := holding.holds[index]) is not None and hold[0] is channel]
                for handle, holding in held:
                    self._unheld(handle, holding, index, f"{reason}: its connection was given up")
                self._tell()
        self.failed(channel, f"{reason}: connection given up")

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
            self._give_up_when_due()
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
                due = time.monotonic() >= link.next_attempt and self._wants_channel(index, bool(stale))
                if not (eager or due):
                    break
                try:
                    channel = self._open(link, min((reclaim_deadline(h[0], holding.request.flags)
                                                           for _, holding, h in stale), default=None))
                except ServiceUnavailable:
                    break
            if stale and not self._reclaim(index, channel, stale):
                continue
            if self._complete(index, channel):
                break
        self._unsettled = self._needs_settle()

    def _wants_channel(self, index: int, stale: bool) -> bool:
        """Whether the watcher should try to reach link ``index`` (one server: to reclaim locks, or to find
        the service back before JDLS EXIT gives up)."""
        return stale or self._awaiting_service()

    def _awaiting_service(self) -> bool:
        """No service can be reached, and giving up (Events.gone) is not yet due: the watcher keeps trying."""
        return self._unreachable is not None and self._gone is None and not self._closed

    def _complete(self, index: int, channel: Channel) -> bool:
        """What else link ``index`` needs once its locks are reclaimed through ``channel``; False if the
        channel failed meanwhile (one server: nothing)."""
        return True

    def _needs_settle(self) -> bool:
        """Whether the watcher's ticks still have something to do."""
        return self._awaiting_service() or any(self._stale(index) for index in range(len(self.links)))

    def _stale(self, index: int) -> list[tuple[int, Holding, Hold]]:
        """The locks held on link ``index`` through a channel that is not its live one."""
        with self._state:
            live = self.links[index].live()
            return [(handle, holding, hold) for handle, holding in self._holdings.items()
                    if (hold := holding.holds[index]) is not None and hold[0] is not live]

    def _expire(self, index: int, stale: list[tuple[int, Holding, Hold]]) -> list[tuple[int, Holding, Hold]]:
        """Unhold on link ``index`` the stale locks whose service no longer keeps them; the others."""
        now = time.monotonic()
        left = []
        for handle, holding, hold in stale:
            if now >= reclaim_deadline(hold[0], holding.request.flags):
                self._unheld(handle, holding, index, unkept_reason(hold[0], holding.request.flags))
            else:
                left.append((handle, holding, hold))
        return left

    def _reclaim(self, index: int, channel: Channel, stale: list[tuple[int, Holding, Hold]]) -> bool:
        """Reclaim the ``stale`` locks of link ``index`` through ``channel``; one the service no longer
        keeps is unheld there. False if the channel failed meanwhile."""
        link = self.links[index]

        def refused(handle: int, holding: Holding, reply: Message) -> None:
            said = reply.reason if isinstance(reply, Error) else type(reply).__name__
            self._unheld(handle, holding, index, f"{link.name()} no longer holds it ({said})")

        asks: list[tuple[int, Holding, Reclaim | Lock]] = [
            (handle, holding, Reclaim(channel.next_id(), server_handle, holding.mode, holding.request.thread_id,
                                      holding.request.inode, holding.request.device, holding.request.key))
            for handle, holding, (_, server_handle) in stale]
        return self._ask_again(index, channel, asks, refused, "reclaimed")

    def _ask_again(self, index: int, channel: Channel, asks: list[tuple[int, Holding, Reclaim | Lock]],
                   refused: Callable[[int, Holding, Message], None], done: str) -> bool:
        """Send every request of ``asks`` (reclaims, or locks taken again) at once through ``channel``: a
        grant becomes link ``index``'s hold of its lock (one released meanwhile is let go), any other
        answer goes to ``refused``. False if the channel failed meanwhile."""
        try:
            replies = exchange_all(channel, [request for _, _, request in asks])
        except ServiceUnavailable:
            return False
        granted = 0
        for (handle, holding, _), reply in zip(asks, replies, strict=True):
            if is_grant(reply):
                with self._state:
                    wanted = self._holdings.get(handle) is holding
                    if wanted:
                        holding.holds[index] = (channel, reply.handle)
                if wanted:
                    granted += 1
                else:
                    self._send_unlock(channel, reply.handle)
            else:
                refused(handle, holding, reply)
        if granted:
            self.trace.error(f"Client: {granted} lock(s) {done} on {self.links[index].name()}")
        return True

    def _unheld(self, handle: int, holding: Holding, index: int, reason: str) -> None:
        """Link ``index`` no longer holds the lock: held nowhere now, it is lost."""
        with self._state:
            if self._holdings.get(handle) is not holding:
                return
            holding.holds[index] = None
            if any(holding.holds):
                held_elsewhere = True
            else:
                held_elsewhere = False
                self._drop(handle, holding, reason)
        if held_elsewhere:
            self.trace.error(f"Client: lock {holding.what()} no longer held on {self.links[index].name()} ({reason}); "
                             "to be taken again there")
        else:
            self.trace.error(f"Client: lock {holding.what()} lost: {reason}")
            self._give_up_when_due(lost=True)

    def _lose(self, handle: int, holding: Holding, reason: str) -> None:
        """The lock is lost although some service still holds it for this client: marked lost, and kept
        there (fenced) until the application lets it go (``let_go``): releasing it now would hand it to
        the next holder while this one may still be inside its critical section, not yet told."""
        with self._state:
            if self._holdings.get(handle) is not holding:
                return
            self._drop(handle, holding, reason)
            self._fenced[handle] = holding
        self.trace.error(f"Client: lock {holding.what()} lost: {reason}; kept where it is still held until "
                         "its holder releases it")

    def let_go(self, handle: int) -> None:
        """The application released the lost lock ``handle`` (HeldLock.release): free what a service still
        holds of it (see ``_lose``). Nothing for a lock no service holds any more."""
        with self._state:
            holding = self._fenced.pop(handle, None)
        if holding is not None:
            for hold in holding.holds:
                if hold is not None:
                    self._send_unlock(*hold)

    def _drop(self, handle: int, holding: Holding, reason: str) -> None:
        """Forget the lock and mark it lost, to be told (under the state lock)."""
        self._remove(handle)
        self._lost.extend(held for held in holding.locks if held.lose(reason))

    def _open(self, link: Link, deadline: float | None) -> Channel:
        """A new channel for ``link`` (within ``deadline``), to be told to the client; ServiceUnavailable."""
        first, said = link.channel is None, link.unreachable is not None
        try:
            channel = link.open(deadline)
        except ServiceUnavailable as exc:
            if not said:
                self._say_unreachable(link, exc, first=first)
            if self._gone is None and any(other.channel is not None for other in self.links) and all(
                    other.live() is None and other.unreachable is not None for other in self.links):
                why = "; ".join(f"{other.name()}: {other.unreachable}" for other in self.links)
                self._unreachable = (why, self._unreachable[1] if self._unreachable else self._unreachable_until())
                self._give_up_when_due()
            raise
        if not first:
            self.trace.error(f"Client: connected again to {link.name()}")
        self._gone = None  # a service answers: a later loss of them all is told again
        self._unreachable = None
        with self._state:
            self._opened.append(channel)
        return channel

    def _unreachable_until(self) -> float:
        """Until when (time.monotonic()) a lock held through the lost channels could still be reclaimed: the
        latest of their reclaim deadlines (lock-delay from the failure, less the dead-server bound)."""
        return max(reclaim_deadline(link.channel) for link in self.links if link.channel is not None)

    def _give_up_when_due(self, *, lost: bool = False) -> None:
        """No service can be reached: once no lock of this client could be reclaimed any more (or one was
        ``lost`` meanwhile), that is told (Events.gone); until then the watcher keeps trying."""
        if self._unreachable is None or self._gone is not None:
            return
        why, until = self._unreachable
        if lost or time.monotonic() >= until:
            self._gone = why

    def _say_unreachable(self, link: Link, exc: ServiceUnavailable, *, first: bool) -> None:
        """Say, once, that ``link`` cannot be reached (``first``: it never could)."""
        if first:
            self.trace.error(f"Client: unable to connect to distributed lock service, locks not enabled: {exc}")
        else:
            self.trace.error(f"Client: cannot connect again to {link.name()}: {exc}")

    def _tell(self) -> None:
        """Tell the client what recovery did (channels opened, locks lost), outside every lock."""
        with self._state:
            opened, self._opened = self._opened, []
            lost, self._lost = self._lost, []
            gone = self._gone
            if gone:
                self._gone = ""
        for channel in opened:
            if channel.failure is None:
                self._events.connected(channel)
        if lost:
            self._events.lost(lost)
        if gone:
            self._events.gone(gone)

    def _next_tick(self) -> float:
        """Seconds until the watcher's next tick: the next deadline or attempt of an unsettled link."""
        if not self._unsettled:
            return IDLE_TICK
        now, due = time.monotonic(), IDLE_TICK
        for index, link in enumerate(self.links):
            stale = self._stale(index)
            if link.live() is None and self._wants_channel(index, bool(stale)):
                due = min(due, link.next_attempt - now)
            due = min([due, *(reclaim_deadline(h[0], holding.request.flags) - now for _, holding, h in stale)])
        return max(0.01, due)

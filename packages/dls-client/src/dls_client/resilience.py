"""Resilient mode (JDLS SERVER2): every lock held on two lock services, so that either may fail, and still
never two holders of one lock.

SERVER is always the primary and SERVER2 always the secondary: nobody
promotes, so every client of the pair asks the services in the same order and
no client's view of the pair differs from another's. A lock is taken on the
primary, then on the secondary, waiting there as long as the request may: it
is granted only when every service that can be reached granted it, and a
refusal by the secondary releases the primary's grant and is the caller's.

A failed channel is recovered as with one server (``route``): the client
connects again and reclaims its locks there; a lock that service no longer
keeps is taken again there at once (timeout 0). Only a service that cannot be
reached is done without: the client goes on with the other alone, its watcher
tries every second, and when the service answers again every lock it lacks is
taken there at once. A conflict there means someone else holds the lock on
that service: the lock is lost, and kept on the other service until its holder,
told, releases it (``Route._lose``): releasing it there at once would let the
next holder in while this one may still be inside its critical section. A lock
is otherwise lost only when neither service holds it any more.

Why no split: under one fault (one process of either service, or one whole
service) every two clients still share a service that sees them both, and
that service refuses the second holder. What two services cannot protect
against (a partition that lets each client reach a different service alone)
and the design that can are in docs/ha.md.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from dls_proto import WAIT_FOREVER, Lock, LockFlag, Message, Reclaim, Refused, Server, UnlockAll, Waiting

from .channel import Channel
from .errors import AcknowledgementTimeout, ConfigurationError, DlsError, ServiceUnavailable, describe
from .link import Link, OpenChannel
from .locks import HeldLock
from .replies import Grant, failure, is_grant
from .route import Events, Hold, Holding, Route
from .trace import Tracer, outcome

#: How long (ms) a lock taken again on a service may wait there: a connection this client gave up (its
#: service silent for TIMEOUT) may still hold it, until that service's lock server reads the connection's
#: end, a moment after the new connection asks. Someone else's lock there is lost after this wait.
RETAKE_WAIT_MS = 1000

class ResilientRoute(Route):
    """A primary and a secondary lock service (SERVER2), each lock held on both."""

    def __init__(self, servers: tuple[Server, ...], open_channel: OpenChannel, trace: Tracer, events: Events) -> None:
        super().__init__(servers, open_channel, trace, events)
        #: Set by the first request: from then on the watcher keeps both services reached.
        self._used = False
        #: The client's own handles (the two services number their locks apart), and the handle of each
        #: (inode, device, key, thread), so that a lock taken again (a conversion) stays one lock.
        self._handles = itertools.count(1)
        self._records: dict[tuple[int, int, bytes, int], int] = {}
        #: The link whose channel took the last request (a change is traced).
        self._current = 0

    # -- where requests go -------------------------------------------------------------

    def current(self) -> Channel:
        """The primary's channel, else the secondary's when the primary cannot be reached (ServiceUnavailable
        when neither can). A service whose channel just failed is tried again at once; one known to be
        unreachable is left to the watcher, which tries every second."""
        channel = self.links[0].channel
        if channel is not None and channel.failure is None:
            return self._serving(0, channel) if self._current else channel
        if not self._used:
            self._used = True
            for index in range(len(self.links)):  # both, from the start: each is watched and told our locks
                self._usable(index)
        for index in range(len(self.links)):
            channel = self._usable(index)
            if channel is not None:
                return self._serving(index, channel)
        for index in range(len(self.links)):  # none is known to answer: try each at once
            channel = self._usable(index, retry=True)
            if channel is not None:
                return self._serving(index, channel)
        raise ServiceUnavailable("no lock service can be reached ("
                                 + "; ".join(f"{link.name()}: {link.unreachable}" for link in self.links) + ")")

    def _serving(self, index: int, channel: Channel) -> Channel:
        """``channel``, of link ``index``, takes the requests: a change of service is said in the trace."""
        if index != self._current:
            self.trace.verbose(f"Client: requests go to the {self.links[index].name()} now"
                               + (f" (the {self.links[0].name()} cannot be reached)" if index else ""))
            self._current = index
        return channel

    def _usable(self, index: int, *, retry: bool = False) -> Channel | None:
        """Link ``index``'s live channel, a new one if its channel just failed (or ``retry``), or None when
        it cannot be reached (the watcher tries again every second)."""
        link = self.links[index]
        channel = link.live()
        if channel is not None or (link.unreachable is not None and not retry):
            return channel
        try:
            return self._reach(index)
        except ServiceUnavailable:
            return None

    def _index(self, channel: Channel) -> int:
        for index, link in enumerate(self.links):
            if link.channel is channel:
                return index
        return next((i for i, link in enumerate(self.links) if link.server == channel.server), 0)

    # -- locks -------------------------------------------------------------------------

    def held(self, channel: Channel, request: Lock, granted: Grant, make: Callable[[int], HeldLock],
             started: float = 0.0) -> HeldLock:
        """Granted by ``channel``: taken on the other service too (``_hold_everywhere``), then recorded under
        a handle of the client's own."""
        holds = self._hold_everywhere(channel, request, granted, started)
        record = (request.inode, request.device, request.key, request.thread_id)
        with self._state:
            handle = self._records.get(record)
            holding = None if handle is None else self._holdings.get(handle)
            if handle is not None and holding is not None:
                held = make(handle)
                holding.locks.append(held)
                holding.mode = granted.mode
                holding.holds = holds = [new or old for new, old in zip(holds, holding.holds, strict=True)]
            else:
                held = make(next(self._handles))
                self._holdings[held.handle] = Holding(request, granted.mode, held, holds)
                self._records[record] = held.handle
        if None in holds:
            self._unsettled = True  # a service that lacks it is given it by the watcher
        self._settle_grant(holds, held)
        return held

    def holds(self, handle: int) -> list[Hold]:
        """Every working hold of lock ``handle``, the primary's first: a conversion is made on each in turn
        (one that cannot be reached now is given the lock in its new mode when it answers again, as any lock it
        lacks). DlsError when it is not held; ServiceUnavailable when no service holding it can be reached."""
        with self._state:
            holding = self._holdings.get(handle)
            holds = [] if holding is None else [(index, hold) for index, hold in enumerate(holding.holds)
                                                if hold is not None]
        if holding is None:
            raise DlsError("the lock is not held")
        working = [hold for index, hold in holds if self._through_working(index, hold[0])]
        if not working:
            raise ServiceUnavailable("no lock service holding the lock can be reached now")
        return working

    def _remove(self, handle: int) -> Holding | None:
        holding = self._holdings.pop(handle, None)
        if holding is not None:
            request = holding.request
            record = (request.inode, request.device, request.key, request.thread_id)
            if self._records.get(record) == handle:
                del self._records[record]
        return holding

    def _hold_everywhere(self, channel: Channel, request: Lock, granted: Grant, started: float) -> list[Hold | None]:
        """Granted by ``channel`` (the primary, or the secondary when the primary cannot be reached): take
        the lock on the services after it too. Their refusal releases what was granted and is raised."""
        holds: list[Hold | None] = [None] * len(self.links)
        first = self._index(channel)
        holds[first] = (channel, granted.handle)
        # A conversion of a lock held already is answered with the handle of that lock: a refusal must not
        # release it.
        granting = [] if (request.inode, request.device, request.key, request.thread_id) in self._records else holds
        for index in range(first + 1, len(self.links)):
            holds[index] = self._also(index, request, (self.links[first], granted), started, granting)
        return holds

    def _also(self, index: int, request: Lock, first: tuple[Link, Grant], started: float,
              holds: list[Hold | None]) -> Hold | None:
        """Take ``request`` on link ``index`` too, waiting as long as the request may still wait; its hold,
        or None when the service cannot be reached. A refusal releases ``holds`` and is raised; an answer other
        than the ``first`` service's grant is logged."""
        granted = first[1]
        for last in (False, True):
            channel = self._usable(index)
            if channel is None:
                return None  # cannot be reached: the lock is held on the others alone, until it answers
            # Interim messages even with WAIT: the first (50 ms into the wait) names the holder, which may be this
            # very grant.
            copy = request._replace(request_id=channel.next_id(), timeout_ms=_left(request.timeout_ms, started),
                                    flags=request.flags & ~LockFlag.NO_INTERIM)

            def behind_itself(reply: Message, channel: Channel = channel, copy: Lock = copy) -> None:
                self._behind_itself(first[0], channel, copy, reply, holds)

            try:
                reply = channel.last_reply(copy.request_id, channel.request(copy), behind_itself)
                behind_itself(reply)
            except AcknowledgementTimeout as exc:  # this service went silent: given up as with one server
                self._release(holds)
                if channel.failure is None:
                    self.abandon(channel, str(exc))
                raise
            except ServiceUnavailable as exc:
                if channel.failure is None or last:  # no answer in time: the caller's, as any request's
                    self._release(holds)
                    raise exc from None
                self.failed(channel)
                continue
            if not is_grant(reply) or (reply.mode, reply.value) != (granted.mode, granted.value):
                self._differ(describe(request.path, request.key), first, (self.links[index], reply))
            if is_grant(reply):
                return channel, reply.handle
            self._release(holds)
            raise failure(reply, f"{describe(request.path, request.key)} ({self.links[index].name()})")
        return None

    def _behind_itself(self, first: Link, channel: Channel, request: Lock, reply: Message,
                       holds: list[Hold | None]) -> None:
        """ConfigurationError when ``channel`` refuses ``request`` or makes it wait because of this very
        client's grant on the ``first`` service: SERVER and SERVER2 name one service (localhost and
        127.0.0.1, say, which the parser cannot tell apart without a look-up), where every lock would wait
        behind itself for ever. Known by the holder the reply names: served by the first service's lock
        server (its pid, on the same host), with this client's port, pid and thread."""
        if type(reply) not in (Refused, Waiting):
            return
        assert isinstance(reply, (Refused, Waiting))
        primary = first.channel
        if primary is None or primary.failure is not None:
            return
        if (reply.holder_pid, reply.holder_port, reply.holder_client_pid, reply.holder_thread) != (
                primary.welcome.server_pid, primary.hello.port, primary.hello.pid, request.thread_id) \
                or channel.welcome.server_host != primary.welcome.server_host:
            return
        said = (f"SERVER and SERVER2 name the same lock service: the {self.links[self._index(channel)].name()} "
                f"holds this client's own lock from the {first.name()}, so every lock would wait behind itself "
                "(give SERVER2 another service)")
        self.trace.error(f"Client: {said}")
        channel.forget(request.request_id)
        if type(reply) is Waiting:  # the request waits there: the connection's end takes it away, before the
            self.abandon(channel, said)  # grant it waits behind is released (else granted, and nobody's)
        self._release(holds)
        raise ConfigurationError(said)

    def _release(self, holds: list[Hold | None]) -> None:
        """Release what the services before granted: the lock is not granted unless all granted it."""
        for hold in holds:
            if hold is not None:
                self._send_unlock(*hold)

    def release_all(self, thread: int) -> Message:
        """UnlockAll on every live service; the first one's answer (a different count is logged)."""
        self.current()
        self._forget(thread)
        answers: list[tuple[Link, Message]] = []
        for channel in self.channels():
            try:
                answers.append((self.links[self._index(channel)],
                                channel.request(UnlockAll(channel.next_id(), thread))))
            except ServiceUnavailable:
                if channel.failure is not None:
                    self.failed(channel)
        if not answers:
            raise ServiceUnavailable("no lock service can be reached to release the locks")
        if len(answers) > 1 and answers[0][1]._replace(request_id=0) != answers[1][1]._replace(request_id=0):
            self._differ("the release of all locks", *answers)
        return answers[0][1]

    def _differ(self, what: str, *answers: tuple[Link, Message]) -> None:
        """The services answered one request differently: say, in the error trace, which said what (the
        guide's "the response of the lock requests will be compared"), for an operator to look into."""
        said = "; ".join(f"the {link.name()} {_with_value(reply)}" for link, reply in answers)
        self.trace.error(f"Client: the lock services answered differently for {what}: {said}")

    # -- recovery ----------------------------------------------------------------------

    def _wants_channel(self, index: int, stale: bool) -> bool:
        """Both services, always, once the client is in use: each lock must be held on every service."""
        return self._used and not self._closed

    def _needs_settle(self) -> bool:
        if not self._used or self._closed:
            return False
        return any(link.live() is None or self._stale(index) or self._missing(index)
                   for index, link in enumerate(self.links))

    def _missing(self, index: int) -> list[tuple[int, Holding]]:
        """The locks link ``index`` does not hold (taken while it could not be reached, or no longer kept
        there)."""
        with self._state:
            return [(handle, holding) for handle, holding in self._holdings.items() if holding.holds[index] is None]

    def _complete(self, index: int, channel: Channel) -> bool:
        """Take again on link ``index`` every lock it lacks, waiting at most RETAKE_WAIT_MS (without interim
        messages); a lock someone else holds there is lost (and kept where it is held until its holder
        releases it). False if the channel failed meanwhile."""
        missing = self._missing(index)
        if not missing:
            return True
        link = self.links[index]

        def refused(handle: int, holding: Holding, reply: Message) -> None:
            said = failure(reply, f"{link.name()} refused to take it again")
            self._lose(handle, holding, f"{said} (someone else holds it there)")

        asks: list[tuple[int, Holding, Reclaim | Lock]] = [
            (handle, holding, holding.request._replace(request_id=channel.next_id(), mode=holding.mode,
                                                       timeout_ms=RETAKE_WAIT_MS,
                                                       flags=holding.request.flags | LockFlag.NO_INTERIM))
            for handle, holding in missing]
        return self._ask_again(index, channel, asks, refused, "taken again")

    def _say_unreachable(self, link: Link, exc: ServiceUnavailable, *, first: bool) -> None:
        others = [other for other in self.links if other is not link]
        self.trace.error(f"Client: {link.name()} cannot be reached ({exc}); going on with the "
                         f"{' and '.join(other.name() for other in others)} alone until it answers")


def _with_value(reply: Message) -> str:
    """What a service answered, its lock value too when it granted (the value is compared as well)."""
    said = outcome(reply)
    return f"{said}, value 0x{reply.value:08x}" if is_grant(reply) else said


def _left(timeout_ms: int, started: float) -> int:
    """What is left at most of a request's wait (0: it would not wait; WAIT_FOREVER: no limit)."""
    if timeout_ms in (0, WAIT_FOREVER):
        return timeout_ms
    return max(1, timeout_ms - int((time.monotonic() - started) * 1000))

"""One lock service as a client sees it over time: a channel, opened again after each failure.

A Channel is one connection and stays dead once it failed; a Link is the
service behind it, for as long as the client uses it. It keeps what recovery
needs to know: the channel in use, whether and when it can next try to reach
the service, and until when the service keeps the locks of a channel that
failed (the failure time and the lock-delay its Welcome gave, less the time a
silent server takes to be found), so that the Route can reclaim them in time
or give them up. What is held where is the Route's business, not the Link's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from dls_proto import Lock, LockFlag, Message, Reclaim, Server

from .channel import CONNECT_TIMEOUT, DEAD_SERVER_BOUND, Channel
from .errors import AcknowledgementTimeout, ServiceUnavailable

#: Makes the channel to a server (connected and greeted) within a timeout (None: the channel's defaults),
#: or raises ServiceUnavailable.
OpenChannel = Callable[[Server, "float | None"], Channel]
#: Seconds between two attempts to reach a service that could not be reached (the watcher's cadence).
RETRY_INTERVAL = 1.0
#: The Lock flags of a lock the service may hold as an OS file lock even beside its table: the kernel frees
#: such a lock with its lock server, so none is kept for the client to reclaim, whatever lock-delay the
#: Welcome said. A binary lock always is one (dls-daemon's ``Mechanisms.for_flags``). An OSLOCK record lock
#: is a table lock beside a table since dls-daemon 0.7.1, but the Welcome does not tell that version from
#: an earlier one, which took it as an OS lock: the client stays on the safe side and counts such a lock
#: lost the moment its channel fails (giving up a lock it might have reclaimed, never keeping one it lost).
OS_LOCK_FLAGS = LockFlag.BINARY | LockFlag.OSLOCK


def reclaim_deadline(channel: Channel, flags: int = 0) -> float:
    """Until when (time.monotonic()) a lock taken with ``flags`` through the failed ``channel`` may be
    reclaimed: its lock-delay counted from its failure, less the dead-server bound (the service may have
    counted from the failure itself, up to that much earlier than the client found it). At or before the
    failure when the lock-delay is that short (0: a service that keeps nothing) or the lock was an OS
    file lock on the service (``OS_LOCK_FLAGS``): such a lock is lost the moment its channel fails."""
    failed = channel.failed_at if channel.failed_at is not None else time.monotonic()
    if flags & OS_LOCK_FLAGS:
        return failed
    return failed + channel.lock_delay - DEAD_SERVER_BOUND


def kept_after_silence(channel: Channel, flags: int = 0) -> float:
    """How long (seconds) a lock taken with ``flags`` through the working ``channel`` stays this client's
    if the client falls silent now (stopped, frozen) and its lock server dies the next instant: the
    reclaim window of ``reclaim_deadline`` counted from now, since a failure the client has not yet
    found may be up to the dead-server bound old. 0 for an OS file lock on the service, or a lock-delay
    no longer than that bound: such a lock may be lost at any moment without the client hearing of it."""
    if flags & OS_LOCK_FLAGS:
        return 0.0
    return max(0.0, channel.lock_delay - DEAD_SERVER_BOUND)


def unkept_reason(channel: Channel, flags: int = 0) -> str:
    """Why a lock taken with ``flags`` through the failed ``channel`` was not reclaimed in time, as
    LockLost says it."""
    if flags & OS_LOCK_FLAGS:
        return (f"the connection to lock service {channel.server} was lost, and the service held the lock as an "
                "OS file lock, which went with its lock server")
    if channel.lock_delay <= DEAD_SERVER_BOUND:
        return (f"the connection to lock service {channel.server} was lost and the service keeps a lost "
                f"client's locks {channel.lock_delay:g} s, too short to reclaim them")
    return (f"the connection to lock service {channel.server} was lost and could not be made again within "
            f"{channel.lock_delay - DEAD_SERVER_BOUND:g} s (the service's lock-delay of {channel.lock_delay:g} s "
            f"less {DEAD_SERVER_BOUND:g} s)")


class Link:
    """One lock service (``role`` "primary" or "secondary", "" alone) and the channel in use to it."""

    __slots__ = ("_open", "channel", "next_attempt", "role", "server", "unreachable")

    def __init__(self, server: Server, role: str, open_channel: OpenChannel) -> None:
        self.server = server
        self.role = role
        self._open = open_channel
        #: The channel in use (it may have failed since; see ``live``), None before the first.
        self.channel: Channel | None = None
        #: Why the last attempt to reach the service failed; None once it answered.
        self.unreachable: ServiceUnavailable | None = None
        #: When (time.monotonic()) the watcher may next try to reach it.
        self.next_attempt = 0.0

    def live(self) -> Channel | None:
        """The channel in use if it works."""
        channel = self.channel
        return channel if channel is not None and channel.failure is None else None

    def open(self, deadline: float | None = None) -> Channel:
        """A new channel to the service, within ``deadline`` (time.monotonic()) if given; ServiceUnavailable
        (kept in ``unreachable``) when it cannot be reached."""
        timeout = None if deadline is None else min(CONNECT_TIMEOUT, max(0.001, deadline - time.monotonic()))
        try:
            channel = self._open(self.server, timeout)
        except ServiceUnavailable as exc:
            self.unreachable = exc
            self.next_attempt = time.monotonic() + RETRY_INTERVAL
            raise
        self.channel, self.unreachable = channel, None
        return channel

    def name(self) -> str:
        return f"{self.role} lock service {self.server}" if self.role else f"lock service {self.server}"


def exchange_all(channel: Channel, requests: Sequence[Reclaim | Lock]) -> list[Message]:
    """Send every request at once, then take each one's first answer: n reclaims (or locks taken again
    without waiting) cost one round trip, not n. ServiceUnavailable if the channel fails meanwhile; a
    service that does not answer them within CONNECT_TIMEOUT fails it (recovery must not hang on it)."""
    until = time.monotonic() + CONNECT_TIMEOUT
    for request in requests:
        channel.register(request.request_id)
    try:
        for request in requests:
            channel.send(request)
        return [channel.expect(request.request_id, until=until) for request in requests]
    except AcknowledgementTimeout as exc:
        raise channel.fail(f"{exc} (recovering its locks)") from None
    finally:
        for request in requests:
            channel.forget(request.request_id)

"""Where a client's requests go, and what happens when a lock server fails: kept out of the client.

The client builds requests and reads answers; a Route says which lock server
gets them, connects on first use, gives out the handle the application holds,
and decides what a lost server means. One server (JDLS SERVER alone) is the
plain case below: a lost server is the caller's ServiceUnavailable, the same on
every later request, because the lost lock server released the process's locks
and a quiet reconnection would hide that. SERVER2 adds a secondary
(``resilience.ResilientRoute``); the client does not know which it has.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from dls_proto import Granted, InfoPut, Lock, Message, Server, Unlock, UnlockAll

from .channel import Channel
from .errors import ServiceUnavailable
from .trace import Tracer

T = TypeVar("T")
#: Makes the channel to a server (connected and greeted), or raises ServiceUnavailable.
OpenChannel = Callable[[Server], Channel]
#: Told of each channel that becomes the one requests go to: it knows nothing of the client yet.
OnPrimary = Callable[[Channel], None]


class Route:
    """The lock server this client's requests go to: one server, connected on first use."""

    def __init__(self, servers: tuple[Server, ...], open_channel: OpenChannel, trace: Tracer,
                 on_primary: OnPrimary) -> None:
        self.servers = servers
        self._open = open_channel
        self.trace = trace
        self._on_primary = on_primary
        #: The channel requests go to; None until the first request connects.
        self.primary: Channel | None = None
        self._connect_lock = threading.Lock()

    # -- where requests go ------------------------------------------------------------

    def current(self) -> Channel:
        """The channel requests go to now, connecting on first use (ServiceUnavailable when it cannot)."""
        primary = self.primary
        if primary is None:
            primary = self._connect()
        return primary

    def ask(self, attempt: Callable[[Channel], T]) -> T:
        """``attempt(channel)`` on the current channel; when a server fails under it, what ``lost`` says
        (one server: the caller's ServiceUnavailable; SERVER2: asked again on the server left)."""
        while True:
            channel = self.current()
            try:
                return attempt(channel)
            except ServiceUnavailable as exc:
                self.lost(channel, exc)

    def channels(self) -> list[Channel]:
        """The live channels, the current one first (none before the first connection)."""
        return [] if self.primary is None else [self.primary]

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
        self._on_primary(primary)
        return primary

    def _connect_all(self) -> Channel:
        """Connect to the servers; the primary channel."""
        return self._open(self.servers[0])

    def lost(self, channel: Channel, exc: ServiceUnavailable) -> None:
        """``channel`` failed with ``exc``: with one server there is nothing else to try."""
        raise exc

    # -- what the client asks -----------------------------------------------------------

    def held(self, channel: Channel, request: Lock, granted: Granted) -> int:
        """``channel`` granted ``request``: the handle the application holds (the server's own here)."""
        return granted.handle

    def unlock(self, handle: int) -> None:
        """Release lock ``handle``; unanswered unless it fails (the failure comes as an unsolicited Error)."""
        channel = self.current()
        channel.send(Unlock(channel.next_id(), handle))

    def release_all(self, thread: int) -> Message:
        """UnlockAll of ``thread`` (ALL_THREADS: every thread); the server's answer."""
        channel = self.current()
        return channel.request(UnlockAll(channel.next_id(), thread))

    def publish(self, payload: bytes) -> None:
        """Send the client's lock information (an InfoPut) to every server that serves it."""
        for channel in self.channels():
            try:
                channel.send(InfoPut(channel.next_id(), payload))
            except ServiceUnavailable as exc:
                self.lost(channel, exc)

    def close(self) -> None:
        """Close every channel (the client makes a new Route if it is used again)."""
        for channel in self.channels():
            channel.close()


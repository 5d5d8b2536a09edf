"""A client's watcher thread: a failed lock server is found at once, even while the application makes no
call, without costing the lock path anything.

The watcher never reads a channel (whichever request thread needs a reply
reads it, see dls_client.channel): it polls the channels' sockets for hang-up
and error only (POLLRDHUP, POLLHUP, POLLERR), which a live connection never
reports, however many replies wait on it. So a lock/unlock cycle costs what
it cost before, and a lock server that dies is found the moment the kernel
says so (a silent one within channel.DEAD_SERVER_BOUND, by keepalive); the
route then recovers, and the holders of what was lost are told within a second.
The watcher is also the route's timer (``tick``): it tries again every second to
reach a service whose locks wait to be reclaimed, and gives them up on time.

One daemon thread per client, started with its first channel; it holds the
client only weakly and ends when the client is closed or collected.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

from .channel import HANGUP, Channel


class Watched(Protocol):
    """What the watcher needs of a client's route."""

    def channels(self) -> list[Channel]: ...

    def failed(self, channel: Channel, reason: str | None = None) -> None: ...

    def tick(self) -> float: ...


class Watcher:
    """The watcher of one client: ``route()`` says the client's route now (None once the client is gone);
    ``log`` takes what went wrong in the watcher itself."""

    def __init__(self, route: Callable[[], Watched | None], log: Callable[[str], None]) -> None:
        self._route = route
        self._log = log
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pid = 0
        self._wake_r = self._wake_w = -1

    def watch(self) -> None:
        """A channel was opened: start the thread if it does not run (in this process), else make it look
        at the channels again."""
        with self._lock:
            running = self._thread is not None and self._thread.is_alive() and self._pid == os.getpid()
            if not running:
                if self._wake_r < 0 or self._pid != os.getpid():
                    self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                    weakref.finalize(self, _close, self._wake_r, self._wake_w)
                self._stop = threading.Event()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=_run, name="dls-client-watcher", daemon=True,
                                                args=(self._route, self._log, self._wake_r, self._stop))
                self._thread.start()
                return
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway), or closed
            os.write(self._wake_w, b"w")

    def stop(self) -> None:
        """End the thread (the client was closed); waited for unless called from the thread itself."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is None:
            return
        self.wake()
        if thread is not threading.current_thread() and self._pid == os.getpid():
            thread.join(5)


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _run(route_of: Callable[[], Watched | None], log: Callable[[str], None], wake: int,
         stop: threading.Event) -> None:
    reported: weakref.WeakSet[Channel] = weakref.WeakSet()  # told failed: not polled again
    while not stop.is_set() and _watch_once(route_of, log, wake, reported):
        pass


def _watch_once(route_of: Callable[[], Watched | None], log: Callable[[str], None], wake: int,
                reported: weakref.WeakSet[Channel]) -> bool:
    """One tick and one poll; False once the client is gone. Nothing of the client outlives the call (its
    channels lead back to it), so that a client nobody holds is collected, and its watcher ends."""
    route = route_of()
    if route is None:
        return False
    try:
        timeout = route.tick()
        channels = [channel for channel in route.channels() if channel not in reported]
    except Exception as exc:
        log(f"Client: watcher: {type(exc).__name__}: {exc}")
        timeout, channels = 1.0, []
    del route  # held weakly while it sleeps
    poller = select.poll()
    poller.register(wake, select.POLLIN)
    by_fd = _register(poller, channels)
    del channels
    try:
        events = poller.poll(max(1, int(timeout * 1000)))
    except InterruptedError:
        return True
    for fd, _ in events:
        if fd == wake:
            with contextlib.suppress(OSError):
                os.read(wake, 4096)
            continue
        hung = by_fd[fd]()
        route = route_of()
        if hung is None or route is None:
            continue
        reported.add(hung)
        try:
            route.failed(hung, _why(hung))
        except Exception as exc:
            log(f"Client: watcher: {type(exc).__name__}: {exc}")
        del route, hung
    return True


def _register(poller: select.poll, channels: list[Channel]) -> dict[int, weakref.ref[Channel]]:
    """Poll ``channels`` for a hang-up; each by its fd, held weakly while the watcher sleeps (a channel leads
    back to its client)."""
    by_fd = {}
    for channel in channels:
        fd = channel.sock.fileno()
        if fd >= 0:
            by_fd[fd] = weakref.ref(channel)
            poller.register(fd, HANGUP)
    return by_fd


def hung_up(channel: Channel) -> str | None:
    """Why ``channel`` hung up, if its socket says so now (a poll that does not wait); None while it is well."""
    if channel.sock.fileno() < 0:
        return f"lock service {channel.server}: connection closed"
    try:
        hung = channel.hung_up()
    except InterruptedError:
        return None
    return _why(channel) if hung else None


def _why(channel: Channel) -> str:
    """What the kernel says of a hung-up channel, as the channel itself would say it."""
    try:
        error = channel.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        error = 0
    if error:
        return f"connection to lock service {channel.server} failed: {os.strerror(error)}"
    return f"lock service {channel.server} closed the connection"

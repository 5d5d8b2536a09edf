"""A Client's reader of blocking notices while nobody else reads its connections.

A Client's connection is read by whichever request thread waits for a reply (``channel``); while the
application makes no request, nobody reads it, and a ``Blocking`` message would wait there until the next
request. A client that holds locks asking for blocking notices therefore runs this thread: it sleeps on its
channels' sockets and, when one has something and no request thread reads it, reads it (``Channel.read_idle``),
so that a notice reaches the application's callback within milliseconds (``blocking``). It runs only while such
locks are held (a client that never asks for notices reads as before) and holds the client only weakly.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable

from .channel import Channel

#: How long the thread sleeps at most before it looks again whether it is still wanted (seconds).
LOOK_AGAIN = 0.5
#: How long it lets a request thread that reads the connection do so before it looks again (seconds).
READER_BUSY = 0.005


class NoticeReader:
    """Reads the channels ``channels()`` names while ``wanted()`` says locks ask for notices."""

    def __init__(self, channels: Callable[[], list[Channel] | None], wanted: Callable[[], bool]) -> None:
        self._channels = channels
        self._wanted = wanted
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run the thread if it does not run (a lock asking for notices was just granted)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="dls-notice-reader", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while self._wanted():
            channels = [c for c in self._channels() or [] if c.failure is None]
            if not channels:
                time.sleep(LOOK_AGAIN)
                continue
            poller = select.poll()
            by_fd = {}
            for channel in channels:
                fd = channel.sock.fileno()
                if fd >= 0:
                    by_fd[fd] = channel
                    poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(LOOK_AGAIN * 1000):
                channel = by_fd[fd]
                if not channel.read_idle() and channel.failure is None:
                    time.sleep(READER_BUSY)  # a request thread reads it: the notice reaches us through it

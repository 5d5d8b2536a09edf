"""The little socket code both ends share: waiting for the next event, and reading with a short busy-poll.

Every blocking reader of a ``Connection`` (the client's channel, a lock
server's greeting, ``jdls -C``, the utilities' snapshot) feeds it the same way:
``receive`` holds that loop once.

On the lock path an answer (a Granted, or a client's next request) comes back
within tens of microseconds, sooner than a sleeping process is woken and
scheduled again; polling the socket for a little while before sleeping in
``recv`` makes a round trip markedly shorter. Polling costs a core, though, so
it is done only while it pays: while the machine has a core to spare (no more
runnable processes than cores, this one and the peer it waits for included,
read from /proc/loadavg every ``SAMPLE_EVERY`` reads) and while polls keep
finding data (after ``MISSES`` empty polls in a row it rests for ``REST``
reads). And it never keeps a core from a process that needs it: between two
polls it yields the processor (``sched_yield``), so that a process ready to
run on this core (the lock server it waits for, say) runs first, and the poll
goes on only while nobody else wants the core.

Over TLS the socket is an ``ssl.SSLSocket``: bytes already decrypted wait in
its SSL object (``pending()``), where poll and select cannot see them, so they
are taken first; a poll then watches the descriptor for the next record
(``recv`` of an SSL socket takes no flags). An SSL object must not be used by
two threads at once (OpenSSL does not allow it), and a client's threads read
and write one connection: a threaded caller gives the reader the lock it also
sends under (``guard``) and a non-blocking socket; the reader then waits for
a record with a poll of up to ``slice_`` seconds outside the lock, and only
the ``recv`` itself holds it. A slice that passes, or a record not yet
whole, is the BlockingIOError a plain socket's receive timeout raises, so
that callers see one thing.

Everything else about the conversation stays in the sans-IO ``Connection``.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from .connection import Connection, NeedData
from .messages import Event, Message

if TYPE_CHECKING:
    import ssl

#: How long one poll lasts before the reader goes to sleep in recv (seconds).
SPIN_SECONDS = 60e-6
MISSES = 8
REST = 256
#: Reads between two looks at how busy the machine is (a look is one pread of /proc/loadavg, a few µs).
SAMPLE_EVERY = 8

_CORES = os.cpu_count() or 1
#: Gives the processor to another process ready to run on it, if there is one (else returns at once).
_yield = os.sched_yield
#: /proc/loadavg, opened on the first look and kept open (-1 until then).
_loadavg_fd = -1


def _runnable() -> int:
    """Processes running or ready to run now (the kernel's procs_running), 0 if unknown. One pread of a
    descriptor kept open: cheap enough to look often."""
    global _loadavg_fd
    try:
        if _loadavg_fd < 0:
            _loadavg_fd = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        return int(os.pread(_loadavg_fd, 128, 0).split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return 0


def _forget_loadavg() -> None:
    """A forked child (a lock server, say) closes the copy of its parent's descriptor, which it would otherwise
    keep unused, and opens its own when it looks."""
    global _loadavg_fd
    if _loadavg_fd >= 0:
        with contextlib.suppress(OSError):
            os.close(_loadavg_fd)
        _loadavg_fd = -1


os.register_at_fork(after_in_child=_forget_loadavg)


def tls_socket(sock: socket.socket) -> ssl.SSLSocket | None:
    """``sock`` if it is a TLS socket, else None. ssl is looked at only when loaded (no TLS socket exists
    before it is), so that a process connecting without TLS never imports it: ssl costs a client's start-up
    about a tenth of its time. Another thread may be importing it now: a module half made has no SSLSocket
    yet, and then no socket is one."""
    ssl_class = getattr(sys.modules.get("ssl"), "SSLSocket", None)
    if ssl_class is not None and isinstance(sock, ssl_class):
        return cast("ssl.SSLSocket", sock)
    return None


class SpinningReader:
    """``read()`` is ``sock.recv(size)``, preceded by a short poll when that pays."""

    def __init__(self, sock: socket.socket, size: int = 65536, *, spin: float = SPIN_SECONDS,
                 guard: threading.Lock | None = None, slice_: float = 1.0) -> None:
        self._recv = sock.recv
        self._tls = tls_socket(sock)
        #: What a TLS read raises while a record is not whole (nothing without TLS).
        self._not_whole: tuple[type[OSError], ...] = ()
        if self._tls is not None:
            import ssl

            self._not_whole = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN)
        #: With TLS and threads: the lock every use of the SSL object takes (the socket is non-blocking).
        self._guard = guard
        self._slice_ms = max(1, int(slice_ * 1000))
        self._size = size
        self._spin = spin
        self._misses = 0
        self._rest = 0
        self._until_sample = 0
        self._spare_core = True

    def read(self) -> bytes:
        if self._tls is not None:
            return self._read_tls(self._tls)
        if self._rest:
            self._rest -= 1
        elif self._spin and self._has_spare_core():
            data = self._poll()
            if data is not None:
                return data
        return self._recv(self._size)

    def _read_tls(self, tls: ssl.SSLSocket) -> bytes:
        """``read`` over TLS: decrypted bytes first, then a poll of the descriptor, then ``recv``."""
        guard = self._guard
        if guard is not None:
            return self._read_guarded(tls, guard)
        if not tls.pending():
            if self._rest:
                self._rest -= 1
            elif self._spin and self._has_spare_core():
                self._poll_tls()
        try:
            return tls.recv(self._size)
        except TimeoutError as exc:
            if exc.errno is not None:  # ETIMEDOUT from the kernel: the peer is gone, not a slice that passed
                raise
            raise BlockingIOError("no data within the socket's timeout") from None

    def _read_guarded(self, tls: ssl.SSLSocket, guard: threading.Lock) -> bytes:
        """``read`` over TLS shared by threads: the SSL object is touched only under ``guard``, and the wait
        for the next record (a poll of up to a slice) is done outside it, so that senders are not held up."""
        with guard:
            waiting = tls.pending()
        if not waiting:
            if self._rest:
                self._rest -= 1
            elif self._spin and self._has_spare_core():
                self._poll_tls()
            if not self._poller.poll(self._slice_ms):
                raise BlockingIOError("no data within a slice")
        with guard:
            try:
                return tls.recv(self._size)
            except self._not_whole:
                raise BlockingIOError("a TLS record is not whole yet") from None

    def _poll_tls(self) -> None:
        """Wait up to the spin for the descriptor to become readable (then ``recv`` does not sleep)."""
        poll, pause = self._poller.poll, _yield
        end = time.perf_counter() + self._spin
        while not poll(0):
            pause()
            if time.perf_counter() >= end:
                self._misses += 1
                if self._misses >= MISSES:
                    self._misses = 0
                    self._rest = REST
                return
        self._misses = 0

    def _has_spare_core(self) -> bool:
        if self._until_sample:
            self._until_sample -= 1
        else:
            self._until_sample = SAMPLE_EVERY
            # This process counts itself among the runnable ones.
            self._spare_core = _runnable() <= _CORES
        return self._spare_core

    def _poll(self) -> bytes | None:
        recv, size, pause = self._recv, self._size, _yield
        end = time.perf_counter() + self._spin
        while True:
            try:
                data = recv(size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() < end:
                    pause()  # whoever else is ready to run on this core goes first
                    continue
                self._misses += 1
                if self._misses >= MISSES:
                    self._misses = 0
                    self._rest = REST
                return None
            self._misses = 0
            return data


def receive(conn: Connection, read: Callable[[], bytes]) -> Event:
    """The next complete event of ``conn``, feeding it ``read()`` (b"" at the end) until there is one.

    Whatever ``read`` raises (a timeout, a reset) goes to the caller, as do
    ``conn``'s RemoteProtocolError; the end of the stream is the
    ConnectionClosed event, or a RemoteProtocolError in the middle of a frame.
    """
    while True:
        event = conn.next_event()
        if not isinstance(event, NeedData):
            return event
        conn.receive_data(read())


def exchange(sock: socket.socket, conn: Connection, message: Message) -> Event:
    """Send ``message`` and wait for the next event: one request at a time, for tools (not the lock path)."""
    sock.sendall(conn.send(message))
    return receive(conn, lambda: sock.recv(65536))

"""The fork server: the process that forks the lock servers, so that the listener does not.

Why. A forked lock server shares its parent's memory until either writes to a page; every page the parent
writes after the fork (its accept loop, its books of clients, its log, its pid files) leaves the child the
only holder of the old copy, which then counts as the child's private memory. A listener that forked from
its own loop gave each lock server a copy of all it had written since the last fork, and paid a
copy-on-write fault for each such page itself. The fork server is forked once, at the end of the listener's
start (before its loop has written anything), and does nothing but take an accepted connection, fork, and
say so: between two forks it writes a few pages, the same ones each time.

How. The listener accepts and checks a connection as before (``--allow``, the limits), then hands it to the
fork server over a socket pair (SOCK_SEQPACKET: one message a datagram), its descriptor passed with
SCM_RIGHTS, under a token of the listener's. The fork server forks the lock server and answers; the listener
writes the pid file and counts the client as it did. Messages:

- listener to fork server: ``C`` token port address, with the connection;
- fork server to listener: ``S`` token pid (started), ``F`` token errno (the fork failed: the connection is
  closed), ``E`` pid status (a lock server ended: its ``waitpid`` status, for the listener's books).

Its life. The fork server is the listener's companion (``lifecycle``): stopped with it (SIGTERM), and it
ends by itself when the listener's end of the pair closes (the listener killed). It never signals its lock
servers: when it ends they go on, adopted by the listener, a child subreaper (PR_SET_CHILD_SUBREAPER), which
reaps them and keeps their books as its own children's; with the listener gone too, by init, as before. A
fork server that dies, or does not answer a connection within ``ANSWER_TIMEOUT``, is noticed by the listener
(end of file on the pair, or the deadline) and replaced; the connections it had not answered are closed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import socket
import struct
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from . import log as daemon_log
from .lifecycle import fork_child
from .signals import SignalWatch

#: What the listener calls its fork server (in log lines).
NAME = "fork server"
#: Seconds the fork server has to answer a connection handed to it before the listener takes it for hung.
ANSWER_TIMEOUT = 10.0
#: Connections handed over and not yet answered, at most: beyond that the listener accepts no more until the
#: fork server catches up (the rest wait in the listen backlog), so that neither side ever blocks on the pair.
MAX_HANDED = 64

Peer = tuple[str, int]

_HAND = struct.Struct("!cQH")  # C, token, port; the address follows
_REPLY = struct.Struct("!cQq")
STARTED, FORK_FAILED, ENDED = b"S", b"F", b"E"
#: What the fork server watches: the stop signals and its lock servers' ends.
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
_PR_SET_CHILD_SUBREAPER = 36


class Reply(NamedTuple):
    """A message of the fork server: ``kind`` STARTED (token, pid), FORK_FAILED (token, errno) or ENDED
    (pid, waitpid status)."""

    kind: bytes
    first: int
    second: int


def become_subreaper() -> None:
    """Adopt the orphans of this process's descendants (a fork server's lock servers when it has died), so that
    they are reaped, and counted, here rather than by init. OSError when the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"PR_SET_CHILD_SUBREAPER: {os.strerror(error)}")


class ForkServer:
    """The listener's side of its fork server: the pair's end and the fork server's pid."""

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel
        channel.setblocking(False)

    def fileno(self) -> int:
        return self.channel.fileno()

    def hand(self, token: int, conn: socket.socket, peer: Peer) -> None:
        """Pass ``conn`` to the fork server (the caller then closes its own copy); OSError when it cannot be
        (the fork server gone: EPIPE, ECONNRESET). Never blocks: at most MAX_HANDED are in flight."""
        socket.send_fds(self.channel, [_HAND.pack(b"C", token, peer[1]) + peer[0].encode()], [conn.fileno()])

    def replies(self) -> tuple[list[Reply], bool]:
        """The messages that have come, and whether the fork server has gone after them (its end closed)."""
        got: list[Reply] = []
        while True:
            try:
                data = self.channel.recv(_REPLY.size)
            except BlockingIOError:
                return got, False
            except OSError:
                return got, True
            if len(data) != _REPLY.size:  # b"": the end of file
                return got, True
            got.append(Reply(*_REPLY.unpack(data)))

    def close(self) -> None:
        self.channel.close()


def start(fork: Callable[[str, Callable[[], int]], int], serve: Callable[[socket.socket, Peer], int],
          log: logging.Logger) -> ForkServer:
    """Fork a fork server with ``fork`` (the listener's, which drops its resources in the child), whose lock
    servers run ``serve``; OSError when it cannot be forked."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def body() -> int:
        ours.close()
        return serve_forks(theirs, serve, log)

    try:
        pid = fork(NAME, body)
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    return ForkServer(pid, ours)


def serve_forks(channel: socket.socket, serve: Callable[[socket.socket, Peer], int], log: logging.Logger) -> int:
    """The fork server's life: fork a lock server running ``serve`` for each connection handed over, report
    each start and end, until the listener's end closes or a stop signal comes; its exit status."""
    daemon_log.set_role("forkserver")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a terminal's hang-up is not for it (lock servers ignore it too)
    watch = SignalWatch(_SIGNALS)
    channel.setblocking(False)

    def forget() -> None:
        watch.close(default_handlers=True)
        channel.close()

    def tell(kind: bytes, first: int, second: int) -> None:
        channel.setblocking(True)  # the listener reads whenever it is not accepting: never for long
        try:
            channel.send(_REPLY.pack(kind, first, second))
        finally:
            channel.setblocking(False)

    try:
        while True:
            readable, _, _ = select.select([watch.fileno(), channel.fileno()], [], [])
            taken = watch.take()
            if taken & {signal.SIGTERM, signal.SIGINT}:
                return 0
            if signal.SIGCHLD in taken:
                for pid, status in _ended():
                    tell(ENDED, pid, status)
            if channel.fileno() in readable and not _fork_handed(channel, serve, forget, tell, log):
                return 0
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the listener has gone: so do we, its lock servers going on
    finally:
        watch.close()


def _ended() -> list[tuple[int, int]]:
    """Every lock server that has ended: (pid, status)."""
    ended: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return ended
        if pid == 0:
            return ended
        ended.append((pid, status))


def _fork_handed(channel: socket.socket, serve: Callable[[socket.socket, Peer], int], forget: Callable[[], None],
                 tell: Callable[[bytes, int, int], None], log: logging.Logger) -> bool:
    """Fork a lock server for each connection waiting on the pair; False when the listener's end has closed."""
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(channel, 1024, 1)
        except BlockingIOError:
            return True
        if not data:
            return False
        _, token, port = _HAND.unpack_from(data)
        if not fds:  # not installed here (out of descriptors): the kernel has closed it
            tell(FORK_FAILED, token, errno.EMFILE)
            continue
        conn = socket.socket(fileno=fds[0])
        peer = (data[_HAND.size:].decode(), port)
        try:
            pid = fork_child(f"lock server for {peer[0]}", _SIGNALS, forget, partial(serve, conn, peer), log)
        except OSError as exc:
            tell(FORK_FAILED, token, exc.errno or errno.EAGAIN)
        else:
            tell(STARTED, token, pid)
        finally:
            conn.close()

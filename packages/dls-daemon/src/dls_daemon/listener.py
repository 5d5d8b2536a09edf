"""The listener: accepts client connections and forks one lock server for each.

A lock server needs nothing from the listener after the fork (its connection,
the table mapping and a ServerContext are inherited), so stopping or restarting
the listener leaves every running lock server and its client alone; only new
clients cannot connect meanwhile.

The lock mechanism is chosen once, at start: the table if the monitor made
one, otherwise OS file locks. Switching later would let two clients of one
record lock it through different mechanisms without seeing each other.

The client limit is the listener's (the other limits are the lock server's).
A client over it is accepted only to be told so and closed, because a refusal
the client can read beats a connection that hangs in the backlog; its
connection lingers a moment, read and dropped, so that closing with its Hello
unread does not reset the connection and take the Error with it. So is a
client address over ``--max-per-address``.

Who may connect is decided at accept, before anything is read or forked: a
peer outside ``--allow`` is closed at once, unanswered (a stranger learns
nothing, not even which protocol is spoken here), and logged; the log's rate
limit keeps a flood of them from filling the disk, which is also why those
lines name the address without the port.

How many clients the host has room for is a matter of processes and memory, not of the listener's
descriptors (it keeps none per client): at start it raises its descriptor limit and logs that room, with a
warning for each limit below ``--max-clients`` (``capacity``).

Each lock server has a pid file in ``run/servers`` so that ``jdls -k`` can find
it after the listener has gone. The listener writes it right after the fork
and removes it when it reaps the child, the child writes it again when it
starts and removes it when it ends: whichever outlives the other cleans up,
and a lock server is never unlisted while it runs.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections import Counter
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from dls_proto import Error, ErrorCode, encode
from dls_shm import LISTENER, LockTable, PidRecord, TableError, TableMissing, pidfiles, trusted

from . import capacity, client_info, lockserver
from . import log as daemon_log
from .context import ServerContext, address_in
from .lifecycle import Daemon, StartFailed, status_text
from .one_mechanism import listener_refusal
from .readiness import Report
from .settings import Settings
from .tls import TlsSetupError

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

#: Connections the kernel queues before the listener accepts them (capped by net.core.somaxconn): a burst of
#: clients (every application server restarting at once) waits here rather than retrying its SYN a second later.
BACKLOG = 4096
#: Seconds to wait after accept fails for want of resources.
ACCEPT_PAUSE = 0.1
#: A refused client gets this long to read its Error before the connection is dropped.
REFUSAL_LINGER = 2.0
#: At most this many refused connections linger at once; beyond that they are closed at once.
MAX_LINGERING = 64


def where(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def listen_socket(address: str, port: int) -> socket.socket:
    """A listening TCP socket on ``address:port``; OSError (with the port's story) when it cannot be had."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_problem(address: str, port: int) -> str | None:
    """Why the listener could not listen on ``address:port`` right now, or None if it could."""
    try:
        listen_socket(address, port).close()
    except OSError as exc:
        return cannot_listen(address, port, exc)
    return None


def cannot_listen(address: str, port: int, exc: OSError) -> str:
    """How a failure to listen on ``address:port`` is told."""
    return f"cannot listen on {where(address, port)}: {exc.strerror or exc}"


def _tls_note(settings: Settings) -> str:
    """What the start's log line says of TLS."""
    if settings.tls_cert is None:
        return "; plain TCP (no TLS)"
    clients = f"client certificates of {settings.tls_client_ca}" if settings.tls_client_ca else "no client certificate"
    return f"; TLS with {settings.tls_cert}, {clients}"


class Listener(Daemon):
    """The process that accepts client connections and forks one lock server for each; it chooses the
    lock mechanism once, at start, and counts the clients served against ``--max-clients``."""

    role = LISTENER

    def __init__(self, settings: Settings, log: logging.Logger) -> None:
        super().__init__(settings, log)
        self.sock: socket.socket | None = None
        self.table: LockTable | None = None
        self.ctx: ServerContext | None = None
        #: Lock servers forked by this listener (reaped, never stopped by it).
        self.children: set[int] = set()
        #: Lock servers of an earlier listener still running at start: they count against --max-clients.
        self.adopted: list[PidRecord] = []
        #: The client address of each lock server forked here, and how many each address has.
        self.addresses: dict[int, str] = {}
        self.per_address: Counter[str] = Counter()
        #: Refused connections, given a moment to read their Error: socket -> when to drop it.
        self.lingering: dict[socket.socket, float] = {}
        #: This process's command name, which its lock servers inherit (their pid files name it).
        self.command = ""

    # -- set-up ---------------------------------------------------------------------

    def setup(self, report: Report) -> str:
        """Bind the port, pick the lock mechanism, make the lock directory, and say so."""
        settings = self.settings
        try:
            self.sock = listen_socket(settings.bind, settings.port)
        except OSError as exc:
            raise StartFailed(cannot_listen(settings.bind, settings.port, exc)) from None
        self.sock.setblocking(False)
        bound = self.sock.getsockname()[1]
        try:
            self.table = LockTable.attach(self.instance.key, owners=trusted.trusted_owners())
        except TableMissing:
            self.log.info("no lock table with key 0x%08x: locks are OS file locks", self.instance.key)
        except TableError as exc:
            raise StartFailed(f"cannot use the lock table: {exc}") from None
        if self.table is not None:
            if settings.port_owners and not self.table.port_owners:
                warning = "the lock table exists without -P: its locks stay process based, -P is ignored"
                self.log.warning(warning)
                report.warn(warning)
            self.table.set_header(listener_pid=os.getpid())
            mechanism = f"lock table 0x{self.instance.key:08x}"
        else:
            problem = listener_refusal(self.instance)
            if problem is not None:
                raise StartFailed(problem)
            mechanism = f"OS file locks in {settings.lock_dir} (no lock table)"
        problem = self._make_lock_dirs()
        if problem is not None:
            raise StartFailed(problem)
        try:  # where show-item-locks and jdls -dvL look for this service's OS record locks
            trusted.write_new(self.instance.lock_dir_file, os.fsencode(settings.lock_dir.absolute()) + b"\n")
        except OSError as exc:
            self.log.warning("cannot record the lock directory in %s: %s", self.instance.lock_dir_file, exc)
        try:
            tls_context = settings.tls_context()
        except TlsSetupError as exc:
            raise StartFailed(f"cannot use TLS: {exc}") from None
        limits = replace(settings.limits, max_locks_per_client=settings.limits.locks_for(
            self.table.geometry.locks if self.table is not None else None))
        self.ctx = ServerContext(
            self.instance, self.table, daemon_log.get("server"), limits=limits,
            lock_dir=settings.lock_dir, binary_lock_dir=settings.binary_lock_dir, admin_allow=settings.admin_allow,
            gid=settings.gid,
            tls=tls_context,
        )
        self.instance.servers_dir.mkdir(parents=True, exist_ok=True)
        self.command = pidfiles.record_of(os.getpid()).command
        self.adopted = [r for r in map(pidfiles.read, self.instance.servers_dir.glob("*.pid"))
                        if r is not None and r.alive()]
        self.log.info(
            "listener started on %s, locks in %s; limits: %d clients, %d per address, %d locks per client, "
            "frames of %d bytes, handshake %g s, dead client %g s%s%s%s", where(settings.bind, bound), mechanism,
            limits.max_clients, limits.max_per_address, limits.max_locks_per_client, limits.max_frame,
            limits.handshake_timeout, limits.dead_client_bound,
            "" if limits.os_locks else "; BINARY requests refused",
            f"; {len(self.adopted)} lock server(s) of an earlier listener still serving" if self.adopted else "",
            _tls_note(settings),
        )
        room = capacity.room(limits.max_clients, self.table.geometry.locks if self.table is not None else None)
        self.log.info("this host: %s", "; ".join(room.notes))
        for warning in room.warnings:
            self.log.warning(warning)
        if settings.allow:
            self.log.info("clients accepted from %s only; the lock snapshot served to %s",
                          ", ".join(map(str, settings.allow)), ", ".join(map(str, settings.admin_allow)))
        else:
            self.log.warning("no --allow: accepting clients from any address (the lock snapshot only from %s)",
                             ", ".join(map(str, settings.admin_allow)))
        tls_said = " (TLS)" if tls_context is not None else ""
        return f"lock listener started at pid {os.getpid()} on {where(settings.bind, bound)}{tls_said}: {mechanism}"

    def _make_lock_dirs(self) -> str | None:
        """The record-lock directory exists when record locks are OS file locks (no table), or why not.

        Made at start so that a listener that could not lock anything fails at once; one it
        creates is the service group's (``trusted.SHARED``, 03770): the local processes of the
        group lock there, nobody else. One already there is checked (no symlink, no other user's,
        not writable by others). The binary-lock directory is made on first use only, so that a
        service that never takes a binary lock leaves nothing behind.
        """
        wanted = [self.settings.lock_dir] if self.table is None else []
        for directory in wanted:
            try:
                directory.parent.mkdir(parents=True, exist_ok=True)
                trusted.make_dir(directory, trusted.SHARED, gid=self.settings.gid)
            except trusted.Untrusted as exc:
                return f"cannot use the lock directory {exc}"
            except OSError as exc:
                return f"cannot use the lock directory {directory}: {exc.strerror or exc}"
        return None

    # -- the loop's work ----------------------------------------------------------------

    def watched(self) -> list[FileDescriptorLike]:
        assert self.sock is not None
        return [self.sock, *self.lingering]

    def timeout(self) -> float | None:
        if self.lingering:
            return max(0.0, min(self.lingering.values()) - time.monotonic())
        return None

    def work(self, readable: list[FileDescriptorLike]) -> None:
        """Accept and fork; drop the refused connections whose time is up."""
        if self.sock in readable:
            self._accept_all()
        if self.lingering:
            self._drain_lingering(readable)

    def stopping_note(self) -> str:
        return f"; {len(self.children)} lock server(s) go on"

    def status_line(self) -> str:
        """For systemctl status (the listener is the main process with jdls -i -D --foreground)."""
        return f"{self.clients()} lock server(s); port {self.settings.port}"

    # -- the client limit -----------------------------------------------------------

    def clients(self) -> int:
        """Lock servers running now: this listener's children and those of an earlier listener."""
        if self.adopted:
            self.adopted = [r for r in self.adopted if r.alive()]
        return len(self.children) + len(self.adopted)

    def _over_limit(self) -> bool:
        limit = self.settings.limits.max_clients
        if len(self.children) + len(self.adopted) < limit:
            return False
        self.reap()  # one that has just ended must not cost a client its place
        return self.clients() >= limit

    def _refuse(self, conn: socket.socket, peer: tuple[str, int], reason: str) -> None:
        """Tell a client over a limit so, in a dls-proto Error, and let it go (logged by address only:
        see the module docstring)."""
        self.log.warning("refused connection from %s: %s", peer[0], reason)
        if self.ctx is not None and self.ctx.tls is not None:
            # On a TLS port plain bytes would only read as a broken handshake, and a handshake here would let
            # anyone over the limit hold up the accept loop: closed without a word.
            conn.close()
            return
        try:
            conn.setblocking(False)
            conn.send(encode(Error(0, ErrorCode.LIMIT, reason)))  # a few bytes: they fit the socket buffer
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if len(self.lingering) >= MAX_LINGERING:
            conn.close()
            return
        # Read (and drop) its Hello until it closes: closing with unread bytes would reset the
        # connection and could take the Error with it.
        self.lingering[conn] = time.monotonic() + REFUSAL_LINGER

    def _drain_lingering(self, readable: list[FileDescriptorLike]) -> None:
        now = time.monotonic()
        for conn, until in list(self.lingering.items()):
            done = now >= until
            if conn in readable:
                try:
                    done = done or not conn.recv(65536)
                except BlockingIOError:
                    pass
                except OSError:
                    done = True
            if done:
                del self.lingering[conn]
                conn.close()

    # -- lock servers -------------------------------------------------------------------

    def _accept_all(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, addr = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                # Out of descriptors or memory: leave the connection queued, say so, and
                # pause rather than spin on a listening socket that stays readable.
                level = logging.ERROR if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM) else logging.WARNING
                self.log.log(level, "accept failed: %s", exc)
                time.sleep(ACCEPT_PAUSE)
                return
            peer = (str(addr[0]), int(addr[1]))
            allow = self.settings.allow
            if allow and not address_in(peer[0], allow):
                self.log.warning("refused connection from %s: not in --allow", peer[0])
                conn.close()
                continue
            limits = self.settings.limits
            if self._over_limit():
                self._refuse(conn, peer, f"limit of {limits.max_clients} clients reached")
                continue
            if self.per_address[peer[0]] >= limits.max_per_address:
                self._refuse(conn, peer, f"limit of {limits.max_per_address} connections per address reached")
                continue
            try:
                self._fork_server(conn, peer)
            finally:
                conn.close()

    def _fork_server(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        what = f"lock server for {where(*peer)}"
        try:
            pid = self.fork(what, partial(self._serve, conn, peer))
        except OSError as exc:
            self.log.error("cannot fork a %s: %s", what, exc)
            return
        self.children.add(pid)
        self.addresses[pid] = peer[0]
        self.per_address[peer[0]] += 1
        try:
            pidfiles.write(self.instance.server_pid_file(pid), pidfiles.record_of(pid, self.command))
        except Exception:  # noqa: S110 - already gone (the reaper tidies) or the child writes it itself
            pass
        self.log.info("connection from %s: lock server pid %d", where(*peer), pid)

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> int:
        """A lock server's life, in the forked child: listed in run/servers while it runs."""
        daemon_log.set_role("server", client=where(*peer))
        pid_path = self.instance.server_pid_file(os.getpid())
        try:
            record = pidfiles.record_of(os.getpid(), self.command)
            pidfiles.write(pid_path, record)
            assert self.ctx is not None
            return lockserver.serve(conn, peer, self.ctx, record)
        finally:
            pidfiles.remove(pid_path)

    def forget_own_in_child(self) -> None:
        """Drop what belongs to the listener, so that the child is a lock server and nothing else (the
        table mapping stays: the lock server locks in it). The books of the other lock servers (children,
        addresses, adopted) are left as they are, never used here: clearing them would write to each entry's
        reference count, copying into every lock server pages it otherwise shares, more the more clients."""
        self._close_sockets()

    def child_ended(self, pid: int, status: int) -> None:
        """A lock server has ended: forget it, and its pid file if it left one. One killed by a signal
        (SIGKILL) could not keep its client's locks itself: they are kept now, so that the lock-delay
        counts from its death rather than from whenever someone else notices it."""
        self.children.discard(pid)
        address = self.addresses.pop(pid, None)
        if address is not None:
            self.per_address[address] -= 1
            if self.per_address[address] <= 0:
                del self.per_address[address]
        pidfiles.remove(self.instance.server_pid_file(pid))
        if os.WIFSIGNALED(status) or os.WEXITSTATUS(status):
            self.log.warning("lock server %d %s", pid, status_text(status))
        else:
            self.log.debug("lock server %d ended", pid)
        if os.WIFSIGNALED(status):  # it could not remove its client's document itself
            client_info.remove_orphans(self.instance, self.log, f"lock server {pid} killed")
        if os.WIFSIGNALED(status) and self.table is not None:
            try:
                kept = self.table.keep_owner(pid)
            except TableError as exc:
                self.log.warning("keeping the locks of lock server %d: %s", pid, exc)
                return
            if kept:
                self.log.info("kept %d lock(s) of lock server %d for %g s, for its client to reclaim", kept, pid,
                              self.table.lock_delay)

    # -- the end ------------------------------------------------------------------------

    def last_work(self) -> None:
        """Collect the lock servers that have ended; the header no longer names this listener."""
        self.reap()
        if self.table is not None:
            try:
                if self.table.header().listener_pid == os.getpid():
                    self.table.set_header(listener_pid=0)
            except TableError as exc:
                self.log.warning("listener stopping: %s", exc)

    def release(self) -> None:
        """Let go of the sockets and the table (lock servers keep theirs)."""
        self._close_sockets()
        if self.table is not None:
            self.table.close()
            self.table = None

    def _close_sockets(self) -> None:
        """The listening socket and the refused connections still lingering."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for conn in self.lingering:
            conn.close()
        self.lingering.clear()

"""The listener: accepts client connections and forks one lock server for each.

A lock server needs nothing from the listener after the fork (its connection,
the table mapping and a ServerContext are inherited), so stopping or restarting
the listener leaves every running lock server and its client alone; only new
clients cannot connect meanwhile.

The lock mechanism is chosen once, at start: the table if the monitor made
one, otherwise OS file locks. Switching later would let two clients of one
record lock it through different mechanisms without seeing each other.

Limits come from the command line into the ServerContext: frame size,
handshake timeout, locks per client and the dead-client bound are the lock
server's to enforce; the number of clients is the listener's. A client over
that limit is accepted only to be told so (a dls-proto Error naming the limit)
and closed, and the log says so: a refusal the client can read beats a
connection that hangs in the backlog. Lock servers still running from an
earlier listener count too.

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
import select
import signal
import socket
import time
from pathlib import Path
from typing import NoReturn

from dls_proto import Error, ErrorCode, encode
from dls_shm import AlreadyRunning, HeldPidFile, LockTable, PidRecord, TableError, TableMissing, pidfiles

from . import lockserver
from . import log as daemon_log
from .context import ServerContext
from .report import Report
from .settings import Settings
from .signals import SignalWatch, block, unblock

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Exit status of a lock server that failed with an unexpected exception (EX_SOFTWARE).
EXIT_CRASHED = 70
BACKLOG = 128
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
        return f"cannot listen on {where(address, port)}: {exc.strerror or exc}"
    return None


class Listener:
    def __init__(self, settings: Settings, log: logging.Logger) -> None:
        self.settings = settings
        self.instance = settings.instance
        self.log = log
        self.sock: socket.socket | None = None
        self.table: LockTable | None = None
        self.pidfile: HeldPidFile | None = None
        self.signals: SignalWatch | None = None
        self.ctx: ServerContext | None = None
        self.children: set[int] = set()
        #: Lock servers of an earlier listener still running at start: they count against --max-clients.
        self.adopted: list[PidRecord] = []
        #: Refused connections, given a moment to read their Error: socket -> when to drop it.
        self.lingering: dict[socket.socket, float] = {}

    # -- start --------------------------------------------------------------------

    def start(self, report: Report) -> bool:
        """Take the pid file, bind the port, pick the lock mechanism, report; False (reported) when it cannot."""
        settings = self.settings
        self.signals = SignalWatch((*STOP_SIGNALS, signal.SIGCHLD))
        try:
            self.pidfile = HeldPidFile.acquire(self.instance.pid_file("listener"))
        except AlreadyRunning as exc:
            who = f"at pid {exc.record.pid}" if exc.record else "(pid unknown)"
            return self._fail(report, f"lock listener already running {who}")
        try:
            self.sock = listen_socket(settings.bind, settings.port)
        except OSError as exc:
            return self._fail(report, f"cannot listen on {where(settings.bind, settings.port)}: {exc.strerror or exc}")
        self.sock.setblocking(False)
        bound = self.sock.getsockname()[1]
        try:
            self.table = LockTable.attach(self.instance.key)
        except TableMissing:
            self.log.info("no lock table with key 0x%08x: locks are OS file locks", self.instance.key)
        except TableError as exc:
            return self._fail(report, f"cannot use the lock table: {exc}")
        port_owners = settings.port_owners
        if self.table is not None:
            port_owners = self.table.port_owners
            if settings.port_owners and not port_owners:
                warning = "the lock table exists without -P: its locks stay process based, -P is ignored"
                self.log.warning(warning)
                report.warn(warning)
            self.table.set_header(listener_pid=os.getpid())
            mechanism = f"lock table 0x{self.instance.key:08x}"
        else:
            mechanism = f"OS file locks in {settings.lock_dir} (no lock table)"
        problem = self._make_lock_dirs()
        if problem is not None:
            return self._fail(report, problem)
        self.ctx = ServerContext(
            self.instance, self.table, daemon_log.get("server"), limits=settings.limits, port_owners=port_owners,
            lock_dir=settings.lock_dir, binary_lock_dir=settings.binary_lock_dir,
        )
        self.instance.servers_dir.mkdir(parents=True, exist_ok=True)
        self.adopted = [r for r in map(pidfiles.read, self.instance.servers_dir.glob("*.pid"))
                        if r is not None and r.alive()]
        limits = settings.limits
        self.log.info(
            "listener started on %s, locks in %s; limits: %d clients, %d locks per client, frames of %d bytes, "
            "handshake %g s, dead client %g s%s", where(settings.bind, bound), mechanism, limits.max_clients,
            limits.max_locks_per_client, limits.max_frame, limits.handshake_timeout, limits.dead_client_bound,
            f"; {len(self.adopted)} lock server(s) of an earlier listener still serving" if self.adopted else "",
        )
        report.ready(f"lock listener started at pid {os.getpid()} on {where(settings.bind, bound)}: {mechanism}")
        return True

    def _make_lock_dirs(self) -> str | None:
        """The record-lock directory exists when record locks are OS file locks (no table), or why not.

        Made at start so that a listener that could not lock anything fails at once; one it
        creates is made like /tmp (mode 1777): local processes of every user lock there. The
        binary-lock directory is made on first use only, so that a service that never takes a
        binary lock leaves nothing behind.
        """
        wanted = [self.settings.lock_dir] if self.table is None else []
        for directory in wanted:
            try:
                if not directory.is_dir():
                    directory.mkdir(parents=True)
                    directory.chmod(0o1777)
            except FileExistsError:
                pass  # made meanwhile by another listener, or a file is in the way: the check below tells
            except OSError as exc:
                return f"cannot use the lock directory {directory}: {exc.strerror or exc}"
            if not directory.is_dir():
                return f"cannot use the lock directory {directory}: not a directory"
            if not os.access(directory, os.W_OK | os.X_OK):
                return f"cannot use the lock directory {directory}: not writable"
        return None

    def _fail(self, report: Report, text: str) -> bool:
        self.log.error(text)
        report.fail(text)
        self.close()
        return False

    # -- run ----------------------------------------------------------------------

    def run(self) -> int:
        """Accept and fork until told to stop; the exit status. Lock servers are left running."""
        assert self.sock is not None and self.signals is not None
        sock_fd = self.sock.fileno()
        try:
            while True:
                timeout = None
                if self.lingering:
                    timeout = max(0.0, min(self.lingering.values()) - time.monotonic())
                watched: list[int | socket.socket] = [sock_fd, self.signals.fileno(), *self.lingering]
                readable, _, _ = select.select(watched, [], [], timeout)
                signals = self.signals.take()
                if signals & set(STOP_SIGNALS):
                    names = ", ".join(signal.Signals(s).name for s in sorted(signals & set(STOP_SIGNALS)))
                    self.log.info("listener stopping (%s); %d lock server(s) go on", names, len(self.children))
                    break
                if signal.SIGCHLD in signals:
                    self.reap()
                if sock_fd in readable:
                    self._accept_all()
                if self.lingering:
                    self._drain_lingering(readable)
        finally:
            self._stop()
        return 0

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

    def _refuse(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        """Tell a client over the limit so, in a dls-proto Error, and let it go."""
        limit = self.settings.limits.max_clients
        reason = f"limit of {limit} clients reached"
        self.log.warning("refused connection from %s: %s", where(*peer), reason)
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

    def _drain_lingering(self, readable: list[int | socket.socket]) -> None:
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
            if self._over_limit():
                self._refuse(conn, peer)
                continue
            try:
                self._fork_server(conn, peer)
            finally:
                conn.close()

    def _fork_server(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        daemon_log.flush()
        watched = self.signals.signals if self.signals is not None else ()
        block(watched)  # until the child has dropped the listener's handlers
        try:
            pid = os.fork()
        except OSError as exc:
            unblock(watched)
            self.log.error("cannot fork a lock server for %s: %s", where(*peer), exc)
            return
        if pid == 0:
            self._serve_in_child(conn, peer, watched)
        unblock(watched)
        self.children.add(pid)
        try:
            pidfiles.write(self.instance.server_pid_file(pid), pidfiles.record_of(pid))
        except Exception:  # noqa: S110 - already gone (the reaper tidies) or the child writes it itself
            pass
        self.log.info("connection from %s: lock server pid %d", where(*peer), pid)

    def _serve_in_child(self, conn: socket.socket, peer: tuple[str, int], blocked: tuple[int, ...]) -> NoReturn:
        """The lock server's whole life: it never returns into the listener's loop."""
        status = EXIT_CRASHED
        pid_path: Path | None = None
        try:
            self._forget_in_child()
            unblock(blocked)
            daemon_log.set_role("server")
            pid_path = self.instance.server_pid_file(os.getpid())
            pidfiles.write(pid_path, pidfiles.record_of(os.getpid()))
            assert self.ctx is not None
            status = lockserver.serve(conn, peer, self.ctx)
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else EXIT_CRASHED
        except KeyboardInterrupt:
            self.log.info("lock server for %s interrupted (SIGINT)", where(*peer))
            status = 128 + signal.SIGINT
        except BaseException as exc:
            self.log.exception("lock server for %s failed: %r", where(*peer), exc)
            status = EXIT_CRASHED
        finally:
            if pid_path is not None:
                pidfiles.remove(pid_path)
            daemon_log.flush()
            os._exit(status)

    def _forget_in_child(self) -> None:
        """Drop what belongs to the listener, so that the child is a lock server and nothing else."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.signals is not None:
            self.signals.close(default_handlers=True)
            self.signals = None
        if self.pidfile is not None:
            self.pidfile.close_in_child()
            self.pidfile = None
        self.children.clear()
        self.adopted.clear()
        for conn in self.lingering:
            conn.close()
        self.lingering.clear()

    def reap(self) -> None:
        """Collect every lock server that has ended, and its pid file if it left one."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            pidfiles.remove(self.instance.server_pid_file(pid))
            if os.WIFSIGNALED(status):
                self.log.warning("lock server %d killed by %s", pid, signal.Signals(os.WTERMSIG(status)).name)
            elif os.WEXITSTATUS(status):
                self.log.warning("lock server %d exited with status %d", pid, os.WEXITSTATUS(status))
            else:
                self.log.debug("lock server %d ended", pid)

    def _stop(self) -> None:
        self.reap()
        if self.table is not None:
            try:
                if self.table.header().listener_pid == os.getpid():
                    self.table.set_header(listener_pid=0)
            except TableError as exc:
                self.log.warning("listener stopping: %s", exc)
        self.close()
        self.log.info("listener stopped")

    def close(self) -> None:
        """Let go of socket, table, pid file and signals (lock servers keep theirs)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for conn in self.lingering:
            conn.close()
        self.lingering.clear()
        if self.table is not None:
            self.table.close()
            self.table = None
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None
        if self.signals is not None:
            self.signals.close()
            self.signals = None

"""The listener: accepts client connections and forks one lock server for each.

A lock server needs nothing from the listener after the fork (its connection,
the table mapping and a ServerContext are inherited), so stopping or restarting
the listener leaves every running lock server and its client alone; only new
clients cannot connect meanwhile.

The lock mechanism is chosen once, at start: the table if the monitor made
one, otherwise OS file locks. Switching later would let two clients of one
record lock it through different mechanisms without seeing each other.

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

from dls_shm import LockTable, TableError, TableFlag, TableMissing

from . import lockserver, pidfile
from . import log as daemon_log
from .context import ServerContext
from .pidfile import AlreadyRunning, HeldPidFile, server_pid_file, servers_dir
from .report import Report
from .settings import Settings
from .signals import SignalWatch, block, unblock

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Exit status of a lock server that failed with an unexpected exception (EX_SOFTWARE).
EXIT_CRASHED = 70
BACKLOG = 128
#: Seconds to wait after accept fails for want of resources.
ACCEPT_PAUSE = 0.1


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
            port_owners = bool(self.table.header().flags & TableFlag.PORT_OWNERS)
            self.table.set_header(listener_pid=os.getpid())
            mechanism = f"lock table 0x{self.instance.key:08x}"
        else:
            mechanism = "OS file locks (no lock table)"
        self.ctx = ServerContext(self.instance, self.table, daemon_log.get("server"), port_owners=port_owners)
        servers_dir(self.instance).mkdir(parents=True, exist_ok=True)
        self.log.info("listener started on %s, locks in %s", where(settings.bind, bound), mechanism)
        report.ready(f"lock listener started at pid {os.getpid()} on {where(settings.bind, bound)}: {mechanism}")
        return True

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
                readable, _, _ = select.select([sock_fd, self.signals.fileno()], [], [])
                signals = self.signals.take()
                if signals & set(STOP_SIGNALS):
                    names = ", ".join(signal.Signals(s).name for s in sorted(signals & set(STOP_SIGNALS)))
                    self.log.info("listener stopping (%s); %d lock server(s) go on", names, len(self.children))
                    break
                if signal.SIGCHLD in signals:
                    self.reap()
                if sock_fd in readable:
                    self._accept_all()
        finally:
            self._stop()
        return 0

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
            try:
                self._fork_server(conn, (str(addr[0]), int(addr[1])))
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
            pidfile.write(server_pid_file(self.instance, pid), pidfile.record_of(pid))
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
            pid_path = server_pid_file(self.instance, os.getpid())
            pidfile.write(pid_path, pidfile.record_of(os.getpid()))
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
                pidfile.remove(pid_path)
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
            pidfile.remove(server_pid_file(self.instance, pid))
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
        if self.table is not None:
            self.table.close()
            self.table = None
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None
        if self.signals is not None:
            self.signals.close()
            self.signals = None

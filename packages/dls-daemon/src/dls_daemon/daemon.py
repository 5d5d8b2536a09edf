"""Starting the monitor and the listener (``jdls -i``), in the background or the foreground.

In the background each daemon is started the classic way: fork, ``setsid``,
fork again (so it is no session leader and can never regain a terminal),
``chdir("/")``, standard streams on /dev/null. The ``jdls`` that started it
waits on a pipe until the daemon reports ready or failed, so that it returns
only once the table exists or the port is bound, and prints the daemon's own
reason when it did not start. The monitor starts first: the listener decides
at start whether there is a table to use.

In the foreground (``-i`` without ``-b``, or ``--foreground``) the process
itself becomes the daemon; with both roles it is the monitor and the listener
is its child, stopped with it. Either way the daemons hold their pid files
locked, which is what makes a second start of the same instance refuse.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import TextIO

from dls_shm import LABELS, LISTENER, MONITOR, ROLES, pidfiles

from . import log as daemon_log
from .listener import Listener, listen_problem
from .monitor import Monitor
from .report import Outcome, PipeReport, PrintReport, Report, collect
from .settings import START_TIMEOUT, Settings
from .signals import block, unblock
from .stop import stop_roles

Body = Callable[[Report], int]


def start(
    settings: Settings, roles: tuple[str, ...], *, background: bool, out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``jdls -i``: start ``roles`` (in ROLES order); the exit status for the command line."""
    out = out or sys.stdout
    err = err or sys.stderr
    instance = settings.instance
    try:
        instance.make_dirs()
    except OSError as exc:
        print(f"jdls: cannot set up the instance directory {instance.root}: {exc}", file=err)
        return 1
    for role in roles:
        running = pidfiles.running(instance.pid_file(role))
        if running is not None:
            print(f"jdls: {LABELS[role]} already running at pid {running.pid}", file=err)
            return 1
    if LISTENER in roles:
        problem = listen_problem(settings.bind, settings.port)
        if problem is not None:
            print(f"jdls: {problem}", file=err)
            return 1
    if not background:
        return run_foreground(settings, roles)
    started: list[str] = []
    for role in roles:
        outcome = spawn_detached(partial(run_daemon, role, settings), LABELS[role])
        for warning in outcome.warnings:
            print(f"jdls: warning: {warning}", file=err)
        if not outcome.ok:
            print(f"jdls: {outcome.text}", file=err)
            if started:
                _roll_back(settings, started, out)
            return 1
        print(f"jdls: {outcome.text}", file=out, flush=True)
        started.append(role)
    return 0


def _roll_back(settings: Settings, started: list[str], out: TextIO) -> None:
    """Stop what this command started before one of its daemons failed: all or nothing."""
    print(f"jdls: stopping the {' and '.join(LABELS[r] for r in started)} started above", file=out)
    stop_roles(settings.instance, tuple(started), servers=False, timeout=settings.stop_timeout, out=out)


def run_daemon(role: str, settings: Settings, report: Report, *, foreground: bool = False) -> int:
    """The life of one daemon process: set up logging, start, run; its exit status."""
    try:
        logger = daemon_log.setup(settings.instance, role, verbosity=settings.verbosity, to_stderr=foreground,
                                  syslog=settings.syslog)
    except OSError as exc:
        report.fail(f"{LABELS[role]}: cannot write its log: {exc}")
        return 1
    service: Monitor | Listener = Monitor(settings, logger) if role == MONITOR else Listener(settings, logger)
    try:
        if not service.start(report):
            return 1
        return service.run()
    except Exception as exc:
        logger.exception("%s failed: %r", LABELS[role], exc)
        report.fail(f"{LABELS[role]} failed: {exc}")
        return 70


def spawn_detached(body: Body, what: str, timeout: float = START_TIMEOUT) -> Outcome:
    """Run ``body`` as a daemon (double fork, new session, no terminal); how its start went."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 70
        try:
            os.close(read_end)
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            os.chdir("/")
            _standard_streams_to_null()
            status = body(PipeReport(write_end))
        except BaseException:  # noqa: S110 - no terminal left to tell; the daemon logs its own failures
            pass
        finally:
            daemon_log.flush()
            os._exit(status)
    os.close(write_end)
    os.waitpid(pid, 0)
    return collect(read_end, timeout, what)


def _standard_streams_to_null() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def run_foreground(settings: Settings, roles: tuple[str, ...]) -> int:
    """This process becomes the daemon; with both roles it is the monitor and forks the listener."""
    report = PrintReport()
    if roles != ROLES:
        return run_daemon(roles[0], settings, report, foreground=True)
    try:
        logger = daemon_log.setup(settings.instance, MONITOR, verbosity=settings.verbosity, to_stderr=True,
                                  syslog=settings.syslog)
    except OSError as exc:
        report.fail(f"cannot write the log: {exc}")
        return 1
    monitor = Monitor(settings, logger)
    if not monitor.start(report):
        return 1

    watched = monitor.signals.signals if monitor.signals is not None else ()

    def listener_body(child_report: Report) -> int:
        monitor.forget_in_child()
        unblock(watched)
        return run_daemon(LISTENER, settings, child_report, foreground=True)

    listener = Companion.fork(listener_body, LABELS[LISTENER], settings.stop_timeout, blocked=watched)
    for warning in listener.outcome.warnings:
        report.warn(warning)
    if not listener.outcome.ok:
        report.fail(listener.outcome.text)
        listener.stop()
        monitor.close()
        return 1
    report.ready(listener.outcome.text)
    return monitor.run(on_child=listener.reap, before_stop=listener.stop)


class Companion:
    """A daemon forked as a child of a foreground daemon, which reaps and stops it."""

    def __init__(self, pid: int, what: str, outcome: Outcome, stop_timeout: float) -> None:
        self.pid = pid
        self.what = what
        self.outcome = outcome
        self.stop_timeout = stop_timeout

    @classmethod
    def fork(
        cls, body: Body, what: str, stop_timeout: float, *, blocked: tuple[int, ...] = (),
        timeout: float = START_TIMEOUT,
    ) -> Companion:
        """Fork ``body`` and wait for its report. ``blocked`` signals stay blocked in the child
        until ``body`` unblocks them, once it has dropped the parent's handlers."""
        sys.stdout.flush()
        sys.stderr.flush()
        daemon_log.flush()
        read_end, write_end = os.pipe()
        block(blocked)
        try:
            pid = os.fork()
        except OSError:
            unblock(blocked)
            raise
        if pid == 0:
            status = 70
            try:
                os.close(read_end)
                status = body(PipeReport(write_end))
            finally:
                daemon_log.flush()
                os._exit(status)
        unblock(blocked)
        os.close(write_end)
        return cls(pid, what, collect(read_end, timeout, what), stop_timeout)

    def reap(self) -> None:
        """Collect the child if it has ended (and say so: it was not asked to)."""
        if not self.pid:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid:
            daemon_log.get().warning("%s (pid %d) ended on its own: %s", self.what, self.pid, _status_text(status))
            self.pid = 0

    def stop(self) -> None:
        """SIGTERM, wait up to the stop timeout, then SIGKILL; always collected."""
        if not self.pid:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    self.pid = 0
                    return
            except ChildProcessError:  # collected elsewhere
                self.pid = 0
                return
            time.sleep(0.01)
        daemon_log.get().warning("%s (pid %d) did not stop within %g s: killing it", self.what, self.pid,
                                 self.stop_timeout)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.pid = 0


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"

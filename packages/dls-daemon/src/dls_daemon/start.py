"""Starting the monitor and the listener (``jdls -i``), in the background or the foreground.

A daemon started in the background is detached the classic way: fork,
``setsid``, fork again (so that it is no session leader and can never regain a
terminal), ``chdir("/")``, standard streams on /dev/null. The ``jdls`` that
started it waits on a pipe until the daemon reports ready or failed
(``readiness``), so that it returns only once the table exists or the port is
bound, and prints the daemon's own reason when it did not start. The monitor
starts first: the listener decides at start whether there is a table to use.
A start that fails half way stops what it started: all or nothing.

In the foreground with both roles, the process is the monitor and forks the
listener as its companion (``lifecycle``), stopped with it. Either way the
daemons hold their pid files locked, which is what makes a second start of
the same instance refuse.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TextIO

from dls_shm import LABELS, LISTENER, MONITOR, ROLES, pidfiles, trusted

from . import log as daemon_log
from .exitcodes import ExitCode
from .lifecycle import Daemon
from .listener import Listener, listen_problem
from .monitor import Monitor, http_problem
from .one_mechanism import start_refusal
from .readiness import Outcome, PipeReport, PrintReport, Report, collect
from .settings import START_TIMEOUT, Settings
from .stop import stop_roles

Body = Callable[[Report], int]


def os_problem(exc: OSError, where: Path) -> str:
    """An OSError met in the instance directory as one line: the path and the problem, and for a
    permission problem who may do it (the instance is its user's, and its group's for some)."""
    path = exc.filename if exc.filename is not None else where
    problem = (exc.strerror or str(exc)).lower() if exc.strerror else str(exc)
    if isinstance(exc, PermissionError):
        return (f"{path}: {problem}: this user may not use the instance directory {where} (run jdls as the "
                "service's user, or as a member of its group)")
    return f"{path}: {problem}"


def start(
    settings: Settings, roles: tuple[str, ...], *, background: bool, out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``jdls -i``: start ``roles`` (in ROLES order); the exit status for the command line."""
    out = out or sys.stdout
    err = err or sys.stderr
    instance = settings.instance
    try:
        instance.make_dirs(settings.gid)
        instance.check_files()
        for role in roles:
            running = pidfiles.running(instance.pid_file(role))
            if running is not None:
                print(f"jdls: {LABELS[role]} already running at pid {running.pid}", file=err)
                return ExitCode.FAILED
    except trusted.Untrusted as exc:
        print(f"jdls: {exc}: refused (see 'Local permissions' in the dls-daemon README)", file=err)
        return ExitCode.FAILED
    except OSError as exc:
        print(f"jdls: cannot set up the instance directory {instance.root}: {os_problem(exc, instance.root)}",
              file=err)
        return ExitCode.FAILED
    if MONITOR in roles:
        problem = start_refusal(settings)
        if problem is not None:
            print(f"jdls: {problem}", file=err)
            return ExitCode.FAILED
    if MONITOR in roles and settings.http is not None:
        problem = http_problem(settings.http)
        if problem is not None:
            print(f"jdls: {problem}", file=err)
            return ExitCode.FAILED
    if LISTENER in roles:
        problem = listen_problem(settings.bind, settings.port)
        if problem is not None:
            print(f"jdls: {problem}", file=err)
            return ExitCode.FAILED
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
            return ExitCode.FAILED
        print(f"jdls: {outcome.text}", file=out, flush=True)
        started.append(role)
    return ExitCode.OK


def _roll_back(settings: Settings, started: list[str], out: TextIO) -> None:
    """Stop what this command started before one of its daemons failed: all or nothing."""
    print(f"jdls: stopping the {' and '.join(LABELS[r] for r in started)} started above", file=out)
    stop_roles(settings.instance, tuple(started), servers=False, timeout=settings.stop_timeout, out=out)


def _daemon(role: str, settings: Settings, *, foreground: bool) -> Daemon:
    """The daemon of ``role``, its logging set up (OSError when the log cannot be written)."""
    logger = daemon_log.setup(settings.instance, role, verbosity=settings.verbosity, to_stderr=foreground,
                              syslog=settings.syslog)
    return Monitor(settings, logger) if role == MONITOR else Listener(settings, logger)


def run_daemon(role: str, settings: Settings, report: Report, *, foreground: bool = False) -> int:
    """The life of one daemon process: set up logging, start, run; its exit status."""
    try:
        daemon = _daemon(role, settings, foreground=foreground)
    except OSError as exc:
        report.fail(f"{LABELS[role]}: cannot write its log: {exc}")
        return ExitCode.FAILED
    return _live(daemon, report)


def _live(daemon: Daemon, report: Report, started: Callable[[], bool] | None = None) -> int:
    """Start ``daemon``, then ``started()`` (False: it did not go on), run it; the exit status. An
    unexpected exception is logged with its traceback and ends it with CRASHED."""
    try:
        if not daemon.start(report) or (started is not None and not started()):
            return ExitCode.FAILED
        return daemon.run()
    except Exception as exc:
        daemon.log.exception("%s failed: %r", LABELS[daemon.role], exc)
        report.fail(f"{LABELS[daemon.role]} failed: {exc}")
        return ExitCode.CRASHED


def spawn_detached(body: Body, what: str, timeout: float = START_TIMEOUT) -> Outcome:
    """Run ``body`` as a daemon (double fork, new session, no terminal); how its start went."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status: int = ExitCode.CRASHED
        try:
            os.close(read_end)
            os.setsid()
            if os.fork() != 0:
                os._exit(ExitCode.OK)
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
        monitor = _daemon(MONITOR, settings, foreground=True)
    except OSError as exc:
        report.fail(f"cannot write the log: {exc}")
        return ExitCode.FAILED

    def with_listener() -> bool:
        listener = monitor.fork_companion(LABELS[LISTENER], partial(run_daemon, LISTENER, settings, foreground=True))
        for warning in listener.warnings:
            report.warn(warning)
        if not listener.ok:
            report.fail(listener.text)
            monitor.stop_companions()
            monitor.close()
            return False
        report.ready(listener.text)
        return True

    return _live(monitor, report, with_listener)

"""The life of a long-lived jdls process (the monitor, the listener), written once.

In the shape of gunicorn's arbiter: ``start`` sets up (signals watched, the
pid file locked, then the role's own set-up) and reports ready or failed;
``run`` loops, sleeping in one ``select`` on the signal pipe and the role's own
descriptors, handling each signal that came by its ``handle_<name>`` method
and then doing the role's work; ``stop`` does the role's last work, stops its
companions within the stop timeout and lets go of everything.

Signal handlers only note a signal (``signals.SignalWatch``): the work is
done by the main loop, between two of its rounds, never in the middle of one.

systemd. The service's main process, in the foreground under a ``Type=notify``
unit, is given a ``sd_notify.Notifier`` (``notify``; every other daemon's is
inert): its loop sends WATCHDOG=1 after each round of work when due, and wakes
for it, so that a loop stuck in its work (the monitor's tidy, its deadlock
look) stops the watchdog; a STATUS= line of what the role does now every
STATUS_PERIOD; and STOPPING=1 when it begins to stop.

Children. A daemon reaps every child that ends with ``waitpid(-1, WNOHANG)``
on SIGCHLD. A companion (the listener forked by a foreground monitor) is
stopped with its daemon, and one that ends on its own is logged (a warning, but for one
that was told to stop, exit status 0: ``jdls -k`` stops the listener first); other
children (the listener's lock servers) are the role's to account for and
are left running when it stops. Every child is forked by ``fork``, which
drops the daemon's handlers, pid file and resources in the child before a
signal is let through, and never returns into the daemon's loop.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, NoReturn

from dls_shm import LABELS, AlreadyRunning, HeldPidFile

from . import log as daemon_log
from .exitcodes import ExitCode, killed_by
from .readiness import Outcome, PipeReport, Report, collect
from .sd_notify import Notifier
from .settings import START_TIMEOUT, Settings
from .signals import SignalWatch, block, unblock

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

#: How often a stop looks whether its companions have gone.
STOP_POLL = 0.01
#: How often the main process under systemd says what it does (STATUS=, seconds).
STATUS_PERIOD = 10.0


class StartFailed(Exception):
    """The role cannot start; the message says why (it is reported and logged)."""


def status_text(status: int) -> str:
    """How a child ended, from its ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


class Daemon:
    """A long-lived jdls process from start to exit: the part the monitor and the listener share.

    A role fills in ``setup`` (and what its loop watches, how long it may sleep,
    its work, its last work and what it lets go of); the base class owns the
    pid file, the signals, the children and the order of things.
    """

    #: The role (dls_shm.MONITOR or LISTENER): its pid file and its name in messages.
    role: ClassVar[str]
    SIGNALS: ClassVar[tuple[int, ...]] = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP)

    def __init__(self, settings: Settings, log: logging.Logger) -> None:
        self.settings = settings
        self.instance = settings.instance
        self.log = log
        self.pidfile: HeldPidFile | None = None
        self.signals: SignalWatch | None = None
        self.running = False
        self.status = ExitCode.OK
        #: Children stopped with this daemon: pid -> what it is.
        self.companions: dict[int, str] = {}
        #: What systemd is told (inert but in the service's main process under systemd: see start.py).
        self.notify = Notifier(log)
        self._next_status = 0.0

    # -- set-up ---------------------------------------------------------------------

    def start(self, report: Report) -> bool:
        """Watch the signals, take the pid file, set the role up, report; False (reported) when it cannot."""
        self.signals = SignalWatch(self.SIGNALS)
        try:
            self.pidfile = HeldPidFile.acquire(self.instance.pid_file(self.role))
        except AlreadyRunning as exc:
            who = f"at pid {exc.record.pid}" if exc.record else "(pid unknown)"
            return self._fail(report, f"{LABELS[self.role]} already running {who}")
        try:
            ready = self.setup(report)
        except StartFailed as exc:
            return self._fail(report, str(exc))
        report.ready(ready)
        return True

    def setup(self, report: Report) -> str:
        """The role's own set-up; what its ready report says. StartFailed when it cannot start."""
        raise NotImplementedError

    def _fail(self, report: Report, text: str) -> bool:
        self.log.error(text)
        self.notify.status(f"not started: {text}")
        report.fail(text)
        self.close()
        return False

    # -- the main loop ----------------------------------------------------------------

    def run(self) -> int:
        """Handle signals and do the role's work until told to stop; stop; the exit status."""
        assert self.signals is not None
        signals = self.signals
        self.running = True
        try:
            while self.running:
                readable = self.sleep()
                for signum in sorted(signals.take()):
                    if not self.running:
                        break  # what came with the stop signal is the stop's to deal with
                    self.handle(signum)
                if self.running:
                    self.work(readable)
                    self.tell_systemd()
        finally:
            self.stop()
        return self.status

    def sleep(self) -> list[FileDescriptorLike]:
        """Wait until a signal comes, a watched descriptor is readable or the role's timeout passes."""
        assert self.signals is not None
        timeout = self.timeout()
        if self.notify.active:  # wake for the watchdog and the status line too
            watchdog = self.notify.watchdog_due()
            status = max(0.0, self._next_status - time.monotonic())
            timeout = min(t for t in (timeout, watchdog, status) if t is not None)
        readable, _, _ = select.select([self.signals.fileno(), *self.watched()], [], [], timeout)
        return list(readable)

    def tell_systemd(self) -> None:
        """After a round of work: WATCHDOG=1 when due (the round came to an end), and now and then what the role
        does (STATUS=). Nothing unless this is the service's main process under systemd."""
        if not self.notify.active:
            return
        self.notify.keep_alive()
        now = time.monotonic()
        if now >= self._next_status:
            self._next_status = now + STATUS_PERIOD
            self.notify.status(self.status_line())

    def status_line(self) -> str:
        """What the role does now, in a line for systemctl status (the first one is sent with READY=1)."""
        return f"{self.role} running"

    def notify_ready(self) -> None:
        """READY=1: the service serves (for a monitor with its listener: once the listener accepts)."""
        self._next_status = time.monotonic() + STATUS_PERIOD
        self.notify.ready(f"ready: {self.status_line()}")

    def watched(self) -> list[FileDescriptorLike]:
        """The role's descriptors the loop wakes for (besides signals)."""
        return []

    def timeout(self) -> float | None:
        """The longest the loop may sleep before the role's work is due (None: until something happens)."""
        return None

    def work(self, readable: list[FileDescriptorLike]) -> None:
        """The role's work of one round, after the signals that came were handled."""

    def handle(self, signum: int) -> None:
        """Dispatch a signal to its ``handle_<name>`` method (SIGTERM: ``handle_term``)."""
        getattr(self, "handle_" + signal.Signals(signum).name[3:].lower())()

    def handle_term(self) -> None:
        self.halt("SIGTERM")

    def handle_int(self) -> None:
        self.halt("SIGINT")

    def handle_chld(self) -> None:
        self.reap()

    def handle_hup(self) -> None:
        """Reopen the log files (after logrotate, or anything that moved them), as most daemons do on SIGHUP.
        Moving them is noticed without it too (WatchedFileHandler); this is for a rotation that copies."""
        daemon_log.reopen()
        self.log.info("log reopened (SIGHUP)")

    def halt(self, signame: str) -> None:
        """Stop after this round, as asked by a signal."""
        self.log.info("%s stopping (%s)%s", self.role, signame, self.stopping_note())
        self.notify.stopping(f"stopping ({signame})")
        self.running = False

    def fail(self, why: object) -> None:
        """Stop after this round because the role cannot go on; the exit status says it failed."""
        self.log.error("%s stopping: %s", self.role, why)
        self.notify.stopping(f"stopping: {why}")
        self.status = ExitCode.FAILED
        self.running = False

    def stopping_note(self) -> str:
        """What the stopping message adds about the role."""
        return ""

    # -- children -------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every child that has ended."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            what = self.companions.pop(pid, None)
            if what is None:
                self.child_ended(pid, status)
            elif self.running and os.waitstatus_to_exitcode(status) == ExitCode.OK:
                # A role exits 0 only when a signal told it to stop: ``jdls -k`` stops the listener first (so
                # that no new lock server is forked), a moment before this daemon, and that is no warning.
                self.log.info("%s (pid %d) stopped when told to: %s", what, pid, status_text(status))
            elif self.running:
                self.log.warning("%s (pid %d) ended on its own: %s", what, pid, status_text(status))

    def child_ended(self, pid: int, status: int) -> None:
        """A child other than a companion has ended and was collected."""

    def fork(self, what: str, child: Callable[[], int]) -> int:
        """Fork a process that runs ``child`` and exits with its status; its pid.

        The daemon's signals stay blocked until the child has given them their
        default action back and dropped the daemon's pid file and resources
        (``forget_in_child``): a signal must never run the daemon's handlers there.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        daemon_log.flush()
        watched = self.signals.signals if self.signals is not None else ()
        block(watched)
        try:
            pid = os.fork()
        except OSError:
            unblock(watched)
            raise
        if pid == 0:
            self._child_life(what, watched, child)
        unblock(watched)
        return pid

    def _child_life(self, what: str, blocked: tuple[int, ...], child: Callable[[], int]) -> NoReturn:
        """The whole life of a forked child: it never returns into the daemon's loop."""
        # What the child inherits is shared with the parent until either writes to it: a collection of the oldest
        # generation would write to every object there, copying the whole heap into each lock server.
        gc.freeze()
        status: int = ExitCode.CRASHED
        try:
            self.forget_in_child()
            unblock(blocked)
            status = child()
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else ExitCode.CRASHED
        except KeyboardInterrupt:
            self.log.info("%s interrupted (SIGINT)", what)
            status = killed_by(signal.SIGINT)
        except BaseException as exc:
            self.log.exception("%s failed: %r", what, exc)
            status = ExitCode.CRASHED
        finally:
            daemon_log.flush()
            os._exit(status)

    def fork_companion(self, what: str, body: Callable[[Report], int], timeout: float = START_TIMEOUT) -> Outcome:
        """Fork ``body`` as a companion, a child stopped with this daemon, and wait for its start report."""
        read_end, write_end = os.pipe()

        def child() -> int:
            os.close(read_end)
            return body(PipeReport(write_end))

        try:
            pid = self.fork(what, child)
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        os.close(write_end)
        self.companions[pid] = what
        return collect(read_end, timeout, what)

    def stop_companions(self) -> None:
        """SIGTERM each companion, wait up to the stop timeout, then SIGKILL; every one is collected."""
        if not self.companions:
            return
        for pid in self.companions:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.settings.stop_timeout
        while self.companions and time.monotonic() < deadline:
            self.reap()
            if self.companions:
                time.sleep(STOP_POLL)
        for pid, what in self.companions.items():
            self.log.warning("%s (pid %d) did not stop within %g s: killing it", what, pid,
                             self.settings.stop_timeout)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.companions.clear()

    # -- the end ----------------------------------------------------------------------

    def stop(self) -> None:
        """Companions stopped, the role's last work done, everything let go of."""
        self.running = False
        try:
            self.stop_companions()
            self.last_work()
        finally:
            self.close()
        self.log.info("%s stopped", self.role)

    def last_work(self) -> None:
        """What the role does before it lets go (the monitor's last tidy, say)."""

    def close(self) -> None:
        """Let go of the role's resources, the pid file and the signals."""
        self.release()
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None
        if self.signals is not None:
            self.signals.close()
            self.signals = None

    def release(self) -> None:
        """Let go of the role's own resources."""

    def forget_in_child(self) -> None:
        """In a forked child: drop what belongs to the daemon's process, leaving its files and locks alone."""
        if self.signals is not None:
            self.signals.close(default_handlers=True)
            self.signals = None
        if self.pidfile is not None:
            self.pidfile.close_in_child()
            self.pidfile = None
        self.companions.clear()
        self.notify.close()  # only the main process talks to systemd
        self.forget_own_in_child()

    def forget_own_in_child(self) -> None:
        """The role's part of ``forget_in_child``."""

"""The lock monitor: owns the lock table's life and frees the locks of processes that died.

It creates the table (or attaches the one that is there: a table in use is
never resized under its users), keeps in the header what ``jdls -dvL`` shows of
it (its pid, the tidy period, "last ran" at most a second old, its own CPU
time; the table itself counts tidy-ups, their time and lock retries), and
every tidy period frees the locks whose owner is gone.
It tidies once more when it starts on an existing table and when it stops,
because locks orphaned while no monitor ran (for instance lock servers killed
by ``jdls -k``) would otherwise wait a whole period or outlive the service.

Stopping it (SIGTERM, SIGINT) leaves the table in place: local processes and
lock servers keep locking; only ``jdls -K`` removes it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

from dls_shm import AlreadyRunning, HeldPidFile, LockTable, TableError, TableFlag, TableMissing

from .report import Report
from .settings import Settings
from .signals import SignalWatch

#: The monitor updates the header at least this often (seconds).
TICK = 1.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def describe_table(table: LockTable) -> str:
    g = table.geometry
    return f"lock table 0x{table.key:08x} of {g.locks} locks in {g.ngroups} groups of {g.per_group}"


class Monitor:
    def __init__(self, settings: Settings, log: logging.Logger) -> None:
        self.settings = settings
        self.log = log
        self.table: LockTable | None = None
        self.pidfile: HeldPidFile | None = None
        self.signals: SignalWatch | None = None
        self._inherited_table: LockTable | None = None

    # -- start --------------------------------------------------------------------

    def start(self, report: Report) -> bool:
        """Take the pid file, create or attach the table, report; False (reported) when it cannot."""
        instance = self.settings.instance
        self.signals = SignalWatch((*STOP_SIGNALS, signal.SIGCHLD))
        try:
            self.pidfile = HeldPidFile.acquire(instance.pid_file("monitor"))
        except AlreadyRunning as exc:
            who = f"at pid {exc.record.pid}" if exc.record else "(pid unknown)"
            return self._fail(report, f"lock monitor already running {who}")
        try:
            table, created = LockTable.create(
                instance.key, self.settings.geometry, flags=self.settings.table_flags,
                tidy_period=self.settings.tidy_seconds,
            )
        except (TableError, ValueError) as exc:
            return self._fail(report, f"cannot create the lock table: {exc}")
        self.table = table
        if not created:
            for warning in self._ignored_settings(table):
                self.log.warning(warning)
                report.warn(warning)
            self._tidy("on start")
        table.set_header(monitor_pid=os.getpid(), tidy_period=self.settings.tidy_seconds)
        self._tick()
        how = "created" if created else "attached"
        self.log.info("monitor started: %s %s, tidy every %d s", how, describe_table(table), self.settings.tidy_seconds)
        report.ready(f"lock monitor started at pid {os.getpid()}: {how} {describe_table(table)}")
        return True

    def _fail(self, report: Report, text: str) -> bool:
        self.log.error(text)
        report.fail(text)
        self.close()
        return False

    def _ignored_settings(self, table: LockTable) -> list[str]:
        """What was asked for but cannot apply to a table that already exists."""
        out = []
        wanted = self.settings.geometry
        if self.settings.size is not None and wanted != table.geometry:
            g = table.geometry
            out.append(
                f"the lock table exists with {g.locks} locks in {g.ngroups} groups of {g.per_group}: "
                f"the requested size ({wanted.locks} locks in {wanted.ngroups} groups of {wanted.per_group}) "
                "is ignored (remove the table with jdls -K to resize it)"
            )
        flags = table.header().flags
        for flag, option in ((TableFlag.PORT_OWNERS, "-P"), (TableFlag.TIMESTAMPS, "-T")):
            if bool(self.settings.table_flags & flag) != bool(flags & flag):
                state = "with" if flags & flag else "without"
                out.append(f"the lock table exists {state} {option}: {option} as given now is ignored")
        return out

    # -- run ----------------------------------------------------------------------

    def run(self, *, on_child: Callable[[], None] | None = None, before_stop: Callable[[], None] | None = None) -> int:
        """Tick and tidy until told to stop; the exit status.

        ``on_child`` is called on SIGCHLD and ``before_stop`` before the table is
        let go of: the foreground service uses them for its listener child.
        """
        assert self.table is not None and self.signals is not None
        period = self.settings.tidy_seconds
        now = time.monotonic()
        next_tick = now + min(period, TICK)
        next_tidy = now + period
        status = 0
        try:
            while True:
                signals = self.signals.wait(max(0.0, next_tick - time.monotonic()))
                if signals & set(STOP_SIGNALS):
                    names = ", ".join(signal.Signals(s).name for s in sorted(signals & set(STOP_SIGNALS)))
                    self.log.info("monitor stopping (%s)", names)
                    break
                if signal.SIGCHLD in signals and on_child is not None:
                    on_child()
                now = time.monotonic()
                if now >= next_tick:
                    self._tick()
                    next_tick = now + min(period, TICK)
                if now >= next_tidy:
                    self._tidy("periodic")
                    next_tidy = now + period
        except TableMissing as exc:
            self.log.error("monitor stopping: %s", exc)
            status = 1
        finally:
            if before_stop is not None:
                before_stop()
            self._stop()
        return status

    def _tick(self) -> None:
        """What -dvL shows of the monitor itself: when it last ran, and the CPU it has used."""
        assert self.table is not None
        cpu = os.times()
        self.table.set_header(last_ran=time.time(), cpu_user=cpu.user, cpu_system=cpu.system)

    def _tidy(self, why: str) -> None:
        assert self.table is not None
        started = time.monotonic()
        freed = self.table.tidy()
        took = time.monotonic() - started
        if freed:
            self.log.info("tidy (%s): freed %d orphaned lock(s) in %.3f s", why, freed, took)
        else:
            self.log.debug("tidy (%s): nothing to free (%.3f s)", why, took)

    def _stop(self) -> None:
        table = self.table
        if table is not None:
            try:
                self._tidy("on stop")
                if table.header().monitor_pid == os.getpid():
                    table.set_header(monitor_pid=0)
            except TableError as exc:
                self.log.warning("monitor stopping: %s", exc)
        self.close()
        self.log.info("monitor stopped")

    def close(self) -> None:
        """Let go of table, pid file and signals (the table itself stays)."""
        if self.table is not None:
            self.table.close()
            self.table = None
        if self.pidfile is not None:
            self.pidfile.release()
            self.pidfile = None
        if self.signals is not None:
            self.signals.close()
            self.signals = None

    def forget_in_child(self) -> None:
        """In a child forked from the monitor: drop what belongs to the monitor process only."""
        if self.signals is not None:
            self.signals.close(default_handlers=True)
            self.signals = None
        if self.pidfile is not None:
            self.pidfile.close_in_child()
            self.pidfile = None
        # The inherited mapping is harmless and the header is the parent's: keep it, untouched.
        self._inherited_table, self.table = self.table, None

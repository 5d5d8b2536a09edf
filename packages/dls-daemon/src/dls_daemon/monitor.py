"""The lock monitor: owns the lock table's life and frees the locks of processes that died.

It creates the table, or attaches the one that is there: a table in use is
never resized under its users, and settings that cannot apply to it are said
(warned) rather than silently dropped. It keeps in the header what ``jdls
-dvL`` shows of it (its pid, the tidy period, "last ran" at most a second old,
its CPU time) and the lock-delay (``--lock-delay``, which does apply to a
table that exists: it is rewritten, and the log says so), and every tidy
period frees the locks whose owner is gone and removes the proc/info documents
of lock servers that were killed (``client_info.remove_orphans``; the listener
does so too when it reaps one, but a lock server of an earlier listener, or one
killed with its listener, is not its child).

A lock server's locks are kept rather than freed when it dies (the table's
``tidy`` makes them KEPT), for their client to reclaim within the lock-delay;
the monitor tidies again when the header says the first kept lock is due
(``next_expiry``, looked at every tick), so that what is not reclaimed is freed
about when its delay ends, not a whole period later.

It tidies once more when it starts on an existing table and when it stops:
locks orphaned while no monitor ran (lock servers killed while the service was
down, say) would otherwise wait a whole period, or outlive the service. Neither
tidy frees a kept lock before its delay: a service restarted on its table
(``jdls -k``, then ``jdls -ib``) keeps every client's locks for it to reclaim.
Stopping leaves the table in place, so that local processes and lock servers
keep locking.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from dls_shm import (
    DEFAULT_BLOCK_SIZE,
    MONITOR,
    LockTable,
    SlotState,
    TableError,
    TableFlag,
    TableMissing,
    modes,
    trusted,
)

from . import client_info, status_page
from .lifecycle import Daemon, StartFailed
from .listener import listen_socket
from .metrics import Metrics, Receiver, Totals
from .one_mechanism import claim
from .readiness import Report
from .settings import Settings
from .web import WebServer, shown

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike

#: The monitor updates the header at least this often (seconds).
TICK = 1.0
#: How often the monitor looks for deadlocks (seconds): a cycle of waiters is broken within about this long
#: of forming (the issue asks for a second). A look copies only the groups that have a waiting request.
DEADLOCK_PERIOD = 0.25


def cannot_serve(address: tuple[str, int], exc: OSError) -> str:
    """How a failure to listen on the --http address is told."""
    return f"cannot serve HTTP on {shown(*address)} (--http): {exc.strerror or exc}"


def http_problem(address: tuple[str, int]) -> str | None:
    """Why the monitor could not serve HTTP on ``address`` right now (checked before anything starts, as the
    lock port is), or None if it could."""
    try:
        listen_socket(*address).close()
    except OSError as exc:
        return cannot_serve(address, exc)
    return None


def describe_table(table: LockTable) -> str:
    g = table.geometry
    return f"lock table 0x{table.key:08x} of {g.locks} locks in {g.ngroups} groups of {g.per_group}"


class Monitor(Daemon):
    """The process that creates (or attaches) the instance's lock table, keeps its header current and
    tidies the locks of dead owners; in the foreground with both roles, the listener's parent."""

    role = MONITOR

    def __init__(self, settings: Settings, log: logging.Logger) -> None:
        super().__init__(settings, log)
        self.table: LockTable | None = None
        self._next_tick = 0.0
        self._next_tidy = 0.0
        self._next_deadlock_look = 0.0
        #: The listener's port, when this monitor started it (the foreground service): what systemd is told.
        self.port: int | None = None
        #: The HTTP server of --http (bound in setup, served from ``run``); None without --http.
        self.web: WebServer | None = None
        #: The figures /metrics adds up (the lock servers' and the monitor's own), and where the lock servers'
        #: come in (with --http only).
        self.totals = Totals()
        self.receiver: Receiver | None = None
        #: The last hour of the table, for the status page (``/api/history``), sampled in this loop; None
        #: without --http (nobody would read it).
        self.history: status_page.History | None = None

    def setup(self, report: Report) -> str:
        """Bind the HTTP port (--http) first, then create or attach the table, and say so."""
        if self.settings.http is not None:
            try:
                self.web = WebServer(self.settings.http, self.settings.admin_allow, self.log)
            except OSError as exc:
                raise StartFailed(cannot_serve(self.settings.http, exc)) from None
        try:
            table, created = LockTable.create(
                self.instance.key, self.settings.geometry, flags=self.settings.table_flags,
                tidy_period=self.settings.tidy_seconds, lock_delay=self.settings.lock_delay, gid=self.settings.gid,
                owners=trusted.trusted_owners(),
                block_size=self.settings.block_size or DEFAULT_BLOCK_SIZE,
            )
        except (TableError, ValueError) as exc:
            raise StartFailed(f"cannot create the lock table: {exc}") from None
        claim(self.settings, table, created)  # one mechanism per instance: refused (table removed) beside OS locks
        self.table = table
        if self.web is not None:
            try:
                self.receiver = Receiver(self.instance, self.totals, self.log)
            except OSError as exc:
                raise StartFailed(f"cannot make the metrics socket in {self.instance.run_dir}: {exc}") from None
            self.web.add("/metrics", Metrics(self.instance, table, self.totals).handler)
            self.history = status_page.History()
            status_page.add_routes(self.web, lambda: self.table, self.instance, self.history)
        if not created:
            try:
                if table.set_access(self.settings.gid):
                    self.log.info("lock table 0x%08x: now mode 0660 in group %d", self.instance.key, self.settings.gid)
            except TableError as exc:
                self.log.warning("%s", exc)
                report.warn(str(exc))
            for warning in self._ignored_settings(table):
                self.log.warning(warning)
                report.warn(warning)
            self._write_lock_delay(table)  # before the tidy, which applies it
            self._tidy("on start")
        table.set_header(monitor_pid=os.getpid(), tidy_period=self.settings.tidy_seconds)
        self._tick()
        period = self.settings.tidy_seconds
        now = time.monotonic()
        self._next_tick = now + min(period, TICK)
        self._next_tidy = now + period
        how = "created" if created else "attached"
        self.log.info("monitor started: %s %s, tidy every %d s, lock-delay %g s", how, describe_table(table), period,
                      table.lock_delay)
        serving = ""
        if self.web is not None:
            serving = f", HTTP on {shown(*self.web.address)}"
            self.log.info("serving HTTP (/metrics, the status page) on %s to --admin-allow %s",
                          shown(*self.web.address), ", ".join(map(str, self.settings.admin_allow)))
        return f"lock monitor started at pid {os.getpid()}: {how} {describe_table(table)}{serving}"

    def run(self) -> int:
        """The HTTP server's thread starts here, once the monitor has forked its companion (a fork copies no
        thread in the middle of a request), then the loop."""
        if self.web is not None:
            self.web.start()
        return super().run()

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
        wanted_block = self.settings.block_size
        if wanted_block is not None and wanted_block != table.block_size:
            out.append(f"the lock table exists with value blocks of {table.block_size} bytes: --value-block-size "
                       f"{wanted_block} is ignored (remove the table with jdls -K to change it)")
        flags = table.header().flags
        # Only an option given now can be ignored: a table made with -P or -T simply keeps it (the log and
        # jdls -dv say so), as it keeps its size when -s is not given.
        for flag, option in ((TableFlag.PORT_OWNERS, "-P"), (TableFlag.TIMESTAMPS, "-T")):
            if self.settings.table_flags & flag and not flags & flag:
                out.append(f"the lock table exists without {option}: {option} is ignored (remove the table with "
                           f"jdls -K to make it with {option})")
        return out

    def _write_lock_delay(self, table: LockTable) -> None:
        """The lock-delay asked for now replaces the existing table's (a setting of the service, not of the
        table's shape): the log says what it was."""
        was, wanted = table.lock_delay, self.settings.lock_delay
        table.set_header(lock_delay=wanted)
        if was != wanted:
            self.log.info("lock-delay of the existing table changed from %g s to %g s", was, wanted)
        else:
            self.log.info("lock-delay of the existing table rewritten: %g s, as it was", wanted)

    # -- the loop's work ----------------------------------------------------------------

    def watched(self) -> list[FileDescriptorLike]:
        return [self.receiver] if self.receiver is not None else []

    def timeout(self) -> float:
        sample = self.history.next_due if self.history is not None else self._next_tick
        return max(0.0, min(self._next_tick, self._next_deadlock_look, sample) - time.monotonic())

    def work(self, readable: list[FileDescriptorLike]) -> None:
        """Tick and tidy when due; a table removed under the monitor (jdls -K -o) stops it."""
        now = time.monotonic()
        period = self.settings.tidy_seconds
        if self.receiver is not None and self.receiver in readable:
            self.receiver.drain()
        try:
            if now >= self._next_tick:
                self._tick()
                self._next_tick = now + min(period, TICK)
                if self._kept_lock_due():
                    self._tidy("a kept lock is due")
            if now >= self._next_tidy:
                self._tidy("periodic")
                self._next_tidy = now + period
            if now >= self._next_deadlock_look:
                self._break_deadlocks()
                self._next_deadlock_look = time.monotonic() + DEADLOCK_PERIOD
            if self.history is not None and self.history.due(now):
                assert self.table is not None
                with self.totals.lock:
                    waits = list(self.totals.wait)
                self.history.sample(self.table, waits)
        except TableMissing as exc:
            self.fail(exc)

    def _tick(self) -> None:
        """What -dvL shows of the monitor itself: when it last ran, and the CPU it has used."""
        assert self.table is not None
        cpu = os.times()
        self.table.set_header(last_ran=time.time(), cpu_user=cpu.user, cpu_system=cpu.system)

    def _kept_lock_due(self) -> bool:
        """The header says a kept lock's delay has ended (it may have been reclaimed meanwhile)."""
        assert self.table is not None
        due = self.table.header().next_expiry
        return bool(due) and due <= time.time()

    def _break_deadlocks(self) -> None:
        """Refuse one request of each cycle of waiters (the one that closed it: see dls_shm.deadlocks), and
        say whose."""
        assert self.table is not None
        for entry in self.table.break_deadlocks():
            with self.totals.lock:
                self.totals.deadlocks += 1
            slot = entry.slot
            who = f"port {slot.port}" if self.table.port_owners else f"pid {slot.pid}"
            self.log.info("deadlock: refused the %s request of %s thread %d for key %r (inode %d): it closed a "
                          "cycle of waiters", modes.NAMES[slot.mode], who, slot.thread,
                          slot.key[: slot.key_len].decode("utf-8", "replace"), slot.inode)

    def _tidy(self, why: str) -> None:
        assert self.table is not None
        started = time.monotonic()
        done = self.table.tidy()
        took = time.monotonic() - started
        with self.totals.lock:
            self.totals.tidies += 1
            self.totals.tidy_freed += done.freed
            self.totals.tidy_kept += done.kept
        if done.kept:
            self.log.info("tidy (%s): kept %d lock(s) of dead lock servers for their clients to reclaim "
                          "(lock-delay %g s)", why, done.kept, self.table.lock_delay)
        if done.freed:
            self.log.info("tidy (%s): freed %d orphaned lock(s) in %.3f s", why, done.freed, took)
        elif not done.kept:
            self.log.debug("tidy (%s): nothing to free (%.3f s)", why, took)
        client_info.remove_orphans(self.instance, self.log, f"tidy ({why})")

    def status_line(self) -> str:
        """For systemctl status: the locks held and waited for, the lock servers, the port and the table. Reads
        the table a batch of groups at a time (``scan``), every STATUS_PERIOD only."""
        if self.table is None:
            return "monitor without a table"
        held = waiting = 0
        try:
            for entry in self.table.scan():
                if entry.slot.state == SlotState.WAITING:
                    waiting += 1
                elif entry.slot.state in (SlotState.GRANTED, SlotState.KEPT):
                    held += 1
        except TableError as exc:  # removed under the monitor: its loop stops on it
            return f"lock table unreadable: {exc}"
        try:
            servers = sum(1 for _ in self.instance.servers_dir.glob("*.pid"))
        except OSError:
            servers = 0
        port = f"port {self.port}, " if self.port is not None else ""
        return (f"{held} lock(s) held, {waiting} waiting, {servers} lock server(s); {port}"
                f"{describe_table(self.table)}")

    # -- the end ------------------------------------------------------------------------

    def last_work(self) -> None:
        """A last tidy, and the header no longer names this monitor."""
        table = self.table
        if table is None:
            return
        try:
            self._tidy("on stop")
            if table.header().monitor_pid == os.getpid():
                table.set_header(monitor_pid=0)
        except TableError as exc:
            self.log.warning("monitor stopping: %s", exc)

    def release(self) -> None:
        """Stop serving HTTP; detach from the table (the table itself stays)."""
        if self.web is not None:
            self.web.close()
            self.web = None
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        if self.table is not None:
            self.table.close()
            self.table = None

    def forget_own_in_child(self) -> None:
        """A child (the foreground listener) does not use the monitor's mapping, and must not write the
        header as the monitor: detach it. Detaching touches nothing the monitor sees, and the table's
        attach count (what jdls -K checks) then counts the child once, for its own attach. The HTTP port and the
        metrics socket are closed, not removed: they stay the monitor's."""
        if self.receiver is not None:
            self.receiver.sock.close()
            self.receiver = None
        if self.web is not None:
            self.web.server.server_close()
            self.web = None
        self.release()

"""Stopping the service (``jdls -k``, ``-kA``, ``-kD``) and removing its table (``jdls -K``).

Processes are found through their pid files and each is checked to be the
very process that wrote the file (pid and start time), so a pid reused by
another program is never signalled. A process gets SIGTERM, then SIGKILL if it
is still there after the stop timeout; what is being waited for is printed.

``-k`` stops the listener first (so no new lock server is forked), then the
lock servers, then the monitor, whose last tidy frees the locks of lock
servers that had to be killed. ``-kD`` and ``-kA`` stop only their one
process: lock servers keep serving their clients.

``-K`` refuses while anything could still be using the table, because
removing a SysV segment in use only hides it: its users would go on locking in
a table that new processes can no longer see. It names what holds it; ``-K -o``
(override, a choice of dls: the jDLS guide lists ``-o`` without saying what
it does) removes the table all the same, after naming them, once the monitor
and the listener are stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dls_shm import Instance, LockTable, TableError, TableMissing

from . import pidfile
from .pidfile import PidRecord
from .roles import LABELS, LISTENER, MONITOR, ROLES

POLL = 0.02
#: Linux's list of SysV shared memory segments, with their attach counts.
SHM_LIST = Path("/proc/sysvipc/shm")
PROC = Path("/proc")


@dataclass(frozen=True)
class Target:
    label: str
    record: PidRecord
    path: Path

    def __str__(self) -> str:
        return f"{self.label} (pid {self.record.pid})"


def running_role(instance: Instance, role: str) -> Target | None:
    path = instance.pid_file(role)
    record = pidfile.running(path)
    return Target(LABELS[role], record, path) if record is not None else None


def running_servers(instance: Instance) -> list[Target]:
    """The live lock servers listed in run/servers; stale files are removed."""
    found = []
    for path in sorted(pidfile.servers_dir(instance).glob("*.pid")):
        record = pidfile.read(path)
        if record is not None and record.alive() and path.name == f"{record.pid}.pid":
            found.append(Target("lock server", record, path))
        elif record is None or not record.alive():
            pidfile.remove(path)
    return found


def stop_roles(
    instance: Instance, roles: tuple[str, ...], *, servers: bool, timeout: float, out: TextIO | None = None,
) -> int:
    """Stop the listener, then (with ``servers``) the lock servers, then the monitor; the exit status."""
    out = out or sys.stdout
    status = 0
    if LISTENER in roles:
        status |= _stop_role(instance, LISTENER, timeout, out)
    if servers:
        targets = running_servers(instance)
        if targets:
            status |= terminate(targets, timeout, out)
    if MONITOR in roles:
        status |= _stop_role(instance, MONITOR, timeout, out)
    return status


def _stop_role(instance: Instance, role: str, timeout: float, out: TextIO) -> int:
    target = running_role(instance, role)
    if target is None:
        print(f"jdls: {LABELS[role]} is not running", file=out)
        return 0
    return terminate([target], timeout, out)


def terminate(targets: list[Target], timeout: float, out: TextIO) -> int:
    """SIGTERM each target, wait up to ``timeout`` seconds, SIGKILL the rest; 1 if one could not be stopped."""
    status = 0
    waiting: list[Target] = []
    for target in targets:
        try:
            os.kill(target.record.pid, signal.SIGTERM)
            waiting.append(target)
        except ProcessLookupError:
            pass
        except PermissionError:
            print(f"jdls: not allowed to stop {target}", file=sys.stderr)
            status = 1
    if not waiting:
        return status
    print(f"jdls: waiting up to {timeout:g} s for {_names(waiting)} to stop", file=out, flush=True)
    left = _wait_gone(waiting, timeout)
    if left:
        print(f"jdls: {_names(left)} did not stop within {timeout:g} s: killing", file=out, flush=True)
        for target in left:
            try:
                os.kill(target.record.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        left = _wait_gone(left, timeout)
        for target in left:
            print(f"jdls: {target} is still there after SIGKILL", file=sys.stderr)
            status = 1
    for target in waiting:
        if target not in left:
            _forget(target)
    stopped = [t for t in waiting if t not in left]
    if stopped:
        print(f"jdls: stopped {_names(stopped)}", file=out, flush=True)
    return status


def _names(targets: list[Target]) -> str:
    if len(targets) == 1:
        return str(targets[0])
    labels = sorted({t.label for t in targets})
    pids = ", ".join(str(t.record.pid) for t in targets)
    label = labels[0] + "s" if len(labels) == 1 else " and ".join(labels) + " processes"
    return f"{len(targets)} {label} (pids {pids})"


def _wait_gone(targets: list[Target], timeout: float) -> list[Target]:
    deadline = time.monotonic() + timeout
    left = [t for t in targets if t.record.alive()]
    while left and time.monotonic() < deadline:
        time.sleep(POLL)
        left = [t for t in left if t.record.alive()]
    return left


def _forget(target: Target) -> None:
    """Remove a stopped process's pid file if it is still its own (a killed process leaves it behind)."""
    if pidfile.read(target.path) == target.record:
        pidfile.remove(target.path)


def attachments(shm_id: int) -> int | None:
    """How many processes have a shared memory segment attached; None where the system does not say."""
    try:
        lines = SHM_LIST.read_text().splitlines()
        names = lines[0].split()
        id_col, count_col = names.index("shmid"), names.index("nattch")
        for line in lines[1:]:
            fields = line.split()
            if int(fields[id_col]) == shm_id:
                return int(fields[count_col])
    except (OSError, IndexError, ValueError):
        pass
    return None


def attached_processes(shm_id: int) -> list[str]:
    """The processes (other than this one) that have the segment mapped, as "pid (name)": Linux names
    SysV mappings ``/SYSV<key>`` in /proc/<pid>/maps, with the segment id in the inode column. Processes
    of other users whose maps cannot be read are not found."""
    found = []
    me = os.getpid()
    for proc in PROC.iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            with open(proc / "maps", encoding="ascii", errors="replace") as maps:
                hit = any(
                    len(fields) >= 6 and fields[5].startswith("/SYSV") and fields[4] == str(shm_id)
                    for fields in (line.split() for line in maps)
                )
            if hit:
                found.append(f"{proc.name} ({_process_name(proc)})")
        except OSError:
            continue
    return found


def _process_name(proc: Path) -> str:
    try:
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip()
        return cmdline.decode(errors="replace")[:60] or (proc / "comm").read_text().strip()
    except OSError:
        return "?"


def remove_ipc(
    instance: Instance, *, override: bool = False, out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """``jdls -K``: remove the table's shared memory and semaphore; the exit status.

    It refuses while the monitor or the listener runs (stop them first: a
    monitor would go on tending a table nobody else sees), and while lock
    servers run or other processes have the table attached, naming them.
    ``override`` (``-K -o``) names those and removes the table anyway: for an
    operator clearing up after a crash, when they are known to be stuck or about
    to go. They keep their mapping but get errors on their next lock, and new
    processes see no table.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    key = instance.key
    for role in ROLES:
        target = running_role(instance, role)
        if target is not None:
            print(f"jdls: cannot remove the lock table while the {target} runs: stop it first (jdls -k)",
                  file=err)
            return 1
    users: list[str] = []
    servers = running_servers(instance)
    if servers:
        users.append(f"{_names(servers)} run")
        if not override:
            print(f"jdls: cannot remove the lock table while {_names(servers)} run: stop them first (jdls -k), "
                  "or remove it anyway with jdls -K -o", file=err)
            return 1
    try:
        table = LockTable.attach(key)
    except TableMissing:
        print(f"jdls: no lock table with key 0x{key:08x}: nothing to remove", file=out)
        return 0
    except TableError as exc:
        print(f"jdls: cannot remove the lock table: {exc}", file=err)
        return 1
    others = (attachments(table.shm_id) or 1) - 1
    if others > 0:
        named = attached_processes(table.shm_id)
        which = f": {', '.join(named)}" if named else ""
        if not override:
            table.close()
            print(f"jdls: cannot remove the lock table 0x{key:08x}: {others} other process(es) still attached"
                  f"{which} (jdls -K -o removes it anyway)", file=err)
            return 1
        users.append(f"{others} other process(es) have it attached{which}")
    if users:
        print(f"jdls: warning: removing the lock table 0x{key:08x} although {'; '.join(users)}: "
              "they get errors on their next lock", file=err)
    shm_id, sem_ids = table.shm_id, table.semaphore_ids
    table.remove()
    sems = ", ".join(str(s) for s in sem_ids)
    print(f"jdls: removed lock table 0x{key:08x} (shared memory id {shm_id}, semaphore id {sems})", file=out)
    return 0

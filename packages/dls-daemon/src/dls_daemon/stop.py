"""Stopping the service (``jdls -k``, ``-kA``, ``-kD``) and removing its table (``jdls -K``).

Processes are found through their pid files, each checked to be the very
process that wrote its file (pid and start time), so a pid reused by another
program is never signalled. A process gets SIGTERM, then SIGKILL if it is
still there after the stop timeout; what is being waited for is printed, since
a stop can take that long.

``-k`` stops the listener first (so no new lock server is forked), then the
lock servers, then the monitor, whose last tidy frees the locks of lock
servers that had to be killed.

``-K`` refuses while anything could still be using the table, because removing
a SysV segment in use only hides it: its users would go on locking in a table
that new processes can no longer see. What uses it is dls_shm's
``Occupancy``, the facts dls-ipcrm judges by too; this module only words
jdls's answers. jdls owns the instance, so it looks with ``tidy``: stale pid
files go on the way.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from dls_shm import (
    LABELS,
    LISTENER,
    MONITOR,
    HalfTable,
    Instance,
    LockTable,
    Occupancy,
    Occupant,
    Refusal,
    TableError,
    TableMissing,
    command_line,
    pidfiles,
    running_role,
    running_servers,
)

from .exitcodes import ExitCode

POLL = 0.02
#: What the system may take to end one SIGKILLed process on a busy host (its memory torn down), on top of the
#: stop timeout: thousands of lock servers killed at once take seconds to go, which is not a failure to stop.
KILL_TEARDOWN = 0.002


def stop_roles(
    instance: Instance, roles: tuple[str, ...], *, servers: bool, timeout: float, out: TextIO | None = None,
) -> int:
    """Stop the listener, then (with ``servers``) the lock servers, then the monitor; the exit status."""
    out = out or sys.stdout
    status: int = ExitCode.OK
    _tell_impostors(instance, roles, servers, out)
    if LISTENER in roles:
        status |= _stop_role(instance, LISTENER, timeout, out)
    if servers:
        targets = running_servers(instance, tidy=True)
        if targets:
            status |= terminate(targets, timeout, out)
    if MONITOR in roles:
        status |= _stop_role(instance, MONITOR, timeout, out)
    return status


def _tell_impostors(instance: Instance, roles: tuple[str, ...], servers: bool, out: TextIO) -> None:
    """Say which pid files name a live process other than the one that wrote them: that process is not
    signalled (the file is stale, and is removed as such on the way)."""
    paths = [instance.pid_file(role) for role in roles]
    if servers:
        try:
            paths += sorted(instance.servers_dir.glob("*.pid"))
        except OSError:
            pass
    for path in paths:
        record = pidfiles.read_or_none(path)
        why = None if record is None else record.impostor()
        if why is not None:
            print(f"jdls: {path}: {why}: not signalled", file=out)


def _stop_role(instance: Instance, role: str, timeout: float, out: TextIO) -> int:
    target = running_role(instance, role, tidy=True)
    if target is None:
        print(f"jdls: {LABELS[role]} is not running", file=out)
        return ExitCode.OK
    return terminate([target], timeout, out)


def terminate(targets: list[Occupant], timeout: float, out: TextIO) -> int:
    """SIGTERM each target, wait up to ``timeout`` seconds, SIGKILL the rest; 1 if one could not be stopped."""
    status: int = ExitCode.OK
    waiting: list[Occupant] = []
    for target in targets:
        try:
            os.kill(target.pid, signal.SIGTERM)
            waiting.append(target)
        except ProcessLookupError:
            pass
        except PermissionError:
            print(f"jdls: not allowed to stop {target}", file=sys.stderr)
            status = ExitCode.FAILED
    if not waiting:
        return status
    print(f"jdls: waiting up to {timeout:g} s for {_names(waiting)} to stop", file=out, flush=True)
    left = _wait_gone(waiting, timeout)
    if left:
        print(f"jdls: {_names(left)} did not stop within {timeout:g} s: killing", file=out, flush=True)
        for target in left:
            try:
                os.kill(target.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        teardown = timeout + KILL_TEARDOWN * len(left)
        if len(left) > 1:
            print(f"jdls: waiting up to {teardown:g} s for the system to end {len(left)} killed processes", file=out,
                  flush=True)
        left = _wait_gone(left, teardown)
        for target in left:
            print(f"jdls: {target} is still there after SIGKILL", file=sys.stderr)
            status = ExitCode.FAILED
    for target in waiting:
        if target not in left:
            _forget(target)
    stopped = [t for t in waiting if t not in left]
    if stopped:
        print(f"jdls: stopped {_names(stopped)}", file=out, flush=True)
    return status


def _names(targets: Sequence[Occupant]) -> str:
    if len(targets) == 1:
        return str(targets[0])
    labels = sorted({t.label for t in targets})
    pids = ", ".join(str(t.pid) for t in targets)
    label = labels[0] + "s" if len(labels) == 1 else " and ".join(labels) + " processes"
    return f"{len(targets)} {label} (pids {pids})"


def _wait_gone(targets: list[Occupant], timeout: float) -> list[Occupant]:
    deadline = time.monotonic() + timeout
    left = [t for t in targets if t.alive()]
    while left and time.monotonic() < deadline:
        time.sleep(POLL)
        left = [t for t in left if t.alive()]
    return left


def _forget(target: Occupant) -> None:
    """Remove a stopped process's pid file if it is still its own (a killed process leaves it behind)."""
    if target.record is not None and pidfiles.read(target.path) == target.record:
        pidfiles.remove(target.path)


def remove_ipc(
    instance: Instance, *, override: bool = False, out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """``jdls -K``: remove the table's shared memory and semaphore; the exit status.

    Whether it may is dls-shm's ``Occupancy.refusal`` (shared with dls-ipcrm),
    said here in jdls's words: never while the monitor or the listener runs (a
    monitor would go on tending a table nobody else sees), nor while lock
    servers run or other processes have the table attached unless ``override``
    (``-K -o``), which names them and removes the table anyway: they keep their
    mapping but get errors on their next lock.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    key = instance.key
    found = Occupancy.survey(instance, tidy=True)
    refusal = found.refusal(force=override)
    if refusal is Refusal.NOTHING:
        print(f"jdls: no lock table with key 0x{key:08x}: nothing to remove", file=out)
        return ExitCode.OK
    if refusal is not None:
        print(f"jdls: cannot remove the lock table 0x{key:08x}: {_refused(found, refusal)}", file=err)
        return ExitCode.FAILED
    users = _users(found)
    if users:
        print(f"jdls: warning: removing the lock table 0x{key:08x} although {'; '.join(users)}: "
              "they get errors on their next lock", file=err)
    try:
        shm_id, sem_id = LockTable.remove_key(key)  # whatever its layout: one left by an older dls too
    except TableMissing:
        print(f"jdls: no lock table with key 0x{key:08x}: nothing to remove", file=out)
        return ExitCode.OK
    except TableError as exc:
        print(f"jdls: cannot remove the lock table: {exc}", file=err)
        return ExitCode.FAILED
    print(f"jdls: removed lock table 0x{key:08x} (shared memory id {shm_id}, semaphore id {sem_id})", file=out)
    return ExitCode.OK


def _refused(found: Occupancy, refusal: Refusal) -> str:
    """Why, in jdls's words."""
    if refusal is Refusal.LONE:
        lone = found.lone
        assert lone is not None
        return str(HalfTable(found.key, lone.kind, lone.id))  # as jdls -i says it
    if refusal is Refusal.SERVICE:
        return f"the {found.roles[0]} runs: stop it first (jdls -k)"
    if refusal is Refusal.FORBIDDEN:
        owner = found.forbidden
        assert owner is not None
        return (f"it belongs to user {owner.owner} (uid {owner.uid}, mode {owner.mode & 0o777:04o}): run jdls -K as "
                "that user or as root")
    if found.servers:
        return f"{_names(list(found.servers))} run: stop them first (jdls -k), or remove it anyway with jdls -K -o"
    return f"{_users(found)[-1]} (jdls -K -o removes it anyway)"


def _users(found: Occupancy) -> list[str]:
    """What removing the table goes past: the lock servers that run, the processes that have it attached."""
    users = []
    if found.servers:
        users.append(f"{_names(list(found.servers))} run")
    if found.others > 0:
        named = ", ".join(f"{pid} ({command_line(pid)})" for pid in found.attached)
        users.append(f"{found.others} other process(es) still attached" + (f": {named}" if named else ""))
    return users

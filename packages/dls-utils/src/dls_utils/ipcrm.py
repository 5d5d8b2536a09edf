"""``dls-ipcrm``: remove an instance's lock table as ``jdls -K`` does, where dls-daemon is not installed.

It judges by the same facts as ``jdls -K`` (dls_shm's ``Occupancy``: the
running monitor, listener and lock servers, the attached processes, who may
remove the IPC objects) and differs from it on purpose:

- it only reads the instance: a stale pid file is left where it is, and a pid
  file's lock is tested, never taken, so a service starting at that moment is
  not disturbed (``tidy=False``);
- a table named by ``--key`` may be another instance's, whose pid files are
  unknown here: its monitor and listener are judged by the header's pids
  among the processes that have it attached;
- it checks what it can before attaching (a lone IPC object, another user's
  table) and answers each refusal with its own exit status, for scripts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

from dls_shm import (
    LABELS,
    LISTENER,
    MONITOR,
    HalfTable,
    Instance,
    LockTable,
    Occupancy,
    Refusal,
    TableError,
    TableMissing,
    command_line,
)

from . import command
from .table_choice import TABLE_HELP, add_key_option, chosen_table

PROG = "dls-ipcrm"

#: Exit statuses (documented in the epilog and the README).
REMOVED = command.OK
FAILED = command.FAILED
USAGE = command.USAGE
IN_USE = 3
SERVICE_RUNS = 4
NOT_PERMITTED = 5
CONFIG = command.CONFIG

EPILOG = f"""\
{TABLE_HELP}

Refuses while other processes have the table attached or lock servers of the
instance run, naming them (pid and command); --force removes the table anyway
and names the processes it forced past: they keep their mapping but get errors
on their next lock. Even with --force, refuses while the instance's lock monitor
or lock listener runs: stop the service first (jdls -k). This is what jdls -K
and jdls -K -o do.

exit status:
  {REMOVED}  removed, or nothing to remove (no table with that key: said on stdout)
  {FAILED}  failed: not a dls lock table, only one of its two IPC objects left,
     or an unexpected error (the reason is printed)
  {USAGE}  usage error
  {IN_USE}  refused: processes have the table attached or lock servers run (use --force)
  {SERVICE_RUNS}  refused: the lock monitor or lock listener runs (stop it: jdls -k)
  {NOT_PERMITTED}  refused: permission denied (the table belongs to another user)
  {CONFIG} $JBCRELEASEDIR cannot be an instance's directory (a file, too long a path), or
      $DLS_IPC_KEY is no key (the message names what is wrong)
"""


def get_parser() -> argparse.ArgumentParser:
    parser = command.parser(
        PROG, "Remove the lock table of a dls instance: its SysV shared memory segment and "
        "semaphore, as jdls -K does, after checking that nothing uses them.", EPILOG)
    add_key_option(parser)
    parser.add_argument("-f", "--force", action="store_true",
                        help="remove the table even while processes have it attached or lock servers run "
                        "(they are named); never while the lock monitor or listener runs")
    return parser


class Refused(Exception):
    """Why the table is not removed; printed as ``dls-ipcrm: <message>`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _named(pids: Iterable[int]) -> str:
    return ", ".join(f"pid {pid} ({command_line(pid)})" for pid in pids)


def remove(instance: Instance, *, own_pid_files: bool, force: bool) -> tuple[list[str], list[str]]:
    """Remove the table: (warnings for stderr, lines for stdout). Raises Refused.

    Whether it may is dls-shm's ``Occupancy.refusal`` (shared with ``jdls -K``), said in dls-ipcrm's
    words; a table of another instance (``--key``) is also refused while its header's monitor or
    listener has it attached.
    """
    key = instance.key
    found = Occupancy.survey(instance, tidy=False, pid_files=own_pid_files)
    service = {} if own_pid_files else _header_service(key)
    refusal = found.refusal(force=force, service_pids=service.values())
    if refusal is Refusal.NOTHING:
        where = f" for JBCRELEASEDIR={instance.root}" if own_pid_files else ""
        return [], [f"{PROG}: no lock table with key 0x{key:08x}{where}: nothing to remove"]
    if refusal is not None:
        raise _refused(found, refusal, service)
    users = _users(found)
    try:
        shm_id, sem_id = LockTable.remove_key(key)  # whatever its layout: one left by an older dls too
    except TableMissing:
        return [], [f"{PROG}: the lock table with key 0x{key:08x} has just been removed: nothing to remove"]
    except TableError as exc:
        raise Refused(FAILED, str(exc)) from None
    warnings = []
    if users:
        warnings.append(f"{PROG}: warning: forced: removed the lock table 0x{key:08x} although {'; '.join(users)}: "
                        "they get errors on their next lock")
    return warnings, [f"{PROG}: removed lock table 0x{key:08x} (shared memory id {shm_id}, semaphore id {sem_id})"]


def _header_service(key: int) -> dict[str, int]:
    """A table's monitor and listener as its header names them (a table of another instance has no pid
    files here); nothing when the header cannot be read (the survey then says why)."""
    try:
        table = LockTable.attach(key)
    except TableError:
        return {}
    try:
        header = table.header()
    finally:
        table.close()
    return {LABELS[MONITOR]: header.monitor_pid, LABELS[LISTENER]: header.listener_pid}


def _refused(found: Occupancy, refusal: Refusal, service: dict[str, int]) -> Refused:
    """Why, in dls-ipcrm's words, with its exit status."""
    key = found.key
    if refusal is Refusal.LONE:
        lone = found.lone
        assert lone is not None
        return Refused(FAILED, str(HalfTable(key, lone.kind, lone.id)))
    if refusal is Refusal.SERVICE:
        running = ([str(r) for r in found.roles] or
                   [f"{label} (pid {pid})" for label, pid in service.items() if pid in found.attached])
        return Refused(SERVICE_RUNS, f"cannot remove the lock table 0x{key:08x} while the {' and '.join(running)} "
                                     f"{'run' if len(running) > 1 else 'runs'}: stop the service first (jdls -k)")
    if refusal is Refusal.FORBIDDEN:
        denied = found.forbidden
        assert denied is not None
        what = "shared memory" if denied.kind == "shm" else "semaphore"
        return Refused(NOT_PERMITTED, f"permission denied: the lock table 0x{key:08x} ({what} id {denied.id}) belongs "
                                      f"to user {denied.owner} (uid {denied.uid}, mode {denied.mode & 0o777:04o}); run "
                                      "dls-ipcrm as that user or as root")
    return Refused(IN_USE, f"cannot remove the lock table 0x{key:08x}: {'; '.join(_users(found))} "
                           "(dls-ipcrm --force removes it anyway)")


def _users(found: Occupancy) -> list[str]:
    """What removing the table goes past: the lock servers that run, the processes that have it attached."""
    users = []
    if found.servers:
        users.append(f"{len(found.servers)} lock server(s) run: {_named(s.pid for s in found.servers)}")
    if found.others:
        unnamed = found.unidentified
        named = _named(found.attached) + (f" and {unnamed} not identified" if found.attached and unnamed else "")
        users.append(f"{found.others} other process(es) have it attached" + (
            f": {named}" if found.attached else " (not identified: run as root)"))
    return users


def main(argv: list[str] | None = None) -> int:
    return command.run(get_parser(), argv, _main)


def _main(args: argparse.Namespace) -> int:
    try:
        instance, own_pid_files = chosen_table(args)
    except ValueError as exc:  # dls_proto's ConfigurationError: JBCRELEASEDIR or DLS_IPC_KEY
        return command.fail(PROG, exc, CONFIG)
    try:
        warnings, lines = remove(instance, own_pid_files=own_pid_files, force=args.force)
    except Refused as exc:
        return command.fail(PROG, exc, exc.status)
    for line in warnings:
        print(line, file=sys.stderr)
    for line in lines:
        print(line)
    return REMOVED


if __name__ == "__main__":
    sys.exit(main())

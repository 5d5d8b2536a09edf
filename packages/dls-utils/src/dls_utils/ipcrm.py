"""``dls-ipcrm``: remove an instance's lock table (shared memory and semaphore), as ``jdls -K`` does.

Removing a SysV segment that is in use only hides it: its users go on locking
in a table new processes can no longer see. So, like ``jdls -K``, dls-ipcrm
refuses while processes have the table attached or lock servers run, and
names them (pid and command line, from /proc); ``--force`` removes it all the
same, like ``jdls -K -o``, and says which processes it forced past.

Like ``jdls -K -o``, even ``--force`` refuses while the instance's lock
monitor or lock listener runs (their pid files in $JBCRELEASEDIR/run, or, for
a table named by ``--key``, the pids in its header): a monitor would go on
tending a table nobody else sees, and stopping the service (``jdls -k``) is
the right way to free it.

Whether removal is permitted is decided from /proc/sysvipc before anything
is touched (IPC_RMID needs the owner's or creator's uid, or root), so a
table of another user is reported plainly, with its owner and mode.
"""

from __future__ import annotations

import argparse
import os
import sys

from dls_shm import Instance, LockTable, TableError, TableMissing

from . import service

PROG = "dls-ipcrm"

#: Exit statuses (documented in the epilog and the README).
REMOVED = 0
FAILED = 1
USAGE = 2
IN_USE = 3
SERVICE_RUNS = 4
NOT_PERMITTED = 5

EPILOG = f"""\
table: --key KEY, else $DLS_IPC_KEY, else the key of $JBCRELEASEDIR (default /var/tmp/dls).

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
"""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Remove the lock table of a dls instance: its SysV shared memory segment and "
        "semaphore, as jdls -K does, after checking that nothing uses them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    service.add_key_option(parser)
    parser.add_argument("-f", "--force", action="store_true",
                        help="remove the table even while processes have it attached or lock servers run "
                        "(they are named); never while the lock monitor or listener runs")
    return parser


class Refused(Exception):
    """Why the table is not removed; printed as ``dls-ipcrm: <message>`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _named(pids: list[int]) -> str:
    return ", ".join(f"pid {pid} ({service.command_line(pid)})" for pid in pids)


def _permission(objects: list[service.IpcObject], key: int) -> None:
    euid = os.geteuid()
    for obj in objects:
        if not obj.may_remove(euid):
            what = "shared memory" if obj.kind == "shm" else "semaphore"
            raise Refused(NOT_PERMITTED, (
                f"permission denied: the lock table 0x{key:08x} ({what} id {obj.id}) belongs to user "
                f"{obj.owner} (uid {obj.uid}, mode {obj.mode & 0o777:04o}); run dls-ipcrm as that user or as root"
            ))


def remove(instance: Instance, *, own_pid_files: bool, force: bool) -> tuple[list[str], list[str]]:
    """Remove the table: (warnings for stderr, lines for stdout). Raises Refused."""
    key = instance.key
    shm, sem = service.shared_memory(key), service.semaphore(key)
    if shm is None and sem is None:
        where = f" for JBCRELEASEDIR={instance.root}" if own_pid_files else ""
        return [], [f"{PROG}: no lock table with key 0x{key:08x}{where}: nothing to remove"]
    if shm is None or sem is None:
        lone = sem if shm is None else shm
        assert lone is not None
        kind, flag = ("semaphore", "-s") if lone.kind == "sem" else ("shared memory segment", "-m")
        raise Refused(FAILED, (
            f"only a {kind} (id {lone.id}) is left with key 0x{key:08x}, not a whole lock table: "
            f"check it with ipcs and remove it with ipcrm {flag} {lone.id}"
        ))
    _permission([shm, sem], key)

    runs = service.running_roles(instance) if own_pid_files else []
    if runs:
        names = " and ".join(str(r) for r in runs)
        raise Refused(SERVICE_RUNS, f"cannot remove the lock table 0x{key:08x} while the {names} "
                                    f"{'run' if len(runs) > 1 else 'runs'}: stop the service first (jdls -k)")
    try:
        table = LockTable.attach(key)
    except TableMissing:
        return [], [f"{PROG}: the lock table with key 0x{key:08x} has just been removed: nothing to remove"]
    except TableError as exc:
        raise Refused(FAILED, f"cannot remove the lock table: {exc}") from None
    try:
        header = table.header()
        attached = service.attached_pids(table.shm_id)
        # The header names the monitor and listener too; for a table of another instance (--key) it is all
        # there is, and a live one among the attached processes is that service at work.
        for label, pid in (("lock monitor", header.monitor_pid), ("lock listener", header.listener_pid)):
            if pid and pid in attached:
                raise Refused(SERVICE_RUNS, f"cannot remove the lock table 0x{key:08x} while the {label} "
                                            f"(pid {pid}) runs: stop the service first (jdls -k)")
        servers = [s.pid for s in service.running_servers(instance)] if own_pid_files else []
        others = max(shm.nattch, len(attached))
        users = []
        if servers:
            users.append(f"{len(servers)} lock server(s) run: {_named(servers)}")
        if others:
            unnamed = others - len(attached)
            named = _named(attached) + (f" and {unnamed} not identified" if attached and unnamed else "")
            users.append(f"{others} other process(es) have it attached" + (f": {named}" if attached else
                                                                          " (not identified: run as root)"))
        if users and not force:
            raise Refused(IN_USE, f"cannot remove the lock table 0x{key:08x}: {'; '.join(users)} "
                                  "(dls-ipcrm --force removes it anyway)")
        shm_id, sem_ids = table.shm_id, table.semaphore_ids
        try:
            table.remove()
        except Exception as exc:  # sysv_ipc's errors are not part of dls-shm's API
            raise Refused(NOT_PERMITTED if "ermission" in str(exc) else FAILED,
                          f"cannot remove the lock table 0x{key:08x}: {exc}") from None
    except BaseException:
        table.close()
        raise
    warnings = []
    if users:
        warnings.append(f"{PROG}: warning: forced: removed the lock table 0x{key:08x} although {'; '.join(users)}: "
                     "they get errors on their next lock")
    sems = ", ".join(str(s) for s in sem_ids)
    return warnings, [f"{PROG}: removed lock table 0x{key:08x} (shared memory id {shm_id}, semaphore id {sems})"]


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2), -h (0)
        return exc.code if isinstance(exc.code, int) else USAGE
    try:
        instance = Instance.from_environment()
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return FAILED
    own_pid_files = args.key is None or args.key == instance.key
    if args.key is not None:
        instance = Instance(instance.root, args.key)
    try:
        warnings, lines = remove(instance, own_pid_files=own_pid_files, force=args.force)
    except Refused as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.status
    for line in warnings:
        print(line, file=sys.stderr)
    for line in lines:
        print(line)
    return REMOVED


if __name__ == "__main__":
    sys.exit(main())

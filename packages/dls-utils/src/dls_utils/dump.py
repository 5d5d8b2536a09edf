"""``dls-dump``: the lock table as ``jdls -dvL`` shows it, read from the table alone.

The text is ``jdls -dvL``'s, line for line, for the same table (the two are
compared in the tests), so an operator can read a table on a host where the
daemon's code is not installed, or after the service has stopped: only
dls-shm is used. The text is ``dls_shm.report``'s, the one jdls prints too.

The monitor and listener lines need to know whether those processes run,
which jdls learns from the pid files in $JBCRELEASEDIR/run. dls-dump asks
dls_shm (``service_processes``) as jdls does, but read only: a stale pid file
is left where it is. With ``--key`` naming another table it has no pid files,
and judges the header's monitor and listener pids by whether such a process
exists.

``--json`` is for tools: the header (geometry, flags, counters) and every
used slot, with the ports waiting for each held lock.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any

from dls_shm import Instance, LockTable, TableError, TableFlag, TableMissing, info, report, service_processes

from . import command
from .source import emit
from .table_choice import TABLE_HELP, add_key_option, chosen_table

PROG = "dls-dump"

EPILOG = f"""\
The text is that of jdls -dvL (-v: jdls -dvvL, adding the IPC key and shared memory id):
the monitor and listener, the table header, one line per used slot (Group, value,
pid, type, port, i-node, dev, queued, ipaddr, key, and age for a -T table), and the
summary. Only the lock table (and the pid files in $JBCRELEASEDIR/run) are read: the
daemon need not run.

{TABLE_HELP}
With --key naming another instance's table, the pid files are unknown: the monitor
and listener shown are the header's pids, Active when such a process exists.

--json: {{"instance", "key", "shm_id", "semaphore_ids", "header": {{...}}, "geometry":
{{"ngroups", "per_group", "locks"}}, "counts": {{"used", "granted", "kept", "waiting",
"max_in_group"}}, "processes": {{"monitor", "listener"}}, "slots": [{{"index", "group",
"state", "key", "inode", "device", "pid", "port", "client_pid", "thread", "ip",
"mode", "value", "waiters", ...}}]}}. A slot's state is granted, waiting or kept (a lock
whose lock server ended, kept for its client to reclaim until "expires").

exit status:
  {command.OK}  the table was shown
  {command.FAILED}  there is no lock table with that key, or it cannot be read
  {command.USAGE}  usage error
  {command.CONFIG} $JBCRELEASEDIR cannot be an instance's directory (a file, too long a path), or
      $DLS_IPC_KEY is no key (the message names what is wrong)
"""


def get_parser() -> argparse.ArgumentParser:
    parser = command.parser(
        PROG, "Dump a dls lock table: its header and every lock, as jdls -dvL shows them, read "
        "directly from the shared memory table without the daemon.", EPILOG)
    add_key_option(parser)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the IPC key and shared memory id (as jdls -dvvL)")
    parser.add_argument("--json", action="store_true",
                        help="print the header and every slot as one JSON object, for tools")
    return parser


def text(snapshot: report.Snapshot, procs: dict[str, report.Process], very: bool) -> list[str]:
    """``jdls -dvL``'s lines (``very``: ``-dvvL``'s)."""
    return report.lines(snapshot, procs["monitor"], procs["listener"], very=very)


def document(instance: Instance, snapshot: report.Snapshot, procs: dict[str, report.Process]) -> dict[str, Any]:
    """The ``--json`` object."""
    header = snapshot.header._asdict()
    header["magic"] = header["magic"].decode("ascii", "replace")
    header["flag_names"] = [f.name for f in TableFlag if f.name and header["flags"] & f]
    waiters: dict[tuple[int, int, int, str], list[int]] = defaultdict(list)
    entries = sorted(snapshot.entries, key=lambda e: (e.group, e.slot.ticket))
    slots = [info.entry_json(e, snapshot.header.lock_delay) for e in entries]
    for slot, entry in zip(slots, entries, strict=True):
        slot["ticket"] = entry.slot.ticket
        if slot["state"] == "waiting":
            waiters[_resource(slot)].append(slot["port"])
    for slot in slots:
        slot["waiters"] = waiters.get(_resource(slot), []) if slot["state"] in ("granted", "kept") else []
    geometry = snapshot.geometry
    return {
        "instance": str(instance.root),
        "key": f"0x{snapshot.key:08x}",
        "shm_id": snapshot.shm_id,
        "semaphore_ids": list(snapshot.semaphore_ids),
        "header": header,
        "mechanism": report.mechanism(snapshot.header.flags),
        "geometry": {"ngroups": geometry.ngroups, "per_group": geometry.per_group, "locks": geometry.locks},
        "counts": {"used": len(snapshot.entries), "granted": snapshot.granted, "kept": snapshot.kept,
                   "waiting": snapshot.waiting, "max_in_group": snapshot.max_in_group},
        "processes": {role: {"pid": pid, "active": active} for role, (pid, active) in procs.items()},
        "slots": slots,
    }


def _resource(slot: dict[str, Any]) -> tuple[int, int, int, str]:
    return slot["value"], slot["inode"], slot["device"], slot["key"]


def main(argv: list[str] | None = None) -> int:
    return command.run(get_parser(), argv, _main)


def _main(args: argparse.Namespace) -> int:
    try:
        instance, own_pid_files = chosen_table(args)
    except ValueError as exc:  # dls_proto's ConfigurationError: JBCRELEASEDIR or DLS_IPC_KEY
        return command.fail(PROG, exc, command.CONFIG)
    where = f"key 0x{instance.key:08x}" + (f" (JBCRELEASEDIR={instance.root})" if own_pid_files else "")
    try:
        table = LockTable.attach(instance.key)
        try:
            snapshot = report.Snapshot.read(table)
        finally:
            table.close()
    except TableMissing:
        return command.fail(PROG, f"there is no lock table with {where}: the lock monitor has not created one "
                            "(jdls -ib) or it was removed (jdls -K)", command.FAILED)
    except TableError as exc:
        return command.fail(PROG, f"cannot read the lock table with {where}: {exc}", command.FAILED)
    procs = service_processes(instance, snapshot.header, tidy=False, pid_files=own_pid_files)
    emit(json.dumps(document(instance, snapshot, procs), indent=2) if args.json
         else "\n".join(text(snapshot, procs, args.verbose)))
    return command.OK


if __name__ == "__main__":
    sys.exit(main())

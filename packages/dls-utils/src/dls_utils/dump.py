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
from collections.abc import Iterator
from typing import Any

from dls_shm import Instance, LockTable, TableError, TableFlag, TableMissing, info, queues, report, service_processes

from . import command
from .source import emit_lines, json_items
from .table_choice import TABLE_HELP, add_key_option, chosen_table

PROG = "dls-dump"

EPILOG = f"""\
The text is that of jdls -dvL (-v: jdls -dvvL, adding the IPC key and shared memory id):
the monitor and listener, the table header, one line per used slot (Group, value,
pid, type, port, i-node, dev, queued, ipaddr, key, and age for a -T table), and the
summary. Only the lock table (and the pid files in $JBCRELEASEDIR/run) are read: the
daemon need not run. The rows (and the --json slots) are written as the table is read,
a batch of groups at a time (its semaphore held only to copy each batch): a table of a
million locks is dumped without holding up its lockers.

{TABLE_HELP}
With --key naming another instance's table, the pid files are unknown: the monitor
and listener shown are the header's pids, Active when such a process exists.

--json: {{"instance", "key", "shm_id", "semaphore_ids", "header": {{...}}, "mechanism",
"geometry": {{"ngroups", "per_group", "locks"}}, "processes": {{"monitor", "listener"}},
"slots": [{{"index", "group", "state", "key", "inode", "device", "pid", "port",
"client_pid", "thread", "ip", "mode", "value", "waiters", "request", "converting",
"held_mode", "token", "block_valid", ...}}], "counts": {{"used", "granted", "kept",
"waiting", "converting", "refused", "max_in_group"}}}}: the slots by group, in a group in
queue order, and the counts, of the slots listed, after them. A slot's state is granted,
waiting, kept (a lock whose lock server ended, kept for its client to reclaim until
"expires") or deadlock; its "request" says what it is in its resource's queues:
granted, kept, converting (a holder's conversion waiting in the convert queue, "mode"
the mode it wants, "held_mode" the mode its lock has), waiting, or refused (chosen
to break a deadlock). "token" is a granted lock's fencing token, "block_valid" whether
the resource's value block is valid (false: VALNOTVALID).

--queues (-q) adds a section after the summary (jdls -dvL has none): a line per
resource, its Group, value, i-node, dev and key as the rows show them, its value
block (valid or "not valid"), and its requests by state, granted (each with its
fencing token, #N), converting (held->wanted), waiting and refused, each as
"port mode", in queue order. Its lines are kept until the summary is written (one
per resource).

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
    parser.add_argument("-q", "--queues", action="store_true",
                        help="also show each resource's queues and value block, after the summary")
    parser.add_argument("--json", action="store_true",
                        help="print the header and every slot as one JSON object, for tools")
    return parser


def text(snapshot: report.Snapshot, procs: dict[str, report.Process], very: bool,
         show_queues: bool = False) -> Iterator[str]:
    """``jdls -dvL``'s lines (``very``: ``-dvvL``'s), each row as its group is read; ``show_queues``: the
    resource queues after them."""
    return report.stream(snapshot, procs["monitor"], procs["listener"], very=very, show_queues=show_queues)


def document(instance: Instance, snapshot: report.Snapshot, procs: dict[str, report.Process]) -> Iterator[str]:
    """The ``--json`` object's text, as ``json.dumps(indent=2)`` writes it, the slots written as their groups
    are read and the counts, made meanwhile, after them."""
    header = snapshot.header._asdict()
    header["magic"] = header["magic"].decode("ascii", "replace")
    header["flag_names"] = [f.name for f in TableFlag if f.name and header["flags"] & f]
    geometry = snapshot.geometry
    head = {
        "instance": str(instance.root),
        "key": f"0x{snapshot.key:08x}",
        "shm_id": snapshot.shm_id,
        "semaphore_ids": list(snapshot.semaphore_ids),
        "header": header,
        "mechanism": report.mechanism(snapshot.header.flags),
        "geometry": {"ngroups": geometry.ngroups, "per_group": geometry.per_group, "locks": geometry.locks},
        "processes": {role: {"pid": pid, "active": active} for role, (pid, active) in procs.items()},
    }
    tally = report.Tally()
    yield json.dumps(head, indent=2)[:-2] + ","  # all but the closing brace
    yield '  "slots": ['
    yield from json_items(_slots(snapshot, tally), 4)
    yield "  ],"
    counts = {"used": tally.used, "granted": tally.granted, "kept": tally.kept, "waiting": tally.waiting,
              "converting": tally.converting, "refused": tally.refused, "max_in_group": tally.max_in_group}
    yield json.dumps({"counts": counts}, indent=2)[2:]  # its member and the closing brace


def _slots(snapshot: report.Snapshot, tally: report.Tally) -> Iterator[dict[str, Any]]:
    """Each used slot as JSON, group by group in queue order, with the ports waiting for each held lock (a
    resource's slots are all in one group), counted in ``tally``."""
    for group in snapshot.groups():
        tally.add(group)
        slots = [info.entry_json(e, snapshot.header.lock_delay) for e in group]
        waiters: dict[tuple[int, int, int, str], list[int]] = defaultdict(list)
        resources: dict[tuple[int, int, int, str], list[dict[str, Any]]] = defaultdict(list)
        for slot, entry in zip(slots, group, strict=True):
            slot["ticket"] = entry.slot.ticket
            resources[queues.resource(slot)].append(slot)
            if slot["state"] == "waiting":
                waiters[queues.resource(slot)].append(slot["port"])
        for slot in slots:
            resource = queues.resource(slot)
            slot["waiters"] = waiters.get(resource, []) if slot["state"] in queues.HELD else []
            slot["held_mode"] = queues.held_mode(slot, resources[resource])
        yield from slots


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
    except TableMissing:
        return command.fail(PROG, f"there is no lock table with {where}: the lock monitor has not created one "
                            "(jdls -ib) or it was removed (jdls -K)", command.FAILED)
    except TableError as exc:
        return command.fail(PROG, f"cannot read the lock table with {where}: {exc}", command.FAILED)
    try:
        snapshot = report.Snapshot.streamed(table)
        procs = service_processes(instance, snapshot.header, tidy=False, pid_files=own_pid_files)
        emit_lines(document(instance, snapshot, procs) if args.json
                   else text(snapshot, procs, args.verbose, args.queues))
    except TableError as exc:  # removed while it was read (jdls -K -o)
        return command.fail(PROG, f"cannot read the lock table with {where}: {exc}", command.FAILED)
    finally:
        table.close()
    return command.OK


if __name__ == "__main__":
    sys.exit(main())

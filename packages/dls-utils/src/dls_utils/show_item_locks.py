"""``show-item-locks`` (``SHOW-ITEM-LOCKS``): who holds which record lock, and who waits for it.

The lock table alone cannot answer an operator's question, as it knows a
file only by its inode; the clients' proc/info documents know the names. This
tool joins the two (see ``rows``) and prints one line per held lock.

Where the data comes from, in order: ``--server``; else ``--local``; else the
SERVER of $JDLS, since a process configured for a remote lock service should
see that service's locks; else the table of the local instance
($JBCRELEASEDIR). The remote way asks the service for a snapshot over the
wire protocol (see ``remote``), so it works from any application server.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from collections.abc import Iterable, Iterator, Sequence

from dls_proto import Server
from dls_shm import LockTable, TableError, TableMissing, info, oslock_entries
from dls_shm.rows import (
    HEADINGS,
    QUEUE_HEADINGS,
    SORTED_ROWS,
    Document,
    Row,
    SnapshotError,
    format_row,
    in_order,
    stream_rows,
    wanted,
)

from . import command
from .source import (
    Failure,
    add_source_options,
    chosen_server,
    emit_lines,
    json_items,
    local_instance,
    port_number,
    snapshot_of,
    source_help,
    this_host,
)

PROG = "show-item-locks"
NO_LOCKS = "(no record locks)"

EPILOG = f"""\
columns:
  IPADDR     the client's address: 0.0.0.0 for a process locking directly on the
             service's host (in its table, or with OS file locks), 127.0.0.1 for
             a local process going through the listener, else the address of the
             remote client
  PORT       the client's port number (JBCPORTNO, else its pid)
  PID        the process holding the lock on the service's host: the client
             itself when it locks directly (0.0.0.0), else the lock server
             serving it (as jDLS shows it; --json gives the client's own pid
             as client_pid, and list-open-files shows that one)
  FILENAME   from the client's proc/info document, else the file's inode
  RECORD KEY the record's key; for an OS file lock no document explains,
             (byte N): the byte of the lock file that stands for the key
  LOCK#      the lock's 32-bit value (0x00000000 for an OS file lock no
             document explains), a comma and the mode's letter:
             W  write (EX, exclusive: jBASE's WRITE lock)
             P  protected write (PW)
             R  read (PR, protected read: jBASE's READ lock)
             w  concurrent write (CW)
             r  concurrent read (CR)
             N  null (NL)
  PORT/-PID  the ports queued for the lock, in order, or --- when none waits
             ("waiting" on the row of a request whose lock has just been freed;
             with --queues, a request's row names its state)

--queues (-q): a line for every request, not only for each held lock: a resource's
granted (and kept) locks, then its conversions (the convert queue, served first),
then the other waiters, then the requests refused to break a deadlock, each in
queue order, with four columns more at the end:
  STATE      granted, kept (its lock server ended: kept for its client to reclaim),
             converting (a holder waiting to convert its lock), waiting, or
             refused (DEADLOCK: the request chosen to break a cycle of waiters)
  MODE       the request's mode (NL, CR, CW, PR, PW, EX); a conversion's as the
             mode held and the mode wanted: PR->EX
  TOKEN      a held lock's fencing token, - for a request not granted
  BLOCK      the resource's value block: valid, or "not valid" (VALNOTVALID: a PW or
             EX holder ended abnormally or released it invalidated, and nobody has
             written it since)
Without --queues the columns are the jDLS guide's. --json gives every row's
"state" (as STATE), "mode" (wanted), "held_mode" (a conversion's, else null),
"converting", "token" (null when not granted) and "block_valid", with or without
--queues, which decides the rows.

order: by FILENAME, then RECORD KEY, PORT and PID, when at most {SORTED_ROWS} rows are
shown; more (a big table) are written as the table is read, a batch of its groups at
a time, the table's semaphore held only to copy each batch: in the table's order (by
its hash group, the Group of jdls -dvL; in a group by FILENAME and RECORD KEY), then the
OS file locks. sort -t "$(printf '\\t')" -k4,5 sorts them by file and key.

The locks are those of the lock table, and the OS file locks held in the
service's lock directory (all its record locks when it runs without a table,
jdls -ibD; beside a table the clients with JDLS OSLOCKS lock in the table too,
and only a lock server of an earlier dls version holds some there), read from
/proc/locks and joined with the proc/info documents of their holders.

{source_help("the lock table and OS file locks of $JBCRELEASEDIR")}
"""


def get_parser() -> argparse.ArgumentParser:
    parser = command.parser(
        PROG, "Show the record locks of a dls lock service: who holds each one, on which file and "
        "record, and which ports wait for it.", EPILOG)
    parser.add_argument("--file", metavar="PATH", help="only locks whose file name contains PATH")
    parser.add_argument("--key", metavar="KEY", help="only locks of exactly this record key")
    parser.add_argument("--port", metavar="N", type=port_number,
                        help="only locks that port N holds or waits for")
    parser.add_argument("-q", "--queues", action="store_true",
                        help="a line for every request of each resource (granted, converting, waiting, refused) "
                             "with its state, mode, fencing token and whether the value block is valid")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list of objects")
    add_source_options(parser, "read the local lock table even when $JDLS names a server")
    return parser


def _local(stack: contextlib.ExitStack) -> tuple[str, Iterable[Document], Sequence[Document], str | None]:
    """Heading, lock entries and info documents of the local instance: the table's locks, and the OS record
    locks held in its lock directory (all its record locks under jdls -ibD; beside a table,
    those an earlier version's lock server holds for OSLOCKS clients), each joined with proc/info. The table's
    are read as they are used, a batch of groups at a time (``LockTable.scan``), the table attached until
    ``stack`` closes."""
    instance = local_instance()
    try:
        documents = list(info.read_all(instance))
    except PermissionError:
        raise Failure(f"proc/info of JBCRELEASEDIR={instance.root}: permission denied (it is the lock service's "
                      "group's: run as a member of it)") from None
    try:
        table = LockTable.attach(instance.key)
    except TableMissing:
        table = None
    except TableError as exc:
        raise Failure(f"lock table of JBCRELEASEDIR={instance.root}: {exc}") from None
    if table is not None:
        stack.callback(table.close)
    elif not instance.info_dir.is_dir():
        raise Failure(f"no lock table and no proc/info for JBCRELEASEDIR={instance.root} (is jdls running?)")
    lock_dir = instance.lock_dir()
    note = None if table is not None else f"(no lock table: the record locks are the OS file locks held in {lock_dir})"
    try:
        oslocks = oslock_entries.entries_of(lock_dir, documents, waiting=table is None)
    except OSError as exc:
        problem = f"OS file locks in {lock_dir} not read: {exc.strerror or exc}"
        if table is None:
            raise Failure(problem) from None
        oslocks, note = [], f"({problem})"
    heading = (f"{PROG} information retrieved from the {'lock table' if table is not None else 'OS file locks'} "
               f"and proc/info of JBCRELEASEDIR={instance.root} on host {this_host()}")
    locks = (info.entry_json(e) for e in table.scan()) if table is not None else ()
    return heading, itertools.chain(locks, oslocks), documents, note


def _remote(server: Server) -> tuple[str, Iterable[Document], Sequence[Document], str | None]:
    """Heading, lock entries and info documents of a lock service, from its snapshot."""
    snapshot, host = snapshot_of(server)
    locks, documents = snapshot.get("locks", []), snapshot.get("info", [])
    if not isinstance(locks, list) or not isinstance(documents, list):
        raise Failure(f"the lock service at {server} sent a snapshot without lists of locks and info")
    documents = [d for d in documents if isinstance(d, dict)]
    source = "OS file locks" if snapshot.get("mechanism") == "oslocks" else "lock table"
    heading = (f"{PROG} information retrieved from the {source} and proc/info of the lock service "
               f"at {server} on host {host}")
    note = None
    if snapshot.get("mechanism") == "oslocks":
        where = snapshot.get("lock_dir")
        note = ("(no lock table: the record locks are the OS file locks held" +
                (f" in {where}" if isinstance(where, str) else "") + " on that host)")
    problem = snapshot.get("oslocks_error")
    if isinstance(problem, str):
        note = f"({problem})"
    return heading, locks, documents, note


def render(heading: str, rows: Iterable[Row], note: str | None = None, *, every: bool = False) -> Iterator[str]:
    """The text display: heading, a blank line, then the columns (or a word that there are none), each row
    as it comes; ``every`` (--queues): every request, with the queue columns."""
    yield heading
    yield ""
    if note:
        yield note
    shown = False
    for row in rows:
        if not shown:
            yield QUEUE_HEADINGS if every else HEADINGS
            shown = True
        yield format_row(row, every=every)
    if not shown:
        yield NO_LOCKS


def main(argv: list[str] | None = None) -> int:
    return command.run(get_parser(), argv, _main)


def _main(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        try:
            server = chosen_server(args)
            rows: Iterable[Row]
            if server is not None:
                heading, locks, documents, note = _remote(server)
                try:  # a snapshot from the network: checked whole before anything is shown
                    rows = list(stream_rows(locks, documents, every=args.queues))
                except SnapshotError as exc:
                    raise Failure(str(exc)) from None
            else:
                heading, locks, documents, note = _local(stack)
                rows = stream_rows(locks, documents, every=args.queues)
        except Failure as exc:
            return command.fail(PROG, exc, exc.status)
        chosen = in_order((r for r in rows if wanted(r, file=args.file, key=args.key, port=args.port)),
                          every=args.queues)
        try:
            emit_lines(_json(chosen) if args.json else render(heading, chosen, note, every=args.queues))
        except TableError as exc:  # removed while it was read (jdls -K -o)
            return command.fail(PROG, f"lock table: {exc}", command.FAILED)
    return command.OK


def _json(rows: Iterable[Row]) -> Iterator[str]:
    """The rows as a JSON list, as ``json.dumps(indent=2)`` writes it, a row at a time."""
    yield "["
    yield from json_items(rows, 2)
    yield "]"


if __name__ == "__main__":
    sys.exit(main())

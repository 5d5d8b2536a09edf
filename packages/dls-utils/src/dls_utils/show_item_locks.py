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
import json
import socket
import sys
from collections.abc import Sequence

from dls_proto import Server
from dls_shm import Instance, LockTable, TableError, TableMissing, info

from . import command
from .rows import Document, Row, SnapshotError, build_rows, format_rows, select_rows
from .source import Failure, add_source_options, chosen_server, emit, port_number, snapshot_of, source_help

PROG = "show-item-locks"
NO_LOCKS = "(no record locks)"

EPILOG = f"""\
columns:
  IPADDR     the client's address: 0.0.0.0 for a process locking directly in the
             table, 127.0.0.1 for a local process going through the listener,
             else the address of the remote client
  PORT, PID  the client's port number and process id
  FILENAME   from the client's proc/info document, else the file's inode
  LOCK#      the lock's 32-bit value and mode letter (W write/EX, R read/PR)
  PORT/-PID  the ports queued for the lock, or ---

{source_help("the lock table of $JBCRELEASEDIR")}
"""


def get_parser() -> argparse.ArgumentParser:
    parser = command.parser(
        PROG, "Show the record locks of a dls lock service: who holds each one, on which file and "
        "record, and which ports wait for it.", EPILOG)
    parser.add_argument("--file", metavar="PATH", help="only locks whose file name contains PATH")
    parser.add_argument("--key", metavar="KEY", help="only locks of exactly this record key")
    parser.add_argument("--port", metavar="N", type=port_number,
                        help="only locks that port N holds or waits for")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list of objects")
    add_source_options(parser, "read the local lock table even when $JDLS names a server")
    return parser


def _local() -> tuple[str, Sequence[Document], Sequence[Document], str | None]:
    """Heading, lock entries and info documents of the local instance."""
    try:
        instance = Instance.from_environment()
    except ValueError as exc:
        raise Failure(str(exc)) from None
    try:
        table = LockTable.attach(instance.key)
    except TableMissing:
        raise Failure(f"no lock table for JBCRELEASEDIR={instance.root} (is jdls running?)") from None
    except TableError as exc:
        raise Failure(f"lock table of JBCRELEASEDIR={instance.root}: {exc}") from None
    try:
        locks = [info.entry_json(e) for e in table.scan()]
    except TableError as exc:
        raise Failure(f"lock table of JBCRELEASEDIR={instance.root}: {exc}") from None
    finally:
        table.close()
    documents = list(info.read_all(instance))
    heading = (f"{PROG} information retrieved from the lock table and proc/info of "
               f"JBCRELEASEDIR={instance.root} on host {socket.gethostname()}")
    return heading, locks, documents, None


def _remote(server: Server) -> tuple[str, Sequence[Document], Sequence[Document], str | None]:
    """Heading, lock entries and info documents of a lock service, from its snapshot."""
    snapshot, host = snapshot_of(server)
    locks, documents = snapshot.get("locks", []), snapshot.get("info", [])
    if not isinstance(locks, list) or not isinstance(documents, list):
        raise Failure(f"the lock service at {server} sent a snapshot without lists of locks and info")
    documents = [d for d in documents if isinstance(d, dict)]
    heading = (f"{PROG} information retrieved from the lock table and proc/info of the lock service "
               f"at {server} on host {host}")
    note = None
    if snapshot.get("mechanism") == "oslocks":
        note = "(the service uses OS file locks: its record locks are not in a lock table)"
    return heading, locks, documents, note


def render(heading: str, rows: Sequence[Row], note: str | None = None) -> list[str]:
    """The text display: heading, a blank line, then the columns (or a word that there are none)."""
    lines = [heading, ""]
    if note:
        lines.append(note)
    if rows:
        lines.extend(format_rows(rows))
    else:
        lines.append(NO_LOCKS)
    return lines


def main(argv: list[str] | None = None) -> int:
    return command.run(get_parser(), argv, _main)


def _main(args: argparse.Namespace) -> int:
    try:
        server = chosen_server(args)
        heading, locks, documents, note = _remote(server) if server is not None else _local()
        try:
            rows = build_rows(locks, documents)
        except SnapshotError as exc:
            raise Failure(str(exc)) from None
    except Failure as exc:
        return command.fail(PROG, exc, exc.status)
    rows = select_rows(rows, file=args.file, key=args.key, port=args.port)
    text = json.dumps(rows, indent=2) if args.json else "\n".join(render(heading, rows, note))
    emit(text)
    return command.OK


if __name__ == "__main__":
    sys.exit(main())

"""``list-open-files`` (``LIST-OPEN-FILES``): the files each port has open.

The lock table knows no files at all, only inodes of locked records; the
files a process has open are in its proc/info document (written by the
process itself, or by its lock server for a remote client). This tool lists
them, one line per open file, from the same place show-item-locks reads
them: the documents of the local instance ($JBCRELEASEDIR/proc/info), or a
lock service's snapshot over the protocol. Where the information comes from
is chosen exactly as show-item-locks chooses it (its code is reused): no
lock table is needed, so it also works for a service using OS file locks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TypedDict

from dls_proto import Server
from dls_shm import info
from dls_shm.report import printable
from dls_shm.rows import Document

from . import command
from .source import (
    Failure,
    add_source_options,
    chosen_server,
    emit,
    local_instance,
    port_number,
    snapshot_of,
    source_help,
    this_host,
)

PROG = "list-open-files"
COLUMNS = ("IPADDR", "PORT", "PID", "FILENAME")
NO_FILES = "(no open files)"
NO_CLIENTS = "(no clients)"

EPILOG = f"""\
columns:
  IPADDR     the client's address: 0.0.0.0 for a process locking directly on the
             service's host (in its table, or with OS file locks), 127.0.0.1 for
             a local process going through the listener, else the address of the
             remote client
  PORT       the client's port number (JBCPORTNO, else its pid)
  PID        the client's own process id, on its own host (show-item-locks'
             PID is the process holding the lock: for a remote client, its
             lock server on the service's host)
  FILENAME   the file's name as the client reported it

A client reports its files when it is initialised, when it takes its first lock
in a file, when a lock request starts or stops waiting, and when the
application calls publish_info(); its lock server (for a remote client) or the
process itself (a local one) writes them to proc/info/<port>@<address>.

One line per open file, sorted by port, then file name, tab separated.

--stats: one line per client, with what its lock server has done for it (a
remote client's lock server appends these figures each time the client
publishes its document; a local process has none, shown as -):
  SERVER-PID the lock server's pid on the service's host
  GRANTED    locks granted (at once, after a wait, or reclaimed)
  WAITS      lock requests that had to wait
  RETRIES    looks again at a waiting request that did not grant it
  REFUSED    requests refused at once (held, and no wait asked)
  TIMEOUTS   waits that ended without the lock
  RELEASED   locks the client released
  HELD, WAITING  locks held and requests waiting when the document was written

{source_help("the proc/info documents of $JBCRELEASEDIR")}

exit status:
  {command.OK}  the list was shown ("{NO_FILES}" when there are none)
  {command.FAILED}  no proc/info directory for the instance, the server cannot be reached or its
     answer cannot be read
  {command.USAGE}  usage error
  {command.CONFIG} $JDLS is refused, as every client refuses it, or $JBCRELEASEDIR cannot be an
     instance's directory (the message names what is wrong)
"""


class OpenFile(TypedDict):
    """One line of the display; also the object ``--json`` prints."""

    ipaddr: str
    port: int
    pid: int
    filename: str
    inode: int | None


def get_parser() -> argparse.ArgumentParser:
    parser = command.parser(
        PROG, "List the files each port (process) of a dls lock service has open, from the "
        "processes' proc/info documents: one line per open file.", EPILOG)
    parser.add_argument("--file", metavar="PATH", help="only files whose name contains PATH")
    parser.add_argument("--port", metavar="N", type=port_number, help="only the files port N has open")
    parser.add_argument("--stats", action="store_true",
                        help="one line per client instead: its lock server's pid and the figures that lock server "
                        "appends to the client's document (see below)")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list of objects")
    add_source_options(parser, "read the local proc/info documents even when $JDLS names a server")
    return parser


def open_files(documents: Iterable[Document]) -> list[OpenFile]:
    """One row per file a document lists (duplicates once), sorted by port, file name, then address: two
    application servers' clients of one port number are two documents, both shown."""
    rows: dict[tuple[str, int, str, int | None], OpenFile] = {}
    for doc in documents:
        port, files = doc.get("port"), doc.get("files")
        if not isinstance(port, int) or not isinstance(files, list):
            continue
        pid = doc.get("pid")
        ip = doc.get("ip")
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"]:
                continue
            inode = item.get("inode")
            inode = inode if isinstance(inode, int) else None
            ipaddr = ip if isinstance(ip, str) and ip else "-"
            rows.setdefault((ipaddr, port, item["path"], inode), OpenFile(
                ipaddr=ipaddr,
                port=port, pid=pid if isinstance(pid, int) else 0, filename=item["path"], inode=inode,
            ))
    return sorted(rows.values(), key=lambda r: (r["port"], r["filename"], r["ipaddr"]))


#: --stats: the columns, and the figures of a document's "stats" (appended by a remote client's lock server) shown.
STATS_COLUMNS = ("IPADDR", "PORT", "PID", "SERVER-PID", "GRANTED", "WAITS", "RETRIES", "REFUSED", "TIMEOUTS",
                 "RELEASED", "HELD", "WAITING")
STATS_FIGURES = ("locks_granted", "lock_waits", "lock_retries", "locks_refused", "lock_timeouts", "locks_released",
                 "locks_held", "requests_waiting")


def client_stats(documents: Iterable[Document]) -> list[dict[str, Any]]:
    """One row per client document: address, port, pid, its lock server's pid and figures (None for a figure
    the document does not have: a local process has no lock server), sorted by port then address."""
    rows = []
    for doc in documents:
        port = doc.get("port")
        if not isinstance(port, int):
            continue
        ip, pid, server_pid, stats = doc.get("ip"), doc.get("pid"), doc.get("server_pid"), doc.get("stats")
        figures = stats if isinstance(stats, dict) else {}
        rows.append({
            "ipaddr": ip if isinstance(ip, str) and ip else "-", "port": port,
            "pid": pid if isinstance(pid, int) else 0, "server_pid": server_pid if isinstance(server_pid, int) else 0,
            **{name: figures[name] if isinstance(figures.get(name), int) else None for name in STATS_FIGURES},
        })
    return sorted(rows, key=lambda r: (r["port"], r["ipaddr"]))


def format_stats(rows: Iterable[dict[str, Any]]) -> list[str]:
    lines = ["\t".join(STATS_COLUMNS)]
    for r in rows:
        figures = ["-" if r[name] is None else str(r[name]) for name in STATS_FIGURES]
        lines.append("\t".join((r["ipaddr"], str(r["port"]), str(r["pid"]), str(r["server_pid"] or "-"), *figures)))
    return lines


def select(rows: Iterable[OpenFile], *, file: str | None = None, port: int | None = None) -> list[OpenFile]:
    return [r for r in rows if (file is None or file in r["filename"]) and (port is None or r["port"] == port)]


def format_rows(rows: Iterable[OpenFile]) -> list[str]:
    lines = ["\t".join(COLUMNS)]
    lines.extend("\t".join((r["ipaddr"], str(r["port"]), str(r["pid"]), printable(r["filename"]))) for r in rows)
    return lines


def _local() -> tuple[str, Sequence[Document]]:
    instance = local_instance()
    try:
        if not instance.info_dir.is_dir():
            raise Failure(f"no proc/info directory for JBCRELEASEDIR={instance.root} (is jdls running there?)")
        heading = (f"{PROG} information retrieved from proc/info of JBCRELEASEDIR={instance.root} "
                   f"on host {this_host()}")
        return heading, list(info.read_all(instance))
    except PermissionError:
        raise Failure(f"proc/info of JBCRELEASEDIR={instance.root}: permission denied (it is the lock service's "
                      "group's: run as a member of it)") from None


def _remote(server: Server) -> tuple[str, Sequence[Document]]:
    snapshot, host = snapshot_of(server)
    documents = snapshot.get("info", [])
    if not isinstance(documents, list):
        raise Failure(f"the lock service at {server} sent a snapshot without a list of info documents")
    heading = f"{PROG} information retrieved from proc/info of the lock service at {server} on host {host}"
    return heading, [d for d in documents if isinstance(d, dict)]


def main(argv: list[str] | None = None) -> int:
    return command.run(get_parser(), argv, _main)


def _main(args: argparse.Namespace) -> int:
    try:
        server = chosen_server(args)
        heading, documents = _remote(server) if server is not None else _local()
    except Failure as exc:
        return command.fail(PROG, exc, exc.status)
    if args.stats:
        stats = [r for r in client_stats(documents) if args.port is None or r["port"] == args.port]
        text = (json.dumps(stats, indent=2) if args.json else
                "\n".join([heading, "", *(format_stats(stats) if stats else [NO_CLIENTS])]))
        emit(text)
        return command.OK
    rows = select(open_files(documents), file=args.file, port=args.port)
    if args.json:
        text = json.dumps(rows, indent=2)
    else:
        text = "\n".join([heading, "", *(format_rows(rows) if rows else [NO_FILES])])
    emit(text)
    return command.OK


if __name__ == "__main__":
    sys.exit(main())

"""The rows of show-item-locks: lock table entries joined with the proc/info documents.

Pure functions, no IPC and no sockets: the local table and a remote snapshot
both arrive here in the same JSON form (``dls_shm.info.entry_json`` entries and
info documents), so one piece of code decides what an operator sees wherever
the data came from, and the tests can feed it plain data.

Why a join at all: the table knows only a file's inode, never its name; the
name is known only to the client that opened the file, which writes it to
proc/info under its address and port. So a lock's FILENAME is found by
(address, port, inode) in the documents, and when no document names it the
inode itself is shown.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypedDict

from . import info, modes, queues
from .layout import KEY_MAX
from .report import printable

#: The \xNN escapes dls_shm.info's backslashreplace leaves for bytes that are not UTF-8 (the digest of a long
#: key, a character cut at the end of its prefix).
_ESCAPE = re.compile(r"(\\x[0-9a-f]{2})")


def _slot_bytes(text: str) -> bytes:
    """The bytes of a slot's key from its JSON text, so that a prefix is compared byte for byte.

    A key that itself contains the text ``\\xNN`` is read back wrong; its full name is then not found and
    the prefix is shown, which is what happens to any long key no document names.
    """
    return b"".join(bytes.fromhex(part[2:]) if _ESCAPE.fullmatch(part) else part.encode("utf-8", "surrogatepass")
                    for part in _ESCAPE.split(text))

#: Column titles, as jDLS's SHOW-ITEM-LOCKS prints them.
COLUMNS = ("IPADDR", "PORT", "PID", "FILENAME", "RECORD KEY", "LOCK#", "PORT/-PID")
#: The column titles' line, tab separated as the rows.
HEADINGS = "\t".join(COLUMNS)
#: The columns --queues adds after them: each request's state, mode, fencing token, and its resource's value
#: block.
QUEUE_COLUMNS = ("STATE", "MODE", "TOKEN", "BLOCK")
#: The column titles' line of --queues.
QUEUE_HEADINGS = "\t".join(COLUMNS + QUEUE_COLUMNS)
#: What the PORT/-PID column shows for a held lock nobody waits for, and TOKEN for a request not granted.
NO_WAITERS = "---"
NO_TOKEN = "-"  # noqa: S105 - a fencing token's column, not a password
#: The states of a held lock: granted, or kept (its lock server ended; kept for its client to reclaim).
HELD = queues.HELD
#: What the PORT/-PID column shows for a request that waits on a lock no longer held.
WAITING = "waiting"
#: A long key keeps this many leading bytes verbatim in its slot (the rest is a digest of the
#: whole key, see dls_shm's layout): the part that can be shown or matched against proc/info.
LONG_KEY_PREFIX = KEY_MAX - 16

Document = Mapping[str, Any]


class Row(TypedDict):
    """One line of the display; also the object ``--json`` prints."""

    ipaddr: str
    port: int
    pid: int
    filename: str
    key: str
    lock: str
    value: int
    mode: str
    #: The request's state (``dls_shm.queues.STATES``): granted, kept, converting, waiting, refused.
    state: str
    waiters: list[int]
    inode: int
    device: int
    client_pid: int
    thread: int
    #: A held lock's fencing token (None: not granted).
    token: int | None
    #: A conversion waiting in the convert queue: ``mode`` is the mode it wants, ``held_mode`` the one held.
    converting: bool
    held_mode: str | None
    #: Whether the resource's value block is valid (False: VALNOTVALID).
    block_valid: bool


class SnapshotError(ValueError):
    """The lock entries or documents are not in the form this version reads."""


def inode_name(inode: int) -> str:
    """How a file without a known name is shown: its inode, zero padded as jDLS prints it."""
    return f"inode {inode:08d}"


def lock_label(value: int, mode: str) -> str:
    """The LOCK# column: the resource's 32-bit value and the mode's letter (W for EX, R for PR)."""
    return f"0x{value:08x},{modes.LETTERS[modes.parse(mode)]}"


def _address(value: object) -> str | None:
    """A document's or entry's address as the table spells it, or None when it names none."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return info.canonical_address(value)
    except ValueError:
        return value


#: The address under which _Names also keeps every document's names: the fall-back of a lock whose client's
#: address has no document for that port and file.
_ANY = "*"


class _Names:
    """File names and full record keys that the info documents give, by (address, port, inode): one port
    number may be used by clients on several hosts, each with a document of its own. A lock is named from the
    document of its own address; only when there is none for its port and file, from another's (a document
    of an older writer without an address, say): the same inode of the same port is the same file."""

    def __init__(self, documents: Iterable[Document]) -> None:
        self.paths: dict[tuple[str, int, int], str] = {}
        self.keys: dict[tuple[str, int, int], list[str]] = defaultdict(list)
        for doc in documents:
            port = doc.get("port")
            if not isinstance(port, int):
                continue  # not a document of a port: nothing to join on
            ip = _address(doc.get("ip")) or _ANY
            for item in [*_items(doc, "files"), *_items(doc, "locks")]:
                inode, path = item.get("inode"), item.get("path")
                if isinstance(inode, int) and isinstance(path, str) and path:
                    self.paths.setdefault((ip, port, inode), path)
                    self.paths.setdefault((_ANY, port, inode), path)
            for item in _items(doc, "locks"):
                inode, key = item.get("inode"), item.get("key")
                if isinstance(inode, int) and isinstance(key, str):
                    self.keys[(ip, port, inode)].append(key)
                    if ip != _ANY:
                        self.keys[(_ANY, port, inode)].append(key)

    def filename(self, ip: str | None, port: int, inode: int) -> str:
        found = self.paths.get((ip or _ANY, port, inode)) or self.paths.get((_ANY, port, inode))
        return found if found is not None else inode_name(inode)

    def key(self, ip: str | None, port: int, inode: int, stored: str, long_key: bool) -> str:
        """The record key to show. A long key's slot holds only a prefix and a digest:
        the full key comes from the client's document when it names one with that prefix."""
        if not long_key:
            return stored
        prefix = _slot_bytes(stored)[:LONG_KEY_PREFIX]
        own = self.keys.get((ip or _ANY, port, inode), [])
        candidates: list[str] = [*own, *self.keys.get((_ANY, port, inode), ())]
        for full in candidates:
            data = full.encode("utf-8", "surrogatepass")
            if len(data) >= KEY_MAX and data.startswith(prefix):
                return full
        return prefix.decode("utf-8", "ignore") + "..."


def _items(doc: Document, name: str) -> list[Mapping[str, Any]]:
    value = doc.get(name)
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


#: Up to this many rows are shown sorted by file name and key (the jDLS guide's order); more are shown in the
#: table's order as it is read (``stream_rows``): a table of a million locks is listed as it is read, in the
#: memory of this many rows.
SORTED_ROWS = 10_000


def build_rows(locks: Iterable[Document], documents: Iterable[Document], *, every: bool = False) -> list[Row]:
    """``stream_rows``'s rows as a list, ``in_order``."""
    return list(in_order(stream_rows(locks, documents, every=every), every=every))


def in_order(rows: Iterable[Row], *, every: bool = False) -> Iterator[Row]:
    """The rows sorted by file name, key, port and pid (``every``: by file name and key, a resource's rows
    kept in their queue order) when there are at most SORTED_ROWS of them; else as they come (the table's
    order, sorted within each group), the first as soon as SORTED_ROWS are read."""
    it = iter(rows)
    first = list(itertools.islice(it, SORTED_ROWS + 1))
    if len(first) <= SORTED_ROWS:
        yield from sorted(first, key=_queue_order if every else _row_order)
        return
    yield from first
    yield from it


def _row_order(row: Row) -> tuple[str, str, int, int]:
    return row["filename"], row["key"], row["port"], row["pid"]


def _queue_order(row: Row) -> tuple[str, str, int, int, int]:
    """A resource's rows together (a stable sort keeps their queue order), by file name and key."""
    return row["filename"], row["key"], row["value"], row["inode"], row["device"]


def stream_rows(locks: Iterable[Document], documents: Iterable[Document], *, every: bool = False) -> Iterator[Row]:
    """One row per held lock, waiters in the holders' rows, made a group of the table at a time, as the
    table lists its locks (``scan``, group by group; the OS file locks after them, in a group of their own):
    a lock and its waiters are always in one group. Within a group the rows are by file name, then key.

    A waiting request whose resource has no holder at this instant (the holder
    just left and the waiter has not yet woken) gets a row of its own marked
    ``waiting``, so that no slot of the table is hidden from the operator.

    ``every`` (show-item-locks --queues): a row for every request, a resource's in queue order
    (``dls_shm.queues``: granted and kept, converting, waiting, refused), the waiters still in the held rows.
    """
    names = _Names(documents)
    for _group, entries in itertools.groupby(locks, key=_group_of):
        yield from _group_rows(list(entries), names, every)


def _group_of(entry: object) -> object:
    """The group of a lock entry (a malformed one is reported when its rows are made)."""
    return entry.get("group") if isinstance(entry, Mapping) else None


def _group_rows(locks: list[Document], names: _Names, every: bool = False) -> list[Row]:
    """The rows of one group's locks, by file name then key (``every``: each resource's in queue order)."""
    by_resource: dict[tuple[int, int, int, str], list[Document]] = defaultdict(list)
    try:
        for entry in locks:
            by_resource[queues.resource(entry)].append(entry)
        rows: list[Row] = []
        for entries in by_resource.values():
            valid = queues.block_valid(entries)
            held = [e for e in entries if e["state"] in HELD]
            queue = sorted((e for e in entries if e["state"] == "waiting"), key=lambda e: (e["timestamp"], e["index"]))
            waiters = [int(e["port"]) for e in queue]
            if every:
                rows.extend(_row(e, names, waiters if e["state"] in HELD else [], valid, entries)
                            for e in queues.in_queue_order(entries))
            elif held:
                rows.extend(_row(e, names, waiters, valid, entries) for e in held)
            else:
                rows.extend(_row(e, names, [], valid, entries) for e in queue)
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"lock entry not understood: {exc!r}") from None
    rows.sort(key=_queue_order if every else _row_order)
    return rows


def _row(entry: Document, names: _Names, waiters: list[int], block_valid: bool, resource: list[Document]) -> Row:
    port, inode, ip = int(entry["port"]), int(entry["inode"]), _address(entry["ip"])
    # As jDLS shows it: PID is the process holding the lock in the table, which for a
    # client served through the listener is its lock server; the client's own pid
    # is client_pid.
    pid = int(entry["pid"])
    return Row(
        ipaddr=str(entry["ip"]),
        port=port,
        pid=pid,
        filename=names.filename(ip, port, inode),
        key=names.key(ip, port, inode, str(entry["key"]), bool(entry.get("long_key"))),
        lock=lock_label(int(entry["value"]), str(entry["mode"])),
        value=int(entry["value"]),
        mode=str(entry["mode"]),
        state=queues.request_state(entry),
        waiters=waiters,
        inode=inode,
        device=int(entry["device"]),
        client_pid=int(entry.get("client_pid") or 0) or pid,
        thread=int(entry.get("thread") or 0),
        token=queues.token(entry),
        converting=bool(entry.get("converting")),
        held_mode=queues.held_mode(entry, resource),
        block_valid=block_valid,
    )


def select_rows(
    rows: Iterable[Row], *, file: str | None = None, key: str | None = None, port: int | None = None
) -> list[Row]:
    """The rows an operator asked for (``wanted``)."""
    return [r for r in rows if wanted(r, file=file, key=key, port=port)]


def wanted(row: Row, *, file: str | None = None, key: str | None = None, port: int | None = None) -> bool:
    """Whether an operator asked for ``row``: file name containing ``file``, exactly ``key``, and ``port``
    holding the lock or waiting for it (so one port's whole story shows)."""
    return ((file is None or file in row["filename"])
            and (key is None or row["key"] == key)
            and (port is None or row["port"] == port or port in row["waiters"]))


def waiters_column(row: Row) -> str:
    """The PORT/-PID column: a held lock's queue; a request's state ("waiting": today's only one without
    --queues, a request whose lock has just been freed)."""
    if row["state"] not in HELD:
        return row["state"]
    return ",".join(str(p) for p in row["waiters"]) or NO_WAITERS


def mode_column(row: Row) -> str:
    """The MODE column of --queues: the request's mode; a conversion's as held->wanted ("PR->EX")."""
    return queues.mode_change(row["mode"], row["held_mode"])


def format_rows(rows: Iterable[Row], *, every: bool = False) -> list[str]:
    """The column titles and one line per row (``format_row``)."""
    return [QUEUE_HEADINGS if every else HEADINGS, *(format_row(r, every=every) for r in rows)]


def format_row(r: Row, *, every: bool = False) -> str:
    """One row's line, tab separated as jDLS printed them (a record key may contain spaces; a tab keeps
    ``cut -f`` and ``awk -F'\\t'`` working); ``every`` (--queues) adds QUEUE_COLUMNS at the end."""
    columns = [r["ipaddr"], str(r["port"]), str(r["pid"]), printable(r["filename"]), printable(r["key"]), r["lock"],
               waiters_column(r)]
    if every:
        columns += [r["state"], mode_column(r), NO_TOKEN if r["token"] is None else str(r["token"]),
                    queues.block_word(r["block_valid"])]
    return "\t".join(columns)

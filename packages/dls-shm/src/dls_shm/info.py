"""The lock-information files in proc/info, and the JSON form of table entries.

The table knows inodes and keys; only a client knows file names. Clients (or
their lock servers) write what they know to proc/info as one JSON document per
client, and the utilities join it with the table. Both sides of that join
use this module, so the format lives in one place.

A client is named by its address and its port (``<port>@<address>``, say
``1000@10.44.1.55``; ``2@0.0.0.0`` for a process locking directly on the
service's host), since one port number may be used on several application
servers at once. The address is the one the lock server saw the client connect
from (never the host name a client says it has), written in its canonical
form, so a file name holds nothing but digits, dots, colons and hex letters.
Files of versions before 0.7.0, named ``<port>`` alone, are still read.

A document: {"format": 1, "port", "pid", "ip", "host", "server_pid",
"updated", "files": [{"path", "inode"}], "locks": [{"path", "inode", "key",
"mode", "state"}], "stats": {...}}. Unknown fields are kept and ignored.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from . import modes, trusted
from .instance import Instance
from .layout import SlotFlag, SlotState, pack_ip, unpack_ip
from .table import Entry

FORMAT = 1
#: A document longer than this is not read: proc/info is written by the application's processes too
#: (mode 03770 in the service's group), so what is in it is their word, not the service's.
MAX_DOCUMENT = 1 << 20
#: Between a document's port and its client's address in its file name.
SEPARATOR = "@"
#: The address a process that locks directly on the service's host is shown with (as jDLS shows it).
LOCAL_ADDRESS = "0.0.0.0"  # noqa: S104 - an address to display, not to bind


class Written(NamedTuple):
    """A document as its writer made it: the path, and the (device, inode) that tells the writer's file from
    a later one of the same name (see ``remove``)."""

    path: Path
    identity: tuple[int, int]


def canonical_address(ip: str) -> str:
    """``ip`` spelt as the table shows addresses (dotted for IPv4, an IPv4-mapped IPv6 address too; an IPv6
    scope dropped), so that a document and a slot name one client alike; ValueError when it is no address."""
    return unpack_ip(pack_ip(ip))


def info_name(port: int, ip: str) -> str:
    """The file name of the document of the client at ``ip`` with ``port``."""
    if isinstance(port, bool) or not isinstance(port, int) or port < 0:
        raise ValueError(f"not a port number: {port!r}")
    return f"{port}{SEPARATOR}{canonical_address(ip)}"


def info_path(instance: Instance, port: int, ip: str) -> Path:
    return instance.info_dir / info_name(port, ip)


def write(instance: Instance, port: int, document: dict[str, Any], *, ip: str | None = None) -> Written:
    """Replace the document of the client (``ip``, ``port``) atomically (readers never see half of it): made
    here 0640, with O_EXCL and never through a symlink. ``ip`` defaults to the document's "ip", else
    LOCAL_ADDRESS (a process locking directly on this host); the document's "ip" is set to it."""
    if ip is None:
        given = document.get("ip")
        ip = given if isinstance(given, str) and given else LOCAL_ADDRESS
    document = {**document, "format": FORMAT, "port": port, "ip": canonical_address(ip)}
    path = info_path(instance, port, ip)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    return Written(path, trusted.write_new(path, json.dumps(document, sort_keys=True).encode()))


def remove(written: Written) -> None:
    """Delete a document its writer made, and only that one: when another client of the same address and port
    has replaced it since (a misconfigured JBCPORTNO, a client that connected again), the other's stays."""
    try:
        st = os.stat(written.path, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == written.identity:
            os.unlink(written.path)
    except FileNotFoundError:
        pass


def _order(name: str) -> tuple[bool, int, str]:
    """Documents by port, then address; a name not of a document last."""
    port, _, address = name.partition(SEPARATOR)
    return (not port.isdigit(), int(port) if port.isdigit() else 0, address)


def read_all(instance: Instance) -> Iterator[dict[str, Any]]:
    """Every readable information document of the instance (old-style ``<port>`` files too), by port order."""
    try:
        names = sorted(os.listdir(instance.info_dir), key=_order)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith("."):
            continue
        try:
            document = json.loads(_read(instance.info_dir / name))
        except (OSError, ValueError, RecursionError):
            continue  # being replaced, not ours, or not to be trusted
        if isinstance(document, dict):
            yield document


def _read(path: Path) -> bytes:
    """A document of proc/info, read as the untrusted input it is: no symlink, no other file type, no more
    than MAX_DOCUMENT bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | trusted.NOFOLLOW)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: not a regular file")
        data = os.read(fd, MAX_DOCUMENT + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_DOCUMENT:
        raise ValueError(f"{path}: longer than {MAX_DOCUMENT} bytes")
    return data


def entry_json(entry: Entry, lock_delay: float = 0.0) -> dict[str, Any]:
    """A table entry as plain JSON values (for snapshots and dls-dump --json); a kept lock (state "kept")
    also says when it is freed unless reclaimed (``expires``, from the table's ``lock_delay``)."""
    s = entry.slot
    document: dict[str, Any] = {
        "index": entry.index,
        "group": entry.group,
        "value": entry.value,
        "state": SlotState(s.state).name.lower(),
        "mode": modes.NAMES[s.mode],
        "pid": s.pid,
        "port": s.port,
        "client_pid": s.client_pid,
        "ip": unpack_ip(s.ip),
        "thread": s.thread,
        "inode": s.inode,
        "device": s.device,
        "queued": s.queued,
        "timestamp": s.timestamp,
        "key": s.key[: s.key_len].decode("utf-8", "backslashreplace"),
        "long_key": bool(s.flags & SlotFlag.LONG_KEY),
    }
    if s.state == SlotState.KEPT:
        document["expires"] = s.timestamp + lock_delay
    return document

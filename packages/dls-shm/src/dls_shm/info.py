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
"server_started", "updated", "files": [{"path", "inode"}], "locks": [{"path",
"inode", "key", "mode", "state"}], "stats": {...}}. Unknown fields are kept and
ignored. ``server_pid`` is the lock server that wrote a remote client's
document (0 in a local process's own), ``server_started`` its start time (as
pid files record it, ``pidfiles.PidRecord``): a lock server removes its
document when it ends, and when it is killed the monitor removes it
(``remove_orphans``), knowing the writer dead by both.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from . import modes, pidfiles, queues, trusted
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


def remove_orphans(instance: Instance) -> list[str]:
    """Remove the documents whose writer, a lock server, died without removing them (killed); the names removed.

    Only what is surely an orphan goes: a regular file (no symlink is followed, each file is opened and
    removed through the directory's descriptor), owned by this user (lock servers run as the monitor does;
    a document another user planted is not ours to judge), naming a ``server_pid`` above 0 that no longer
    runs, or runs as a later process (another start time than ``server_started``). A document without a
    start time (of an earlier version) goes only when its pid runs no process at all. It is removed only if
    it is still the file judged: one written anew meanwhile (the client came back) stays, bar the instant
    between that look and the unlink, which no call closes.
    """
    try:
        directory = os.open(instance.info_dir, os.O_RDONLY | os.O_DIRECTORY | trusted.NOFOLLOW)
    except FileNotFoundError:
        return []
    removed = []
    try:
        for name in sorted(os.listdir(directory), key=_order):
            if name.startswith(".") or SEPARATOR not in name:
                continue  # a file being written, or no lock server's (theirs are <port>@<address>)
            try:
                data, judged = _read(name, directory)
                if judged.st_uid != os.geteuid() or _writer_runs(json.loads(data)):
                    continue
                now = os.stat(name, dir_fd=directory, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (judged.st_dev, judged.st_ino):
                    os.unlink(name, dir_fd=directory)
                    removed.append(name)
            except (OSError, ValueError, RecursionError):
                continue  # gone meanwhile, not a regular file, or not a document: not ours to judge
    finally:
        os.close(directory)
    return removed


def _writer_runs(document: object) -> bool:
    """Whether the lock server that wrote ``document`` may still run (True when the document names none)."""
    if not isinstance(document, dict):
        return True
    pid, started = document.get("server_pid"), document.get("server_started")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return True  # a local process's own document (0), or not a lock server's
    if isinstance(started, (int, float)) and not isinstance(started, bool):
        return pidfiles.PidRecord(pid, float(started)).alive()
    return psutil.pid_exists(pid)  # any process with the pid may be the writer


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
            document = json.loads(_read(instance.info_dir / name)[0])
        except (OSError, ValueError, RecursionError):
            continue  # being replaced, not ours, or not to be trusted
        if isinstance(document, dict):
            yield _text_only(document)


def _text_only(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with every string that is not text (a lone surrogate, which JSON's ``\\ud800`` escape makes)
    replaced by one that is (U+FFFD for each): the tools print the documents, the status page sends them to a
    browser, and neither may fail on what a client wrote. Walked with a stack of its own, not recursion."""
    todo: list[Any] = [document]
    while todo:
        node = todo.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            if isinstance(value, str):
                if not value.isascii():
                    try:
                        value.encode("utf-8")
                    except UnicodeEncodeError:
                        node[key] = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            elif isinstance(value, (dict, list)):
                todo.append(value)
        if isinstance(node, dict):
            for key in [k for k in node if not k.isascii()]:
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError:
                    node[key.encode("utf-8", "surrogatepass").decode("utf-8", "replace")] = node.pop(key)
    return document


def _read(path: Path | str, directory: int | None = None) -> tuple[bytes, os.stat_result]:
    """A document of proc/info (``path`` in the directory open as ``directory``, if given) and its file's
    status, read as the untrusted input it is: no symlink, no other file type, no more than MAX_DOCUMENT
    bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | trusted.NOFOLLOW, dir_fd=directory)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError(f"{path}: not a regular file")
        data = os.read(fd, MAX_DOCUMENT + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_DOCUMENT:
        raise ValueError(f"{path}: longer than {MAX_DOCUMENT} bytes")
    return data, status


def entry_json(entry: Entry, lock_delay: float = 0.0) -> dict[str, Any]:
    """A table entry as plain JSON values (for snapshots and dls-dump --json); a kept lock (state "kept")
    also says when it is freed unless reclaimed (``expires``, from the table's ``lock_delay``). ``state`` is
    the slot's (granted, waiting, kept, deadlock: what a reader of an earlier version knows); ``request``
    says what it is in its resource's queues (``queues.STATES``: a waiting slot that converts its owner's
    lock is "converting", a deadlock's "refused"), ``converting`` and ``block_valid`` the slot's flags,
    ``token`` a granted lock's fencing token."""
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
        "token": s.token,
        "converting": bool(s.flags & SlotFlag.CONVERTING),
        "block_valid": not s.flags & SlotFlag.BLOCK_NOT_VALID,
    }
    document["request"] = queues.request_state(document)
    if s.state == SlotState.KEPT:
        document["expires"] = s.timestamp + lock_delay
    return document

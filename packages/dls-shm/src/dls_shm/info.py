"""The lock-information files in proc/info, and the JSON form of table entries.

The table knows inodes and keys; only a client knows file names. Clients (or
their lock servers) write what they know to ``proc/info/<port>`` as one JSON
document, and the utilities join it with the table. Both sides of that join
use this module, so the format lives in one place.

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
from typing import Any

from . import modes, trusted
from .instance import Instance
from .layout import SlotFlag, SlotState, unpack_ip
from .table import Entry

FORMAT = 1
#: A document longer than this is not read: proc/info is written by the application's processes too
#: (mode 03770 in the service's group), so what is in it is their word, not the service's.
MAX_DOCUMENT = 1 << 20


def info_path(instance: Instance, port: int) -> Path:
    return instance.info_dir / str(port)


def write(instance: Instance, port: int, document: dict[str, Any]) -> Path:
    """Replace the port's information file atomically (readers never see half of it): made here 0640, with
    O_EXCL and never through a symlink."""
    document = {**document, "format": FORMAT, "port": port}
    path = info_path(instance, port)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    trusted.write_new(path, json.dumps(document, sort_keys=True).encode())
    return path


def remove(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def read_all(instance: Instance) -> Iterator[dict[str, Any]]:
    """Every readable information document of the instance, by port order."""
    try:
        names = sorted(os.listdir(instance.info_dir), key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0))
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

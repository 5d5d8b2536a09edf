"""OS file locks as lock entries: what show-item-locks and ``jdls -dvL`` show of a service without a table.

A lock table entry says who holds what; an OS file lock says far less. The
kernel knows the holder's pid, the lock file (whose name gives the locked
file's inode and device, ``oslocks.lock_file_name``) and the byte locked, which
is a digest of the record key (``oslocks.key_offset``): the key itself is not
there. The key, the file name, the port and the address are in the holder's
proc/info document (a local process writes its own, pid = the holder; a lock
server writes its remote client's, server_pid = the holder). So each OS lock is
joined with the document of its holder whose lock on the same inode has a key
whose byte is the one locked, and made into an entry of the form
``info.entry_json`` gives a table slot, so that the utilities build their rows
from either alike.

A lock no document of its holder explains (its process has not published yet,
or is not one of ours) is still shown: its pid, inode and device, and the key
another document names for that byte of that file (a waiter's), else the byte.
Waiting requests are not in the kernel's list (OsLocks never blocks in the
kernel): they come from the documents' "waiting" locks, and only when the
caller says OS locks are the service's record-lock mechanism (without a table
a waiting request cannot be the table's).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from . import modes
from .mechanism import resource_value, stored_key
from .oslocks import LOCK_FILE_PREFIX, key_offset
from .proc_locks import OsLock, oslocks_held

#: The address an OS lock's holder is shown with when no document names it.
UNKNOWN_ADDRESS = "-"


def lock_file_ids(name: str) -> tuple[int, int] | None:
    """(inode, device) of a lock file's name ``jlock_XXXXXXXX_YYYYYYYY`` (device ffffffff is -1), or None."""
    if not name.startswith(LOCK_FILE_PREFIX):
        return None
    try:
        inode_text, device_text = name[len(LOCK_FILE_PREFIX):].split("_")
        inode, device = int(inode_text, 16), int(device_text, 16)
    except ValueError:
        return None
    return inode, (device - (1 << 32) if device >= 1 << 31 else device)


def _key_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _document_locks(doc: Mapping[str, Any], state: str) -> list[Mapping[str, Any]]:
    locks = doc.get("locks")
    if not isinstance(locks, list):
        return []
    return [lk for lk in locks if isinstance(lk, Mapping) and lk.get("state") == state
            and isinstance(lk.get("inode"), int) and isinstance(lk.get("key"), str)]


def _entry(index: int, *, state: str, mode: str, pid: int, inode: int, device: int, key: str, long_key: bool,
           doc: Mapping[str, Any] | None, thread: int, timestamp: float) -> dict[str, Any]:
    """An entry of ``info.entry_json``'s form (group 0: OS locks have no groups; ``mechanism`` says whose)."""
    port = doc.get("port") if doc is not None else None
    ip = doc.get("ip") if doc is not None else None
    client_pid = doc.get("pid") if doc is not None else None
    value = resource_value(inode, device, stored_key(_key_bytes(key))[0]) if doc is not None else 0
    return {
        "index": index, "group": 0, "value": value, "state": state, "mode": mode, "pid": pid,
        "port": port if isinstance(port, int) else 0,
        "client_pid": client_pid if isinstance(client_pid, int) else pid,
        "ip": ip if isinstance(ip, str) and ip else UNKNOWN_ADDRESS, "thread": thread, "inode": inode,
        "device": device, "queued": 0, "timestamp": timestamp, "key": key, "long_key": long_key,
        "mechanism": "oslocks",
    }


def _holder_documents(documents: Iterable[Mapping[str, Any]]) -> dict[int, list[Mapping[str, Any]]]:
    """The documents by the pid that holds their OS locks: the lock server's for a remote client, else the
    process's own."""
    by_pid: dict[int, list[Mapping[str, Any]]] = {}
    for doc in documents:
        server_pid, pid = doc.get("server_pid"), doc.get("pid")
        holder = server_pid if isinstance(server_pid, int) and server_pid > 0 else pid
        if isinstance(holder, int) and holder > 0:
            by_pid.setdefault(holder, []).append(doc)
    return by_pid


def oslock_entries(locks: Iterable[OsLock], documents: Iterable[Mapping[str, Any]], *,
                   waiting: bool) -> list[dict[str, Any]]:
    """Entries for ``locks`` (held), explained by ``documents`` where they can be; with ``waiting``, also the
    documents' waiting requests."""
    documents = list(documents)
    by_pid = _holder_documents(documents)
    entries: list[dict[str, Any]] = []
    for lock in locks:
        ids = lock_file_ids(lock.path.name)
        if ids is None:
            continue
        inode, device = ids
        found = False
        for doc in by_pid.get(lock.pid, ()):
            for lk in _document_locks(doc, "held"):
                if lk["inode"] == inode and lock.start <= key_offset(_key_bytes(lk["key"])) <= lock.end:
                    entries.append(_entry(
                        len(entries), state="granted", mode=_mode(lk.get("mode"), lock.write), pid=lock.pid,
                        inode=inode, device=device, key=lk["key"], long_key=False, doc=doc,
                        thread=_thread(lk), timestamp=0.0))
                    found = True
        if not found:
            key = _named_key(documents, inode, lock)
            entry = _entry(len(entries), state="granted", mode=_mode(None, lock.write), pid=lock.pid, inode=inode,
                           device=device, key=key or f"(byte {lock.start})", long_key=False, doc=None, thread=0,
                           timestamp=0.0)
            if key is not None:
                entry["value"] = resource_value(inode, device, stored_key(_key_bytes(key))[0])
            entries.append(entry)
    if waiting:
        for doc in documents:
            updated = doc.get("updated")
            holder = doc.get("server_pid") or doc.get("pid")
            for lk in _document_locks(doc, "waiting"):
                entries.append(_entry(
                    len(entries), state="waiting", mode=_mode(lk.get("mode"), True),
                    pid=holder if isinstance(holder, int) else 0, inode=lk["inode"], device=-1, key=lk["key"],
                    long_key=False, doc=doc, thread=_thread(lk),
                    timestamp=float(updated) if isinstance(updated, (int, float)) else 0.0))
    return entries


def _named_key(documents: list[Mapping[str, Any]], inode: int, lock: OsLock) -> str | None:
    """The key whose byte ``lock`` covers, as any document names it (a waiter's, say), for a lock whose holder
    has no document: the holder stays unknown, the record does not."""
    for doc in documents:
        for state in ("held", "waiting"):
            for lk in _document_locks(doc, state):
                if lk["inode"] == inode and lock.start <= key_offset(_key_bytes(lk["key"])) <= lock.end:
                    return str(lk["key"])
    return None


def _thread(lock: Mapping[str, Any]) -> int:
    thread = lock.get("thread")
    return thread if isinstance(thread, int) else 0


def _mode(name: object, write: bool) -> str:
    """The mode a document names (when it is one), else what the OS lock's type says: EX or PR."""
    if isinstance(name, str):
        try:
            return modes.NAMES[modes.parse(name)]
        except (KeyError, ValueError):
            pass
    return "EX" if write else "PR"


def entries_of(directory: str | os.PathLike[str], documents: Iterable[Mapping[str, Any]], *,
               waiting: bool) -> list[dict[str, Any]]:
    """The OS record locks held in ``directory`` (and, with ``waiting``, the requests waiting for them) as
    entries; OSError when /proc/locks cannot be read."""
    return oslock_entries(oslocks_held(directory), documents, waiting=waiting)


__all__ = ["UNKNOWN_ADDRESS", "entries_of", "lock_file_ids", "oslock_entries"]

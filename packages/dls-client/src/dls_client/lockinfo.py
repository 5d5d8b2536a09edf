"""What a client knows of its own locks, for ``proc/info/<port>@<address>`` of the lock server's instance.

The lock table holds inodes and keys only; the client knows the names of the
files it locks records in, and which locks it holds and waits for. Each client
keeps that in a ``LockInfo`` record. Taking or releasing a lock only updates the
record in memory (a dict insert or delete) and marks it changed; the record is
published, and only when it changed, at the moments jDLS publishes it:

- when the client is initialised (connected, or attached to the table);
- when a lock request starts waiting, and when it stops waiting (granted or not): for a Client, when its
  lock server says the request waits (its first Waiting message, 50 ms into the wait: a lock handed on
  sooner publishes nothing) and when the wait ends;
- when a lock is taken in a file this client had not locked in before: once per
  file and process, so that the file's name shows (show-item-locks' FILENAME,
  list-open-files) for a process that never calls ``publish_info()``, such as
  ``dls-lock``, while a lock/unlock loop on known files publishes nothing;
- when the application says so with ``publish_info()``, as before reading input
  or going to sleep, so that what others see is current while it idles.

A remote ``Client`` sends the document to its lock server (InfoPut), which adds
the address, pid and host and writes the file, and removes it when the client
disconnects. A ``LocalClient`` writes the file itself (see dls_shm.info) and
removes it on ``close()`` and at normal process exit. The document is a
snapshot: a process that dies abnormally may leave its file behind.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

from dls_proto import Mode

try:
    from _json import encode_basestring_ascii as _json_text  # what json.dumps writes a string with
except ImportError:  # a Python without the json module's C part
    from json.encoder import encode_basestring_ascii as _json_text

#: One lock of the record: (path, inode, key, mode, thread).
Entry = tuple[str, int, bytes, int, int]

_MODE_NAMES = {m.value: m.name for m in Mode}


def _key_text(key: bytes) -> str:
    # as dls_shm.info.entry_json shows a table key, so the utilities can match them
    return key.decode("utf-8", "backslashreplace")


class LockInfo:
    """Files, held locks and waiting requests of one client, and whether they changed since published."""

    __slots__ = ("_publish_lock", "_tokens", "changed", "files", "held", "waiting")

    def __init__(self) -> None:
        #: Files the client has locked records in: inode -> path.
        self.files: dict[int, str] = {}
        #: Held locks by handle.
        self.held: dict[int, Entry] = {}
        #: Requests waiting for a lock, by a token of the request.
        self.waiting: dict[int, Entry] = {}
        #: Set by every change; cleared when a document is taken for publishing.
        self.changed = True
        self._tokens = itertools.count(1)
        #: Re-entrant: a failure found while publishing connects again, which publishes again.
        self._publish_lock = threading.RLock()

    # -- changes: cheap, in memory only -------------------------------------------------

    def granted(self, handle: int, path: str, inode: int, key: bytes, mode: int, thread: int) -> bool:
        """Record a lock taken; True when its file is one this client had not locked in before (the caller
        then publishes, so that a file's name is known from its first lock on: see the module)."""
        self.held[handle] = (path, inode, key, mode, thread)
        self.changed = True
        if inode not in self.files:
            self.files[inode] = path
            return True
        return False

    def released(self, handle: int) -> None:
        if self.held.pop(handle, None) is not None:
            self.changed = True

    def released_all(self, thread: int | None = None) -> None:
        """Every held lock is gone (``thread`` None), or every lock of that thread."""
        if thread is None:
            self.held.clear()
        else:
            for handle, entry in list(self.held.items()):
                if entry[4] == thread:
                    self.held.pop(handle, None)
        self.changed = True

    def wait_started(self, path: str, inode: int, key: bytes, mode: int, thread: int) -> int:
        """A request started waiting: its token, for ``wait_ended``."""
        token = next(self._tokens)
        if inode not in self.files:
            self.files[inode] = path
        self.waiting[token] = (path, inode, key, mode, thread)
        self.changed = True
        return token

    def wait_ended(self, token: int) -> None:
        if self.waiting.pop(token, None) is not None:
            self.changed = True

    # -- publishing ---------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        """The record as the JSON object of proc/info (files and locks; the writer adds the rest)."""
        files = list(self.files.items())
        held = list(self.held.values())
        waiting = list(self.waiting.values())
        return {
            "files": [{"path": path, "inode": inode} for inode, path in files],
            "locks": [_lock(e, "held") for e in held] + [_lock(e, "waiting") for e in waiting],
        }

    def publish(self, write: Callable[[dict[str, Any]], None], *, force: bool = False) -> bool:
        """Hand the document to ``write`` if the record changed since last time (or ``force``).

        True when written. If ``write`` raises, the record stays changed.
        """
        with self._publish_lock:
            if not (self.changed or force):
                return False
            self.changed = False
            try:
                write(self.document())
            except BaseException:
                self.changed = True
                raise
            return True


def to_json(value: Any) -> str:
    """``json.dumps(value)`` (the same text) for what a document holds: objects with text keys, lists, text,
    integers. Not json itself: importing it (its decoder's and encoder's regular expressions) cost every
    client's start-up a millisecond, for the one call a document needs."""
    if isinstance(value, str):
        return _json_text(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__repr__(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json_text(key)}: {to_json(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(to_json, value)) + "]"
    raise TypeError(f"a lock information document holds no {type(value).__name__}")


def _lock(entry: Entry, state: str) -> dict[str, Any]:
    path, inode, key, mode, thread = entry
    return {"path": path, "inode": inode, "key": _key_text(key), "mode": _MODE_NAMES.get(mode, str(mode)),
            "state": state, "thread": thread}


__all__ = ["LockInfo", "to_json"]

"""A granted lock, and how the client names what it locks: the vocabulary every client shares.

The clients (remote ``Client``, ``LocalClient``) are factories of ``HeldLock``:
a HeldLock knows only how to be released, through the client that took it, so
connection, retry and failover stay in the client (the shape of kazoo's lock
recipe and redis-py's lock).
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Literal, NamedTuple, Protocol

from dls_proto import Mode

from .errors import DlsError

#: The device number of every record lock: device numbers of a shared file differ from host to
#: host, so only the inode names the file (the table shows the device as -1).
REMOTE_DEVICE = -1

Key = str | bytes
#: Whose record lock it is (JDLS LOCK=): the application's own ("internal") or an external driver's.
LockKind = Literal["internal", "external"]


class FileRef(NamedTuple):
    """A file as the lock service knows it: its inode, and its name for display."""

    inode: int
    path: str

    @classmethod
    def of(cls, file: FileLike) -> FileRef:
        """``file`` itself if a FileRef, else the FileRef of the path (DlsError when it cannot be stat'ed)."""
        if isinstance(file, FileRef):
            return file
        try:
            return cls(os.stat(file).st_ino, os.fspath(file))
        except OSError as exc:
            raise DlsError(f"cannot lock records of {os.fspath(file)!r}: {exc.strerror}") from None


FileLike = FileRef | str | os.PathLike[str]


def key_bytes(key: Key) -> bytes:
    """A record key as the service stores it: bytes, a str encoded as UTF-8."""
    return key if isinstance(key, bytes) else key.encode("utf-8")


def describe(path: str, key: bytes) -> str:
    """How messages name a record lock: its file and key."""
    return f"{path} {key.decode('utf-8', 'replace')}"


class Unlocker(Protocol):
    """What a held lock needs of the client that took it: a way to let it go."""

    def unlock(self, handle: int) -> None: ...


class HeldLock:
    """A granted lock. Release it with ``release()`` or by leaving its ``with`` block."""

    __slots__ = ("client", "file", "handle", "key", "mode", "released", "value")

    def __init__(self, client: Unlocker, handle: int, file: FileRef, key: bytes, mode: int, value: int) -> None:
        self.client = client
        self.handle = handle
        self.file = file
        self.key = key
        self.mode = mode
        self.value = value
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.client.unlock(self.handle)

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<HeldLock {self.file.path}:{self.key!r} {Mode(self.mode).name} 0x{self.value:08x}>"

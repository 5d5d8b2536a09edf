"""Pid files: which process plays which role, checked so that a reused pid is never signalled.

A pid file holds two lines: the pid and the process's start time as psutil
reports it. A record is believed only while a process with that pid exists,
is not a zombie and started at that time; anything else is stale. That
read-only part (format, ``read``, ``PidRecord.alive``) is dls_shm.pidfiles,
shared with dls-utils and re-exported here; this module writes, locks and
removes pid files.

The monitor and the listener also hold their pid file locked (``fcntl.lockf``)
for as long as they live. The lock, not the file's content, decides whether a
second ``jdls -ib`` may start: the kernel drops it when the process dies, so a
killed daemon never blocks its successor and two starters can never both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from dls_shm.pidfiles import SAME_START, PidRecord, read, record_of, server_pid_file, servers_dir

__all__ = [
    "SAME_START", "AlreadyRunning", "HeldPidFile", "PidRecord", "read", "record_of", "remove", "running",
    "server_pid_file", "servers_dir", "write",
]


def write(path: Path, record: PidRecord) -> None:
    """Write a pid file atomically: a reader sees the old file, the new one, or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(record.text())
    os.replace(tmp, path)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def running(path: Path) -> PidRecord | None:
    """The live process a pid file names, else None (a stale file is removed on the way).

    For a locked pid file the lock has the last word: a file still locked by
    its holder is never removed, even if its content cannot be read yet.
    """
    record = read(path)
    if record is not None and record.alive():
        return record
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _settled(path, record)  # its holder is alive, perhaps still writing it
        if _same_file(fd, path):
            remove(path)
        return None
    finally:
        os.close(fd)


def _settled(path: Path, record: PidRecord | None, patience: float = 0.5) -> PidRecord | None:
    """The record a locked pid file's holder is writing: read again for a moment until it is live."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        time.sleep(0.01)
        fresh = read(path)
        if fresh is not None and fresh.alive():
            return fresh
    return record


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


class AlreadyRunning(Exception):
    """Another process holds the pid file; ``record`` names it when it could be read."""

    def __init__(self, record: PidRecord | None) -> None:
        super().__init__(f"pid {record.pid}" if record else "pid unknown")
        self.record = record


class HeldPidFile:
    """The pid file of a running monitor or listener, locked until ``release``.

    The lock belongs to the process that took it: a forked child neither holds
    nor releases it, so the child should just ``close_in_child``.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path) -> HeldPidFile:
        """Lock the pid file and write this process into it; AlreadyRunning if another holds it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise AlreadyRunning(read(path)) from None
            if _same_file(fd, path):
                break
            os.close(fd)  # removed as stale between our open and our lock: start again
        os.ftruncate(fd, 0)
        os.pwrite(fd, record_of(os.getpid()).text().encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the file and drop the lock (in that order, so no successor's file is removed)."""
        if self._fd < 0:
            return
        remove(self.path)
        os.close(self._fd)
        self._fd = -1

    def close_in_child(self) -> None:
        """Forget the file in a forked child without touching the parent's lock or file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

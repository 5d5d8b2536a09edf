"""Pid files of an instance, read-only: their format, reading them, and whether what they name still runs.

The daemon (dls_daemon.pidfile) writes, locks and removes pid files; the
operator tools (dls_utils.service) only read them. Both read them here, so
the two can never disagree about the format or about when a record is stale.

A pid file holds two lines: the pid and the process's start time as psutil
reports it. A record is believed only while a process with that pid exists,
is not a zombie and started at that time; anything else is stale. The lock
monitor and the lock listener hold their pid file locked (``fcntl.lockf``)
while they live: ``lock_holder`` tests that lock (F_GETLK) without taking it.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil

from .instance import Instance

#: Two start times closer than this are the same process (both come from /proc).
SAME_START = 0.05
#: struct flock on Linux (l_type, l_whence, l_start, l_len, l_pid) with its padding.
_FLOCK = struct.Struct("hhqqi4x")


def servers_dir(instance: Instance) -> Path:
    """Where the lock servers' pid files are: one file per running lock server."""
    return instance.run_dir / "servers"


def server_pid_file(instance: Instance, pid: int) -> Path:
    return servers_dir(instance) / f"{pid}.pid"


@dataclass(frozen=True)
class PidRecord:
    pid: int
    started: float

    def alive(self) -> bool:
        """True while this very process (not a later one with the same pid) still runs."""
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return bool(abs(proc.create_time() - self.started) < SAME_START)
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True  # another user's process with this pid: assume it is ours

    def text(self) -> str:
        """The pid file's content for this record."""
        return f"{self.pid}\n{self.started:.6f}\n"


def record_of(pid: int) -> PidRecord:
    """The record of a running process (``os.getpid()`` for this one)."""
    return PidRecord(pid, psutil.Process(pid).create_time())


def read(path: Path) -> PidRecord | None:
    """The record in a pid file; None when there is no file or it is not (yet) complete.

    Other errors (a file that may not be read) are raised.
    """
    try:
        lines = path.read_text().split()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return PidRecord(int(lines[0]), float(lines[1]))
    except (IndexError, ValueError):
        return None


def lock_holder(path: Path) -> int | None:
    """The pid holding a POSIX lock on the file (as lockf takes it), else None; tested, never taken."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
        l_type, _, _, _, l_pid = _FLOCK.unpack(answer)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if l_type == fcntl.F_UNLCK else int(l_pid)

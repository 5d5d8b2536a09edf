"""Pid files: which process plays which role, checked so that a reused pid is never signalled.

The daemon writes and locks them, ``jdls -k``/``-K``/``-d`` read them and
remove stale ones, and the operator tools of dls-utils only read them; they
all do it here, so they can never disagree about the format or about when a
record is stale.

A pid file holds three lines: the pid, the process's start time as psutil
reports it, and its command name. A record is believed only while a process
with that pid exists, is not a zombie, started at that time and runs that
command; anything else is stale, and ``impostor`` says why a live process with
the pid is not the one meant, so nothing is signalled by number alone. (A file
of an older version, without the command, is judged by the start time.) Pid
files are made 0640 in directories only the service writes, opened without
following symlinks, and one writable by others or owned by another user is
refused (``trusted``).

The monitor and the listener also hold their pid file locked (``fcntl.lockf``,
``HeldPidFile``) for as long as they live. The lock, not the file's content,
decides whether a second ``jdls -ib`` may start: the kernel drops it when the
process dies, so a killed daemon never blocks its successor and two starters
can never both win. A lock server's file is not locked: the listener writes it
for its child.

Asking whether a pid file's process runs comes in two kinds, on purpose.
``running`` is jdls's, which owns the instance: it tests the lock by taking it
and removes a stale file on the way. ``running_pid`` is the operator tools':
it only reads, testing the lock with F_GETLK (``lock_holder``) without taking
it, so a monitor starting at that moment is never disturbed and another user's
file needs no write access.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import trusted

#: Two start times closer than this are the same process (both come from /proc).
SAME_START = 0.05
#: struct flock on Linux (l_type, l_whence, l_start, l_len, l_pid) with its padding.
_FLOCK = struct.Struct("hhqqi4x")
#: The unit of /proc/PID/stat's start time.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class PidRecord:
    """What a pid file says: a pid and the start time that tells that process from a later one with its pid."""

    pid: int
    started: float
    #: The process's command name (psutil's ``name()``); empty in a file of an older version.
    command: str = ""

    def alive(self) -> bool:
        """True while this very process (not a later one with the same pid) still runs."""
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return self._mismatch(proc) is None
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True  # another user's process with this pid: assume it is ours

    def impostor(self) -> str | None:
        """Why the live process with this pid is not the one the record means, or None (gone, or the one)."""
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return self._mismatch(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def _mismatch(self, proc: psutil.Process) -> str | None:
        started = proc.create_time()
        if abs(started - self.started) >= SAME_START:
            return (f"pid {self.pid} is now a process started at {started:.2f} ({proc.name()}), not the one "
                    f"started at {self.started:.2f}")
        if self.command and proc.name() != self.command:
            return f"pid {self.pid} runs {proc.name()!r}, not {self.command!r}"
        return None

    def text(self) -> str:
        """The pid file's content for this record."""
        return f"{self.pid}\n{self.started:.6f}\n{self.command}\n"


def record_of(pid: int, command: str | None = None) -> PidRecord:
    """The record of a running process (``os.getpid()`` for this one).

    A caller that knows the process's command (a forked child runs its parent's) gives it: the start time
    is then read from ``/proc/PID/stat`` as psutil reads it, without psutil's machinery, which a listener
    forking a lock server per client would otherwise run for each: every object it touches is a page the
    lock server cannot share (see dls_daemon.listener).
    """
    if command is None:
        proc = psutil.Process(pid)
        return PidRecord(pid, proc.create_time(), proc.name())
    return PidRecord(pid, _start_time(pid), command)


def _start_time(pid: int) -> float:
    """psutil's ``Process(pid).create_time()``: the start field of /proc/PID/stat (clock ticks since boot, the 20th
    field after the command's closing parenthesis) plus the boot time; psutil.NoSuchProcess when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise psutil.NoSuchProcess(pid) from None
    ticks = int(data[data.rfind(b")") + 2:].split()[19])
    return ticks / _CLOCK_TICKS + psutil.boot_time()


def read(path: Path) -> PidRecord | None:
    """The record in a pid file; None when there is no file or it is not (yet) complete.

    Other errors (a file that may not be read, a symlink, a file writable by
    others or owned by a user other than root, this one or the directory's
    owner: ``trusted.Untrusted``) are raised.
    """
    try:
        owners = trusted.trusted_owners(os.stat(path.parent).st_uid)
        fd = trusted.open_file(path, os.O_RDONLY, owners=owners)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        lines = os.read(fd, 4096).decode().split("\n")
    finally:
        os.close(fd)
    try:
        return PidRecord(int(lines[0]), float(lines[1]), lines[2].strip() if len(lines) > 2 else "")
    except (IndexError, ValueError):
        return None


def read_or_none(path: Path) -> PidRecord | None:
    """The record in a pid file; None also when the file cannot be read or decoded (never raises)."""
    try:
        return read(path)
    except (OSError, ValueError):  # ValueError: UnicodeDecodeError of a file that is not text
        return None


def write(path: Path, record: PidRecord) -> None:
    """Write a pid file atomically (a reader sees the old file, the new one, or none), made 0640 here."""
    trusted.make_parent(path)
    trusted.write_new(path, record.text().encode())


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def running(path: Path) -> PidRecord | None:
    """The live process a pid file names, else None (a stale file is removed on the way).

    For a locked pid file the lock has the last word: a file still locked by
    its holder is never removed, even if its content cannot be read yet.
    """
    record = read(path)
    holder = lock_holder(path)
    if holder is not None and (record is None or record.pid != holder):
        # The lock has the last word: the process holding the file is the one it is for, whatever the file
        # says (it may still be writing it; a file naming another process was not written by it).
        settled = _settled(path, record)
        if settled is not None and settled.pid == holder:
            return settled
        try:
            return record_of(holder)
        except psutil.Error:  # it ended meanwhile
            return None
    if record is not None and record.alive():
        return record
    try:
        fd = trusted.open_file(path, os.O_RDWR)
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


def running_pid(path: Path) -> int | None:
    """Read only: the pid of the live process a pid file names, else None; nothing is removed or locked.

    A file locked by a live holder counts as running even when its record is
    stale or not written yet; the pid is then the record's if it has one (as
    ``running`` answers), else the lock holder's.
    """
    record = read_or_none(path)
    if record is not None and record.alive():
        return record.pid
    holder = lock_holder(path)
    if holder is None:
        return None
    return record.pid if record is not None else holder


def lock_holder(path: Path) -> int | None:
    """The pid holding a POSIX lock on the file (as lockf takes it), else None; tested, never taken."""
    try:
        fd = os.open(path, os.O_RDONLY | trusted.NOFOLLOW)
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
        trusted.make_parent(path)
        while True:
            fd = trusted.open_file(path, os.O_RDWR | os.O_CREAT)
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

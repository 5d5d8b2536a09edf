"""Who holds OS file locks in a lock directory, as /proc/locks tells it: the monitor's look.

Before a monitor lets its new lock table serve an instance, it must know that
no OS record lock of the instance is held: such a lock was granted outside the
table, and the table would grant the same record again ("one mechanism per
instance", see ``oslocks``). Its holders need not be the instance's processes
(a local process locks directly), so they are found the way the kernel knows
them: /proc/locks lists every file lock of the system, one per line::

    1: POSIX  ADVISORY  WRITE 5491 fe:00:2146593 5 5
    2: -> POSIX  ADVISORY  WRITE 5502 fe:00:2146593 5 5

(number, kind, advisory or mandatory, read or write, the holder's pid,
``major:minor:inode`` of the file with major and minor in hexadecimal, the
range). A line with ``->`` is a request blocked behind the lock above it, not a
holder; OsLocks never blocks in the kernel. The lines are matched against the
lock files of the directory (their names start with LOCK_FILE_PREFIX) by device
and inode, read with ``scandir`` (no ``stat`` per file: lock files are regular
files of the directory's own file system). A pid is the holder's in this
process's pid namespace: 0 (or -1, an open file description lock) when it has
none there. One lock is skipped: an open-file-description write lock of the
whole file (``OFDLCK ... WRITE ... 0 EOF``) is what a lock file's last user
takes for the moment of removing it (``oslocks``), and holds no record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from .oslocks import LOCK_FILE_PREFIX

PROC_LOCKS = Path("/proc/locks")


class OsLockHolder(NamedTuple):
    """One OS lock held on a lock file: its holder's pid (0 or less: unknown) and the lock file."""

    pid: int
    path: Path


class OsLock(NamedTuple):
    """One OS lock held on a lock file, as /proc/locks tells it: the holder's pid, the lock file, whether it is
    a write lock, and the bytes it covers (``start`` to ``end`` inclusive; the kernel joins a process's
    neighbouring locks of one type into one line)."""

    pid: int
    path: Path
    write: bool
    start: int
    end: int


def _lock_files(directory: Path) -> dict[tuple[int, int, int], Path]:
    """The lock files of ``directory`` by (major, minor, inode) of their device; none when it does not exist."""
    try:
        device = os.stat(directory).st_dev
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return {}
    major, minor = os.major(device), os.minor(device)
    return {
        (major, minor, entry.inode()): Path(entry.path)
        for entry in entries
        if entry.name.startswith(LOCK_FILE_PREFIX) and entry.is_file(follow_symlinks=False)
    }


def oslocks_held(directory: str | os.PathLike[str], locks: Path | None = None) -> list[OsLock]:
    """Every OS lock held on a lock file of ``directory`` (one entry per /proc/locks line, in its order; the
    list to read is ``locks``, default /proc/locks).

    OSError when the list cannot be read: the caller cannot know, and must not guess that none is held.
    """
    files = _lock_files(Path(directory))
    if not files:
        return []
    found = []
    for line in (locks or PROC_LOCKS).read_text(encoding="ascii", errors="replace").splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[1] == "->" or (fields[1:4] == ["OFDLCK", "ADVISORY", "WRITE"] \
                and fields[6:8] == ["0", "EOF"]):
            continue
        try:
            pid = int(fields[4])
            major, minor, inode = fields[5].split(":")
            where = (int(major, 16), int(minor, 16), int(inode))
            start = int(fields[6])
            end = (1 << 63) - 1 if fields[7] == "EOF" else int(fields[7])
        except ValueError:
            continue  # "<none>" for a file the kernel cannot name, or a layout not known here
        path = files.get(where)
        if path is not None and _still_there(path, where[2]):
            found.append(OsLock(pid, path, fields[3] == "WRITE", start, end))
    return found


def oslock_holders(directory: str | os.PathLike[str], locks: Path | None = None) -> list[OsLockHolder]:
    """Every OS lock held on a lock file of ``directory``, by holder and file (see ``oslocks_held``)."""
    return [OsLockHolder(lock.pid, lock.path) for lock in oslocks_held(directory, locks)]


def _still_there(path: Path, inode: int) -> bool:
    """The lock file still has the inode it had when the directory was read. A lock file is removed with its
    last lock (``oslocks``) and its inode number may then be reused by any new file of the file system, whose
    locks (another program's pid file, say) are none of ours; a lock on the removed file itself is one its
    taker drops again when it sees the file gone."""
    try:
        return os.stat(path, follow_symlinks=False).st_ino == inode
    except OSError:
        return False

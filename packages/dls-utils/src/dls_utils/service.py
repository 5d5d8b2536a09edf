"""What the system says about an instance, read without the daemon's code: its processes and its IPC.

dls-dump and dls-ipcrm need to know whether the instance's lock monitor and
lock listener run, and who has the lock table attached. The daemon keeps that
in pid files and the kernel in /proc; dls-utils never imports dls_daemon, so
this module reads the same files the way ``jdls -d`` and ``jdls -K`` do,
but only reads: a stale pid file is left where it is, and a pid file's lock is
tested (F_GETLK), never taken, so a monitor starting at that moment is not
disturbed.

Pid file format (the daemon's, dls_daemon.pidfile): two lines, the pid and
the process's start time as psutil reports it; the monitor and listener hold
their file locked (``lockf``) while they live. A record is believed when a
process with that pid started at that time, or when the file is locked.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pwd
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil
from dls_shm import Instance

#: The two long-lived processes of a service, by pid file role and the label messages use.
ROLES = (("monitor", "lock monitor"), ("listener", "lock listener"))
#: Two start times closer than this are the same process (as dls_daemon.pidfile decides).
SAME_START = 0.05
PROC = Path("/proc")
SHM_LIST = PROC / "sysvipc" / "shm"
SEM_LIST = PROC / "sysvipc" / "sem"
#: struct flock on Linux (l_type, l_whence, l_start, l_len, l_pid) with its padding.
_FLOCK = struct.Struct("hhqqi4x")


@dataclass(frozen=True)
class Running:
    """A live process of the service: its label ("lock monitor") and pid (0 when not readable yet)."""

    label: str
    pid: int

    def __str__(self) -> str:
        return f"{self.label} (pid {self.pid})" if self.pid else f"{self.label} (pid unknown)"


def _record(path: Path) -> tuple[int, float] | None:
    try:
        fields = path.read_text().split()
        return int(fields[0]), float(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def started_at(pid: int, started: float) -> bool:
    """True while the process ``pid`` that started at ``started`` (not a later one) runs."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - started) < SAME_START
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # another user's process with this pid: assume it is the one


def alive(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


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


def running_pid(path: Path) -> int | None:
    """The pid of the live process a pid file names (0 if locked but not readable), else None."""
    record = _record(path)
    if record is not None and started_at(*record):
        return record[0]
    holder = lock_holder(path)
    if holder is None:
        return None
    return record[0] if record is not None else holder


def running_roles(instance: Instance) -> list[Running]:
    """The instance's lock monitor and lock listener that run, from their pid files."""
    found = []
    for role, label in ROLES:
        pid = running_pid(instance.pid_file(role))
        if pid is not None:
            found.append(Running(label, pid))
    return found


def running_servers(instance: Instance) -> list[Running]:
    """The live lock servers listed in run/servers (stale files are left alone)."""
    found = []
    for path in sorted((instance.run_dir / "servers").glob("*.pid")):
        record = _record(path)
        if record is not None and path.name == f"{record[0]}.pid" and started_at(*record):
            found.append(Running("lock server", record[0]))
    return found


@dataclass(frozen=True)
class IpcObject:
    """A SysV shared memory segment or semaphore set as /proc/sysvipc lists it."""

    kind: str  # "shm" or "sem"
    id: int
    mode: int
    uid: int
    cuid: int
    nattch: int = 0  # shared memory only
    cpid: int = 0  # shared memory only

    @property
    def owner(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    def may_remove(self, euid: int) -> bool:
        """IPC_RMID needs the owner's or creator's uid, or privilege (root here)."""
        return euid == 0 or euid in (self.uid, self.cuid)


def _ipc_list(path: Path, key: int, kind: str) -> IpcObject | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    names = lines[0].split() if lines else []
    for line in lines[1:]:
        row = dict(zip(names, line.split(), strict=False))
        try:
            if int(row["key"]) != key:
                continue
            ident = "shmid" if kind == "shm" else "semid"
            return IpcObject(
                kind, int(row[ident]), int(row["perms"], 8), int(row["uid"]), int(row["cuid"]),
                int(row.get("nattch", 0)), int(row.get("cpid", 0)),
            )
        except (KeyError, ValueError):
            continue
    return None


def shared_memory(key: int) -> IpcObject | None:
    """The shared memory segment with this key, else None."""
    return _ipc_list(SHM_LIST, key, "shm")


def semaphore(key: int) -> IpcObject | None:
    """The semaphore set with this key, else None."""
    return _ipc_list(SEM_LIST, key, "sem")


def command_line(pid: int) -> str:
    """A process's command line (at most 60 characters), else its name, else "?"."""
    proc = PROC / str(pid)
    try:
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip()
        return cmdline.decode(errors="replace")[:60] or (proc / "comm").read_text().strip()
    except OSError:
        return "?"


def attached_pids(shm_id: int) -> list[int]:
    """The processes (other than this one) that have the segment mapped, by pid.

    Linux names SysV mappings ``/SYSV<key>`` in /proc/<pid>/maps, with the
    segment id in the inode column. Processes whose maps cannot be read
    (another user's, unless root) are not found.
    """
    found = []
    me = os.getpid()
    for proc in PROC.iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            with open(proc / "maps", encoding="ascii", errors="replace") as maps:
                if any(
                    len(fields) >= 6 and fields[5].startswith("/SYSV") and fields[4] == str(shm_id)
                    for fields in (line.split() for line in maps)
                ):
                    found.append(int(proc.name))
        except OSError:
            continue
    return sorted(found)


def add_key_option(parser: argparse.ArgumentParser) -> None:
    """``--key``: name a table by its IPC key instead of by the instance (dls-dump, dls-ipcrm)."""
    parser.add_argument("--key", metavar="KEY", type=ipc_key,
                        help="the table's SysV IPC key (0xNNNNNNNN or decimal) instead of the one of "
                        "$DLS_IPC_KEY or $JBCRELEASEDIR")


def ipc_key(text: str) -> int:
    """An argparse type: a SysV IPC key of a table, 0x hex or decimal (as DLS_IPC_KEY takes it)."""
    try:
        key = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid key {text!r}: expected a number such as 0x1a2b3c4d") from None
    if not 0 < key < 1 << 31:
        raise argparse.ArgumentTypeError(f"invalid key {text!r}: must be between 1 and 0x7fffffff")
    return key

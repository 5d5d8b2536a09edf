"""What the system says about an instance, read without the daemon's code: its processes and its IPC.

dls-dump and dls-ipcrm need to know whether the instance's lock monitor and
lock listener run, and who has the lock table attached. The daemon keeps that
in pid files and the kernel in /proc; dls-utils never imports dls_daemon, so
this module reads the same files through dls_shm.pidfiles, the read-only half
of the daemon's pid files (format, reading, liveness) that dls_daemon.pidfile
uses too; but it only reads: a stale pid file is left where it is, and a pid
file's lock is tested (F_GETLK, ``pidfiles.lock_holder``), never taken, so a
monitor starting at that moment is not disturbed. A record is believed when a
process with that pid started at that time, or when the file is locked.
"""

from __future__ import annotations

import argparse
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

import psutil
from dls_shm import Instance, pidfiles
from dls_shm.pidfiles import PidRecord

#: The two long-lived processes of a service, by pid file role and the label messages use.
ROLES = (("monitor", "lock monitor"), ("listener", "lock listener"))
PROC = Path("/proc")
SHM_LIST = PROC / "sysvipc" / "shm"
SEM_LIST = PROC / "sysvipc" / "sem"


@dataclass(frozen=True)
class Running:
    """A live process of the service: its label ("lock monitor") and pid (0 when not readable yet)."""

    label: str
    pid: int

    def __str__(self) -> str:
        return f"{self.label} (pid {self.pid})" if self.pid else f"{self.label} (pid unknown)"


def _record(path: Path) -> PidRecord | None:
    """The record in a pid file; None also when the file cannot be read or decoded (never raises)."""
    try:
        return pidfiles.read(path)
    except (OSError, ValueError):  # ValueError: UnicodeDecodeError of a file that is not text
        return None


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


def running_pid(path: Path) -> int | None:
    """The pid of the live process a pid file names (0 if locked but not readable), else None."""
    record = _record(path)
    if record is not None and record.alive():
        return record.pid
    holder = pidfiles.lock_holder(path)
    if holder is None:
        return None
    return record.pid if record is not None else holder


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
    for path in sorted(pidfiles.servers_dir(instance).glob("*.pid")):
        record = _record(path)
        if record is not None and path.name == f"{record.pid}.pid" and record.alive():
            found.append(Running("lock server", record.pid))
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

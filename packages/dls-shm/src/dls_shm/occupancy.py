"""What the system says about an instance: which of its processes run, and who has its lock table attached.

``jdls -K`` and ``dls-ipcrm`` both remove a table, and must agree on when that
is safe: removing a SysV segment in use only hides it, and its users go on
locking in a table that new processes no longer see. dls-utils never imports
dls-daemon, so the facts both judge by are gathered here, below both: the
instance's pid files (``pidfiles``), and what Linux says in /proc: the maps
that show who has the segment attached, the command lines that name them, and
/proc/sysvipc's lists of the table's IPC objects with their owner, creator,
mode and attach count. Whether this user may remove the objects is decided
from those lists before anything is touched, never from the text of an error.

The tools differ on purpose, and each call says which way it goes:

- ``tidy``: jdls owns the instance, so it removes stale pid files and tests a
  pid file's lock by taking it; dls-ipcrm and dls-dump only read.
- ``pid_files``: a table that ``--key`` names has no pid files here. Its
  header's pids stand in for them: ``service_processes`` (dls-dump) shows them
  active while such a process exists, and dls-ipcrm refuses while one of them
  has the table attached (its own check, on the ``attached`` found here).

They also word, order and exit differently (``jdls -K`` names the first of the
monitor and listener it finds, dls-ipcrm all of them), so ``Occupancy`` holds
the facts and each tool renders them.

Attached processes are found by their ``/SYSV<key>`` mappings, which Linux
lists in /proc/<pid>/maps with the segment id in the inode column. Processes
whose maps cannot be read (another user's, unless root) are counted by the
segment's attach count but not named. That count is of attachments, not
processes (a forked child that attaches again counts twice), so ``others`` is
the larger of the two figures.
"""

from __future__ import annotations

import enum
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import pidfiles
from .instance import LABELS, MONITOR, ROLES, Instance
from .layout import Header
from .pidfiles import PidRecord
from .report import Process

#: How messages name a lock server.
SERVER = "lock server"
PROC = Path("/proc")
SHM_LIST = PROC / "sysvipc" / "shm"
SEM_LIST = PROC / "sysvipc" / "sem"
#: How much of a command line a message shows.
COMMAND_WIDTH = 60


@dataclass(frozen=True)
class Occupant:
    """A live process of an instance, found through its pid file: the lock monitor, listener or a lock server.

    ``record`` is what the pid file says. It is None for a monitor or listener
    found read only, whose file's lock says whether it lives.
    """

    label: str
    pid: int
    path: Path
    record: PidRecord | None

    def __str__(self) -> str:
        return f"{self.label} (pid {self.pid})" if self.pid else f"{self.label} (pid unknown)"

    def alive(self) -> bool:
        """Still this very process: a later one with its pid is not."""
        if self.record is not None:
            return self.record.alive()
        return pidfiles.lock_holder(self.path) is not None


def running_role(instance: Instance, role: str, *, tidy: bool) -> Occupant | None:
    """The instance's monitor or listener (a role of ROLES) if it runs, from its pid file.

    ``tidy`` (jdls): a stale file is removed; else nothing is removed or locked.
    """
    path = instance.pid_file(role)
    if tidy:
        record = pidfiles.running(path)
        return None if record is None else Occupant(LABELS[role], record.pid, path, record)
    pid = pidfiles.running_pid(path)
    return None if pid is None else Occupant(LABELS[role], pid, path, None)


def running_roles(instance: Instance, *, tidy: bool) -> list[Occupant]:
    """The instance's lock monitor and lock listener that run, in that order."""
    found = (running_role(instance, role, tidy=tidy) for role in ROLES)
    return [occupant for occupant in found if occupant is not None]


def running_servers(instance: Instance, *, tidy: bool) -> list[Occupant]:
    """The live lock servers listed in run/servers; ``tidy`` (jdls): the files of those gone are removed.

    Read only, a directory this user may not list names none: they still
    count among the processes that have the table attached.
    """
    found = []
    try:
        paths = sorted(instance.servers_dir.glob("*.pid"))
    except OSError:
        if tidy:
            raise
        paths = []
    for path in paths:
        record = pidfiles.read_or_none(path)
        if record is None or not record.alive():
            if tidy:
                pidfiles.remove(path)
        elif path.name == f"{record.pid}.pid":
            found.append(Occupant(SERVER, record.pid, path, record))
    return found


def process_alive(pid: int) -> bool:
    """A process with this pid exists and is not a zombie (for a pid known without its start time)."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def service_processes(
    instance: Instance, header: Header | None, *, tidy: bool, pid_files: bool = True,
) -> dict[str, Process]:
    """The monitor and the listener as ``jdls -d`` and dls-dump show them, by role.

    With ``pid_files``: the live process of the role's pid file, else the
    header's pid (0 without a table) as inactive. Without (a table of another
    instance): the header's pid, active while a process with that pid exists.
    """
    result = {}
    for role in ROLES:
        stored = 0 if header is None else header.monitor_pid if role == MONITOR else header.listener_pid
        if not pid_files:
            result[role] = Process(stored, process_alive(stored))
            continue
        running = running_role(instance, role, tidy=tidy)
        result[role] = Process(running.pid, True) if running is not None else Process(stored, False)
    return result


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
    """A process's command line (at most COMMAND_WIDTH characters), else its name, else "?"."""
    proc = PROC / str(pid)
    try:
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").strip()
        return cmdline.decode(errors="replace")[:COMMAND_WIDTH] or (proc / "comm").read_text().strip()
    except OSError:
        return "?"


def _mapping_pids(shm_id: int) -> list[int]:
    """The processes (this one too) whose maps show the segment, by pid."""
    found = []
    for proc in PROC.iterdir():
        if not proc.name.isdigit():
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


def maps_a_table(pid: int) -> bool | None:
    """Whether the process has a SysV shared memory segment attached (its maps show ``/SYSV``), None when
    its maps cannot be read (another user's process, or gone).

    A lock server attaches nothing but its instance's table, so this tells one that locks in a table,
    also in one removed under it (``jdls -K -o``), whose key Linux then shows as 0: that table can no
    longer be found by its key, only through the processes that still map it.
    """
    try:
        with open(PROC / str(pid) / "maps", encoding="ascii", errors="replace") as maps:
            return any(len(fields) >= 6 and fields[5].startswith("/SYSV") for fields in (line.split() for line in maps))
    except OSError:
        return None


class Refusal(enum.Enum):
    """Why a table is not removed now, in the order both tools ask: each tool says it in its own words."""

    NOTHING = "no table: nothing to remove"
    LONE = "one of the two IPC objects alone: not a whole table"
    SERVICE = "the monitor or the listener runs (never removed under them, even forced)"
    FORBIDDEN = "this user may not remove an IPC object of it"
    IN_USE = "lock servers run or other processes have it attached (forcing goes past this)"


@dataclass(frozen=True)
class Occupancy:
    """Who occupies an instance's lock table at one moment, and so what stands in the way of removing it.

    The monitor and listener (``roles``) stop even a forced removal; lock
    servers (``servers``) and attached processes (``others``, of which
    ``attached`` could be named) are what ``jdls -K -o`` and ``dls-ipcrm
    --force`` go past; ``forbidden`` is an IPC object this user may not remove.
    This process never counts: a tool may survey before or after attaching.
    """

    key: int
    shm: IpcObject | None
    sem: IpcObject | None
    roles: tuple[Occupant, ...]
    servers: tuple[Occupant, ...]
    attached: tuple[int, ...]
    others: int
    forbidden: IpcObject | None

    @classmethod
    def survey(cls, instance: Instance, *, tidy: bool, pid_files: bool = True) -> Occupancy:
        """Look: ``tidy`` (jdls) removes stale pid files; without ``pid_files`` no process is looked up by one."""
        shm, sem = shared_memory(instance.key), semaphore(instance.key)
        roles = running_roles(instance, tidy=tidy) if pid_files else []
        servers = running_servers(instance, tidy=tidy) if pid_files else []
        mapping = _mapping_pids(shm.id) if shm is not None else []
        me = os.getpid()
        attached = tuple(pid for pid in mapping if pid != me)
        counted = (shm.nattch - (me in mapping)) if shm is not None else 0
        euid = os.geteuid()
        forbidden = next((o for o in (shm, sem) if o is not None and not o.may_remove(euid)), None)
        return cls(instance.key, shm, sem, tuple(roles), tuple(servers), attached,
                   max(counted, len(attached)), forbidden)

    @property
    def missing(self) -> bool:
        """Neither of the table's IPC objects exists."""
        return self.shm is None and self.sem is None

    @property
    def lone(self) -> IpcObject | None:
        """The one IPC object left when the other is gone: not a whole table."""
        if (self.shm is None) == (self.sem is None):
            return None
        return self.shm or self.sem

    @property
    def unidentified(self) -> int:
        """Attached processes counted but not named (their maps could not be read)."""
        return self.others - len(self.attached)

    def refusal(self, *, force: bool, service_pids: Iterable[int] = ()) -> Refusal | None:
        """Why the table must not be removed now, or None: the one decision ``jdls -K`` and dls-ipcrm share.

        ``service_pids``: processes known to be the service's monitor and listener without a pid file
        (a table named by its key alone: its header's pids); one of them attached is the service at work.
        """
        if self.missing:
            return Refusal.NOTHING
        if self.lone is not None:
            return Refusal.LONE
        if self.roles or any(pid and pid in self.attached for pid in service_pids):
            return Refusal.SERVICE
        if self.forbidden is not None:
            return Refusal.FORBIDDEN
        if (self.servers or self.others) and not force:
            return Refusal.IN_USE
        return None

"""Whether the process that took a lock is still there: the question a tidy asks of every lock's owner.

A lock names its owner by pid and says when it was taken (its timestamp). The owner is gone when no
process has the pid, when it is a zombie (its parent may be the very process waiting for the lock), or when
the process that has the pid started after the lock was taken: a stranger that reused the pid.

The start time comes from /proc/<pid>/stat (field 22, clock ticks since boot) plus the boot time of
/proc/stat, as psutil computes it, with the same slack for the boot time's whole seconds. One read per pid:
a tidy of 100,000 locks held by a few processes asks a few times, not 100,000 (``Liveness`` keeps the
answers of one tidy; psutil, asked per lock, made a tidy of a million-lock table take 10 s). A process
whose /proc entry cannot be read (hidepid) but which exists is taken as alive: a lock is never freed on a
guess.

The comparison is of wall-clock times (the boot time of /proc/stat follows the clock), so a step of the
clock forward (NTP, a virtual machine resumed) makes every process look younger than the locks it took
before the step. A process that looks younger than its lock is therefore judged a stranger only if it does
not have the table's segment attached: whoever took a table lock has (a LocalClient, a lock server), and
another dls process that reused the pid keeps the lock only until it ends.
"""

from __future__ import annotations

import os

#: Slack allowed between a lock's timestamp and its owner's start time before the owner is taken for a
#: different process that reused the pid (the boot time is known to the whole second only).
PID_REUSE_SLACK = 1.0
#: A process that exists but whose start time cannot be read: alive, and older than any lock.
UNKNOWN_START = float("-inf")

_TICKS = os.sysconf("SC_CLK_TCK")


def boot_time() -> float:
    """When the system booted (epoch seconds, whole), from /proc/stat's btime."""
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise OSError("/proc/stat has no btime line")


def started(pid: int, booted: float) -> float | None:
    """When process ``pid`` started (epoch seconds); None when there is no such process or it is a zombie;
    UNKNOWN_START when it exists but /proc does not say (taken as alive)."""
    if pid <= 0:
        return UNKNOWN_START  # no process's pid: not one this tidy can judge
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return UNKNOWN_START
    fields = stat[stat.rfind(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # a zombie, or dead
        return None
    return booted + int(fields[19]) / _TICKS


def maps_segment(pid: int, shm_id: int) -> bool | None:
    """Whether process ``pid`` has SysV segment ``shm_id`` attached (its maps show it); None when its maps
    cannot be read."""
    wanted = b"%d" % shm_id
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            return any(len(fields) >= 6 and fields[5].startswith(b"/SYSV") and fields[4] == wanted
                       for fields in (line.split() for line in maps))
    except OSError:
        return None


class Liveness:
    """``gone(pid, since)`` for one tidy: each pid's start time read once, and the boot time once.

    A process that starts with a pid after it was read is younger than the answer says, never older: a
    lock it takes is judged alive (its timestamp is after that start), so the cache frees nothing it should
    not; what died since is freed by the next tidy.
    """

    def __init__(self, shm_id: int | None = None) -> None:
        self._booted = boot_time()
        self._started: dict[int, float | None] = {}
        self._shm_id = shm_id
        self._mapping: dict[int, bool] = {}

    def __call__(self, pid: int, since: float) -> bool:
        try:
            start = self._started[pid]
        except KeyError:
            start = self._started[pid] = started(pid, self._booted)
        if start is None:
            return True
        if start <= since + PID_REUSE_SLACK:
            return False
        if self._shm_id is None:
            return True
        mapping = self._mapping.get(pid)
        if mapping is None:  # younger than its lock: a stranger with the pid, or the clock stepped forward
            mapping = self._mapping[pid] = maps_segment(pid, self._shm_id) is not False
        return not mapping


def owner_gone(pid: int, since: float, shm_id: int | None = None) -> bool:
    """True when the process that took a lock at ``since`` (in the table whose segment is ``shm_id``) no
    longer exists (one question, nothing kept)."""
    return Liveness(shm_id)(pid, since)

"""How many clients this host lets the listener serve, found at start: the limits raised where we may, the
rest told in the log, each naming the limit and how to raise it.

A client costs the listener nothing it keeps (the connection is closed in the
listener once its lock server is forked) and its lock server a process of its
own. So what bounds the clients is not the listener's descriptors but:

- the processes this user may run (RLIMIT_NPROC; not enforced for root) and
  the kernel's ``kernel.pid_max`` and ``kernel.threads-max``;
- the memory: a lock server's private memory (about 3.5 MB with CPython 3.11,
  see docs/benchmarks.md), times the clients;
- the lock table: a client that locks takes at least one of its slots.

Descriptors still matter twice: the listener needs a few dozen (the listening
socket, the log, the refused connections lingering a moment), and a lock
server keeps one open per file its client holds an OS file lock on (no table,
or JDLS BINARY). The soft RLIMIT_NOFILE is raised to the hard limit at start,
and the lock servers inherit it.

Nothing here refuses to start: a limit lower than ``--max-clients`` is a
warning, and the service serves as many clients as the host allows (the one
over a limit is refused at accept, or by fork, and logged).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

#: Descriptors the listener may have open at once besides the refused connections lingering (the listening
#: socket, the log files, pid files, the signal pipe, the table and what a start opens on the way), with room.
LISTENER_FDS = 64
#: A lock server's private memory reckoned with when counting how many fit in memory: above what one costs
#: (docs/benchmarks.md, "Issue 13: five thousand clients"), for the pages a busy one copies over time.
LOCK_SERVER_BYTES = 4 * 1024 * 1024
_PROC = Path("/proc")


@dataclass(frozen=True)
class Room:
    """What the host allows: ``clients`` at most (None: no limit found), ``notes`` for the start's log line,
    ``warnings`` for each limit below what was asked, naming it and how to raise it."""

    clients: int | None
    notes: tuple[str, ...]
    warnings: tuple[str, ...]


def raise_nofile() -> tuple[int, int]:
    """RLIMIT_NOFILE's soft limit raised to the hard one where it is lower: (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, None where there is none."""
    try:
        with (_PROC / "meminfo").open(encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _tasks() -> tuple[int, int, int]:
    """(processes, threads, processes of this user) running now, from /proc."""
    processes = threads = mine = 0
    uid = os.getuid()
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        try:
            status = (_PROC / entry.name / "status").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue  # ended meanwhile
        processes += 1
        for line in status.splitlines():
            if line.startswith("Threads:"):
                threads += int(line.split()[1])
            elif line.startswith("Uid:") and int(line.split()[1]) == uid:
                mine += 1
    return processes, threads, mine


def room(max_clients: int, table_locks: int | None) -> Room:
    """How many clients this host lets the listener serve, the soft RLIMIT_NOFILE raised on the way (see the
    module docstring): what to log at start, and a warning for each limit below ``max_clients``."""
    notes: list[str] = []
    warnings: list[str] = []
    bounds: list[int] = []

    def below(what: str, allows: int, how: str, beyond: str = "clients beyond it are refused") -> None:
        bounds.append(max(0, allows))
        if allows < max_clients:
            warnings.append(f"{what} allows about {max(0, allows)} lock servers, fewer than --max-clients "
                            f"{max_clients}: {beyond}; {how}")

    before, soft = raise_nofile()
    if soft != before:
        notes.append(f"descriptors: soft limit raised from {before} to {soft}")
    else:
        notes.append(f"descriptors: limit {'unlimited' if soft == resource.RLIM_INFINITY else soft}")
    if soft != resource.RLIM_INFINITY and soft < LISTENER_FDS:
        warnings.append(f"RLIMIT_NOFILE is {soft} (its hard limit), fewer than the {LISTENER_FDS} descriptors the "
                        "listener may need: connections may fail to be accepted; raise the hard limit (ulimit -Hn "
                        "before jdls -ib, LimitNOFILE= in a systemd unit)")
    processes, threads, mine = _tasks()
    nproc, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if os.geteuid() != 0 and nproc != resource.RLIM_INFINITY:
        below(f"RLIMIT_NPROC ({nproc} processes for this user, {mine} running)", nproc - mine,
              "raise it (ulimit -u before jdls -ib, LimitNPROC= in a systemd unit)")
    pid_max = _read_int(_PROC / "sys/kernel/pid_max")
    if pid_max is not None:
        below(f"kernel.pid_max ({pid_max}, {processes} processes running)", pid_max - processes,
              "raise it (sysctl -w kernel.pid_max=N)")
    threads_max = _read_int(_PROC / "sys/kernel/threads-max")
    if threads_max is not None:
        below(f"kernel.threads-max ({threads_max}, {threads} threads running)", threads_max - threads,
              "raise it (sysctl -w kernel.threads-max=N)")
    available = _mem_available()
    if available is not None:
        fit = available // LOCK_SERVER_BYTES
        notes.append(f"memory for about {fit} lock servers ({available // 2**20} MiB available, "
                     f"{LOCK_SERVER_BYTES // 2**20} MiB each)")
        below(f"the memory available ({available // 2**20} MiB at {LOCK_SERVER_BYTES // 2**20} MiB a lock server)",
              fit, "add memory or lower --max-clients", "the host may run out of memory before the limit")
    if table_locks is not None and table_locks < max_clients:
        warnings.append(f"the lock table holds {table_locks} locks, fewer than --max-clients {max_clients}: when "
                        "every client holds a lock the table is full and the next lock is refused; make a larger "
                        "table (jdls -k, jdls -K, jdls -ib -s RECORDS)")
    clients = min(bounds) if bounds else None
    if clients is not None:
        notes.insert(0, f"room for about {min(clients, max_clients)} of {max_clients} clients")
    return Room(clients, tuple(notes), tuple(warnings))

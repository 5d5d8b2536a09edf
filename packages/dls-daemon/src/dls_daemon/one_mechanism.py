"""One mechanism per instance: no lock table is made while OS file locks serve the instance.

An instance locks through its table when it has one, else through OS file
locks; two mechanisms at once would let a remote client and a local process
hold the same record, each granted by its own. Of "refuse, switch or follow"
dls refuses, and what locks directly follows: while any of these serve the
instance with OS file locks, a monitor makes no table for it, and says which
and what to do:

- a listener that started without a table (it chose OS file locks at start,
  and its lock servers keep to that choice);
- lock servers that run while the instance has no table (those of such a
  listener outlive it: ``jdls -kD``);
- OS locks held in the record-lock directory, by any process (a local process
  locks there directly), as /proc/locks tells (dls-shm's ``oslock_holders``).

Each side announces itself, then looks at the other, so that whichever comes
first one of them sees the other: the monitor creates the table, then looks
(``claim``), and removes the table again if it must refuse; a listener takes
its pid file, then looks for a table; a taker of an OS record lock (a lock
server, a local process: dls-shm's OsLocks made with the instance's table key)
takes it, then looks for a table, and drops it again if there is one. A local
process that holds no OS lock then switches to the table (dls-client's
LocalClient); anything else gets an error naming the table.

``jdls -i`` asks the same question before it starts a monitor
(``start_refusal``), so that the usual refusal makes no table at all, not even
for the moment between the monitor's create and its look.

The other way round too: a listener that finds no table would serve the
instance with OS file locks, so it refuses while lock servers of the instance
still lock in a table (``listener_refusal``): one removed under them by
``jdls -K -o``, which they still map and grant from. Their clients hold locks
there that they are never told about (a holder sends no further request), and
OS file locks would grant the same records again.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dls_shm import (
    LISTENER,
    Instance,
    LockTable,
    Occupant,
    command_line,
    maps_a_table,
    oslock_holders,
    running_role,
    running_servers,
)

from .lifecycle import StartFailed
from .settings import Settings

#: A refusal names at most this many holders of OS locks.
SHOWN_HOLDERS = 5
WHAT_TO_DO = "stop the service (jdls -k), then start it with its table (jdls -ib)"


def refusal(instance: Instance, lock_dir: Path) -> str | None:
    """Why no table may serve ``instance`` now (OS file locks serve it), or None. Read only."""
    listener = running_role(instance, LISTENER, tidy=False)
    if listener is not None:
        return (f"the {listener} runs without a lock table: it serves the instance with OS file locks, and a "
                f"table now would be a second mechanism beside them: {WHAT_TO_DO}")
    servers = running_servers(instance, tidy=False)
    on_removed = [s.pid for s in servers if maps_a_table(s.pid)]  # refused either way: only the words differ
    if on_removed:
        return (f"lock servers (pid {_pids(on_removed)}) still lock in a lock table removed under them (jdls -K -o): "
                f"a new table now would be a second mechanism beside it: {WHAT_TO_DO}")
    if servers:
        return (f"lock servers (pid {_pids(s.pid for s in servers)}) run without a lock table: they serve their "
                f"clients with OS file locks, and a table now would be a second mechanism beside them: {WHAT_TO_DO}")
    try:
        held = oslock_holders(lock_dir)
    except OSError as exc:
        return f"cannot tell whether OS file locks are held in {lock_dir}: /proc/locks: {exc.strerror or exc}"
    if held:
        return (f"OS file locks in {lock_dir} are held by {_holders([h.pid for h in held])}: they serve the "
                "instance without a table, and a table now would grant their records again: have them released "
                "(or stop those processes), then start the monitor again")
    return None


def listener_refusal(instance: Instance) -> str | None:
    """Why a listener that found no table may not serve ``instance`` with OS file locks now, or None.

    Lock servers of the instance that still have a table attached (removed by ``jdls -K -o``) grant from
    it; their clients' locks there are unseen by OS file locks, which would grant the same records again.
    Stopping them (``jdls -k``) ends their connections, so that their clients are told the locks are lost.
    """
    on_table = _on_a_table(running_servers(instance, tidy=False))
    if not on_table:
        return None
    return (f"lock servers (pid {_pids(on_table)}) still lock in a lock table removed under them (jdls -K -o): "
            "their clients hold locks there that OS file locks would grant again, a second mechanism beside "
            "them: stop them (jdls -k: their clients are told their locks are lost), then start the listener "
            "again")


def _on_a_table(servers: Iterable[Occupant]) -> list[int]:
    """The pids of ``servers`` that have a table attached, or whose maps cannot be read (assumed to)."""
    return sorted(s.pid for s in servers if maps_a_table(s.pid) is not False)


def _pids(pids: Iterable[int]) -> str:
    return ", ".join(str(pid) for pid in sorted(pids))


def _holders(pids: list[int]) -> str:
    """``pid 12 (python3 app.py: 2 locks), pid 15 (...)``: the first SHOWN_HOLDERS of them."""
    counts: dict[int, int] = {}
    for pid in pids:
        counts[pid] = counts.get(pid, 0) + 1
    shown = []
    for pid, count in list(counts.items())[:SHOWN_HOLDERS]:
        locks = f"{count} locks" if count > 1 else "1 lock"
        shown.append(f"pid {pid} ({command_line(pid)}: {locks})" if pid > 0 else f"a process of another pid "
                     f"namespace ({locks})")
    more = len(counts) - len(shown)
    return ", ".join(shown) + (f" and {more} more process(es)" if more > 0 else "")


def start_refusal(settings: Settings) -> str | None:
    """``jdls -i`` of a monitor: why it would refuse to make the table (None when a table exists to attach)."""
    if LockTable.exists(settings.instance.key):
        return None
    return refusal(settings.instance, settings.lock_dir)


def claim(settings: Settings, table: LockTable, created: bool) -> None:
    """The monitor's look after it made (``created``) the table: StartFailed, the table removed again, when
    OS file locks serve the instance. A table that existed already is the instance's mechanism."""
    if not created:
        return
    problem = refusal(settings.instance, settings.lock_dir)
    if problem is not None:
        table.remove()
        raise StartFailed(problem)

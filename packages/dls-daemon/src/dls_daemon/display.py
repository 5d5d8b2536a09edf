"""``jdls -d``: the service and its lock table, as jDLS shows them.

``-d`` names the monitor and listener and sums up the table, ``-v`` adds the
rest of the header (times, counters, semaphore ids, memory, CPU), ``-vv`` also
the IPC key and shared memory id, ``-L`` lists every lock. Without a table
(``jdls -ibD``) it shows what there is instead: the lock directory, the lock
servers and the OS record locks held. The lines, their
order and the columns are those of the jDLS user guide's ``jDLS -dvL``
example, so an operator finds each figure where jDLS put it. The text is
``dls_shm.report``'s, shared with dls-dump. Whether a process is active comes
from its pid file, checked against the live process (pid and start time), so a
pid left in the header by a killed monitor is shown as inactive rather than
trusted.
"""

from __future__ import annotations

import sys
from typing import TextIO

from dls_shm import (
    LISTENER,
    MONITOR,
    Header,
    Instance,
    LockTable,
    TableError,
    TableMissing,
    info,
    oslock_entries,
    report,
    running_servers,
    service_processes,
)

from .exitcodes import ExitCode

#: What the lines and columns of ``jdls -dvL`` mean: the jdls page's section on the display (cli's epilog).
DISPLAY_HELP = """\
The display (-d, -dv, -dvL), line by line:
  Lock monitor at pid, Lock listener at pid
                      the pid of each, Active while that very process runs (its pid file
                      is checked against the live process), else Inactive
  Program started     when the lock table was made
  Time last ran       the monitor's last look at the table (every second)
  Time last tidied up the monitor's last tidy-up: a sweep of the table for the locks of
                      dead processes (every tidy-up time, and when a kept lock falls due)
  Lock retries        how many times a queued lock request was looked at again and found
                      still blocked
  Tidy-up time        the monitor's tidy-up period (-t)
  Locking mechanism   IPC semaphores based on THREAD id (a lock is a process's thread's),
                      or on PORT number (-P: a lock is its port's); ", locks time stamped"
                      with -T
  Tidy-up operations  how many locks of dead processes have been freed (or kept, see
                      --lock-delay), and kept locks freed when their delay ended
  Semaphore IDs       the id of the SysV semaphore set that guards the table. jDLS showed
                      two ids; dls has one set: one semaphore for the header and one for
                      each set of lock groups (up to 128), so that requests for records
                      of different groups do not wait for each other (SEM_UNDO, so a
                      process killed while holding one cannot wedge the table); waiters
                      sleep on doorbells (datagram sockets), not on a second set
  Memory              bytes of the segment in use (header, the groups' ticket counters
                      and used slots) and free
  CPU Usage           the monitor's user and system CPU seconds
  IPC key, Shared memory ID
                      (-vv) the table's SysV key and segment id, as ipcs shows them
Record locks outstanding (-L), one row per used slot:
  Group     the hash group of the lock's slot (a lock's value decides its group)
  value     the lock's 32-bit value, from its file's inode and device and its key
            (show-item-locks' LOCK#)
  pid       the process holding the lock in the table: a local process itself, or the
            lock server serving a remote client (show-item-locks' PID)
  type      WRITE (EX), READ (PR), PROTECTED-WRITE (PW), CONCURRENT-WRITE (CW),
            CONCURRENT-READ (CR), NULL (NL)
  port      the client's port number (JBCPORTNO, else its pid)
  i-node    the locked file's inode, 8 digits
  dev       the file's device: -1 for every client lock, since device numbers differ
            between application servers
  queued    how many requests wait behind the lock (None when none); "waiting" on a
            waiting request's own row; "kept, N s left" for a lock kept for its client
            to reclaim (--lock-delay)
  ipaddr    0.0.0.0 for a process locking directly, 127.0.0.1 for a local process
            through the listener, else the remote client's address
  key       the record key (a long key: its first bytes and a digest)
  age       (a -T table) how long the lock has been held or the request has waited
  Then the table's size, the locks in use, the fullest group, kept locks and waiting
  requests.
The rows are by group, and in a group in queue order. Each is written as its group is
read, a batch of groups at a time, the table's semaphore held only to copy each batch:
a table of a million locks is listed as it is read, and a slow reader never holds up
the lockers. The Memory line counts the slots in use just before the rows, the summary
the rows shown: on a busy table they may differ by what changed meanwhile.
Without a lock table (jdls -ibD: record locks are OS file locks) -d shows the monitor
  and listener, the lock directory (--lock-dir), with -v how many lock servers run, and
  with -L each OS record lock held, from /proc/locks joined with proc/info as
  show-item-locks joins them (value, pid, type, port, i-node, dev, ipaddr, key; a lock
  no document explains shows the byte of its lock file as its key), then how many are
  held and how many requests wait. Exit status 0 while the listener runs or OS locks
  are held; 1 when there is neither a table nor a listener.
"""


def _processes(instance: Instance, header: Header | None) -> tuple[report.Process, report.Process]:
    """The monitor and the listener: the live process of each pid file, else the header's pid as inactive."""
    found = service_processes(instance, header, tidy=True)
    return found[MONITOR], found[LISTENER]


def display(
    instance: Instance, *, verbose: int = 0, locks: bool = False, out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the service's state; the exit status (1 when there is no table to show, or it cannot be read)."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        table = LockTable.attach(instance.key)
    except TableMissing:
        return _display_oslocks(instance, verbose=verbose, locks=locks, out=out, err=err)
    except TableError as exc:
        print(f"jdls: {exc}", file=err)
        return ExitCode.FAILED
    try:
        snapshot = report.Snapshot.streamed(table, count=bool(verbose))
        for text in report.stream(snapshot, *_processes(instance, snapshot.header), details=bool(verbose),
                                  very=verbose > 1, locks=locks):
            print(text, file=out)
    except TableError as exc:  # removed while it was read (jdls -K -o)
        print(f"jdls: {exc}", file=err)
        return ExitCode.FAILED
    finally:
        table.close()
    return ExitCode.OK


def _display_oslocks(instance: Instance, *, verbose: int, locks: bool, out: TextIO, err: TextIO) -> int:
    """The display of an instance without a lock table: what there is. When its listener runs (``jdls -ibD``:
    record locks are OS file locks), the processes, the lock directory, the lock servers (``-v``) and the OS
    record locks held (``-L``, joined with proc/info as show-item-locks joins them); exit 0. When nothing runs
    and no OS lock is held, the processes and why there is nothing more; exit 1."""
    monitor, listener = _processes(instance, None)
    lock_dir = instance.lock_dir()
    try:
        documents = list(info.read_all(instance))
        entries = oslock_entries.entries_of(lock_dir, documents, waiting=True)
        problem = None
    except OSError as exc:
        entries, problem = [], f"OS file locks in {lock_dir} not read: {exc.strerror or exc}"
    for text in report.process_lines(monitor, listener):
        print(text, file=out)
    if not listener.active and not entries:
        print(report.line("Locking mechanism", f"OS file locks (no lock table with key 0x{instance.key:08x})"),
              file=out)
        print(f"jdls: there is no shared memory lock table with key 0x{instance.key:08x} for {instance.root}, "
              "and no lock listener serves it: the lock monitor has not created one (jdls -ib or -ibA) or it was "
              "removed (jdls -K); jdls -ibD serves the instance with OS file locks", file=err)
        return ExitCode.FAILED
    servers = len(running_servers(instance, tidy=False)) if verbose else None
    for text in report.oslock_lines(str(lock_dir), entries, servers=servers, locks=locks):
        print(text, file=out)
    if problem is not None:
        print(f"jdls: {problem}", file=err)
        return ExitCode.FAILED
    return ExitCode.OK


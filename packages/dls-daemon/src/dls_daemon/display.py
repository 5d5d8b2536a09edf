"""``jdls -d``: the service and its lock table, as jDLS shows them.

``-d`` names the monitor and listener and sums up the table, ``-v`` adds the
rest of the header (times, counters, semaphore ids, memory, CPU), ``-vv`` also
the IPC key and shared memory id, ``-L`` lists every lock. The lines, their
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

from dls_shm import LISTENER, MONITOR, Header, Instance, LockTable, TableError, TableMissing, report, service_processes

from .exitcodes import ExitCode


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
        for text in report.process_lines(*_processes(instance, None)):
            print(text, file=out)
        print(report.line("Locking mechanism", f"OS file locks (no lock table with key 0x{instance.key:08x})"),
              file=out)
        print(f"jdls: there is no shared memory lock table with key 0x{instance.key:08x} for {instance.root}: "
              "the lock monitor has not created one (jdls -ib or -ibA) or it was removed (jdls -K)", file=err)
        return ExitCode.FAILED
    except TableError as exc:
        print(f"jdls: {exc}", file=err)
        return ExitCode.FAILED
    try:
        snapshot = report.Snapshot.read(table)
    finally:
        table.close()
    for text in report.lines(snapshot, *_processes(instance, snapshot.header), details=bool(verbose), very=verbose > 1,
                      locks=locks):
        print(text, file=out)
    return ExitCode.OK

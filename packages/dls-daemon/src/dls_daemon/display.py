"""``jdls -d``: the state of the service and its lock table, as jDLS shows it.

``-d`` names the monitor and listener and sums up the table, ``-v`` adds the
rest of the header (times, counters, IPC ids, memory, CPU), ``-L`` lists every
lock. Whether a process is active comes from its pid file, checked against
the live process, so a pid left in the header by a killed monitor is shown as
inactive rather than trusted.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TextIO

from dls_shm import Entry, Header, Instance, LockTable, SlotState, TableError, TableFlag, TableMissing, modes, unpack_ip

from . import pidfile
from .roles import LISTENER, MONITOR

LABEL_WIDTH = 24
COLUMNS = ("Group", "value", "pid", "type", "port", "i-node", "dev", "queued", "ipaddr", "key")


def _line(label: str, value: object) -> str:
    return f"{label + ':':<{LABEL_WIDTH}}{value}"


def _when(t: float) -> str:
    return time.ctime(t) if t else "never"


def _process_lines(instance: Instance, header: Header | None) -> list[str]:
    lines = []
    for role, label in ((MONITOR, "Lock monitor at pid"), (LISTENER, "Lock listener at pid")):
        record = pidfile.running(instance.pid_file(role))
        if record is not None:
            lines.append(_line(label, f"{record.pid} - Active"))
        else:
            pid = 0 if header is None else (header.monitor_pid if role == MONITOR else header.listener_pid)
            lines.append(_line(label, f"{pid} - Inactive"))
    return lines


def _mechanism(flags: int) -> str:
    owners = "port number" if flags & TableFlag.PORT_OWNERS else "process and thread id"
    stamped = ", time-stamped" if flags & TableFlag.TIMESTAMPS else ""
    return f"shared memory table, one semaphore; owners by {owners}{stamped}"


def _details(table: LockTable, header: Header, used: int) -> list[str]:
    free = table.geometry.locks - used
    free_bytes = free * (header.slot_size + 4)
    period = header.tidy_period
    tidy = f"{period // 60} minutes" if period % 60 == 0 else f"{period} seconds"
    return [
        _line("Time last ran", _when(header.last_ran)),
        _line("Time last tidied up", _when(header.last_tidy)),
        _line("Lock retries", header.lock_retries),
        _line("Tidy-up time", tidy),
        _line("Locking mechanism", _mechanism(header.flags)),
        _line("Tidy-up operations", header.tidy_ops),
        _line("IPC key", f"0x{table.key:08x}"),
        _line("Shared memory ID", table.shm_id),
        _line("Semaphore IDs", ", ".join(str(s) for s in table.semaphore_ids)),
        _line("Memory", f"{header.total_size - free_bytes} bytes used , {free_bytes} bytes free"),
        _line("CPU Usage", f"{header.cpu_user:.2f} usr , {header.cpu_system:.2f} sys"),
    ]


def _lock_rows(entries: list[Entry], timestamps: bool) -> list[str]:
    header = COLUMNS + (("time",) if timestamps else ())
    rows = ["\t".join(header)]
    for e in sorted(entries, key=lambda e: (e.group, e.slot.ticket)):
        s = e.slot
        queued = "waiting" if s.state == SlotState.WAITING else (str(s.queued) if s.queued else "None")
        row = [
            str(e.group), f"0x{e.value:08x}", str(s.pid), modes.DISPLAY[s.mode], str(s.port), f"{s.inode:08d}",
            str(s.device), queued, unpack_ip(s.ip), s.key[: s.key_len].decode("utf-8", "backslashreplace"),
        ]
        if timestamps:
            row.append(time.strftime("%H:%M:%S", time.localtime(s.timestamp)))
        rows.append("\t".join(row))
    return rows


def display(instance: Instance, *, verbose: bool = False, locks: bool = False, out: TextIO | None = None) -> int:
    """Print the service's state; the exit status (1 only when the table cannot be read)."""
    out = out or sys.stdout
    try:
        table = LockTable.attach(instance.key)
    except TableMissing:
        for line in _process_lines(instance, None):
            print(line, file=out)
        print(_line("Locking mechanism", f"OS file locks (no lock table with key 0x{instance.key:08x})"), file=out)
        return 0
    except TableError as exc:
        print(f"jdls: {exc}", file=sys.stderr)
        return 1
    try:
        header = table.header()
        entries = list(table.scan())
        details = _details(table, header, len(entries)) if verbose else []
        geometry = table.geometry
    finally:
        table.close()
    granted = sum(1 for e in entries if e.slot.state == SlotState.GRANTED)
    waiting = len(entries) - granted
    per_group = Counter(e.group for e in entries)
    lines = [*_process_lines(instance, header), _line("Program started", _when(header.created)), *details]
    if locks:
        lines += ["", "Record locks outstanding", ""]
        lines += _lock_rows(entries, bool(header.flags & TableFlag.TIMESTAMPS)) if entries else ["(none)"]
    lines += [
        "",
        _line("Record locks", f"{geometry.locks} locks maximum in {geometry.ngroups} groups of "
                             f"{geometry.per_group} locks/group"),
        " " * LABEL_WIDTH + f"{granted} locks currently in use",
        " " * LABEL_WIDTH + f"{max(per_group.values(), default=0)} is max. locks found in one group",
    ]
    if waiting:
        lines.append(" " * LABEL_WIDTH + f"{waiting} requests waiting")
    for line in lines:
        print(line, file=out)
    return 0

"""The text report of a lock table, as ``jdls -dvL`` prints it, written once for every tool that prints it.

``jdls -d`` (dls-daemon) and ``dls-dump`` (dls-utils) show the same lines
for the same table, byte for byte: the monitor and listener, the header
(``-v``; ``-vv`` adds the IPC key and shared memory id), one line per used
slot (``-L``) and the summary. The lines, their order and the columns are
those of the jDLS user guide's ``jDLS -dvL`` example.

A ``Snapshot`` is one consistent read of a table, taken while attached; the
text is made from it after the table is closed. Whether the monitor and
listener run is not in the table: each tool finds out in its own way (the
daemon from its pid files, dls-dump read only) and passes a ``Process`` for
each.

A kept lock (its lock server ended while its client may live) is not in the
jDLS guide: its row says so where a held lock shows its queue ("kept, 12 s
left", then the queue if any), and the summary counts it among the locks in
use and then on a line of its own, with the table's lock-delay. A table with
no kept lock shows exactly the jDLS text.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from dls_proto.text import amount
from dls_proto.text import printable as printable  # the reports' name for it, where the utilities find it

from . import modes
from .layout import Geometry, Header, SlotState, TableFlag, unpack_ip
from .table import Entry, LockTable

#: Where the values of the header lines start.
LABEL_WIDTH = 24
#: The summary's first line puts its figure one column to the left, as jDLS does.
SUMMARY_WIDTH = 23
COLUMNS = ("Group", "value", "pid", "type", "port", "i-node", "dev", "queued", "ipaddr", "key")
#: The extra column of a time-stamped table (jdls -iT): how long each lock has been held (or waited).
AGE_COLUMN = "age"


class Process(NamedTuple):
    """What a tool knows of the lock monitor or listener: its pid, and whether that process runs."""

    pid: int
    active: bool


@dataclass(frozen=True)
class Snapshot:
    """One consistent read of a table: header, used slots, ids and the time, taken while attached."""

    key: int
    shm_id: int
    semaphore_ids: tuple[int, ...]
    header: Header
    geometry: Geometry
    entries: tuple[Entry, ...]
    #: When the slots were read: the ages of a time-stamped table are counted to it.
    now: float

    @classmethod
    def read(cls, table: LockTable) -> Snapshot:
        header = table.header()
        entries = tuple(table.scan())
        now = time.time()
        return cls(table.key, table.shm_id, table.semaphore_ids, header, table.geometry, entries, now)

    @property
    def granted(self) -> int:
        return sum(1 for e in self.entries if e.slot.state == SlotState.GRANTED)

    @property
    def kept(self) -> int:
        return sum(1 for e in self.entries if e.slot.state == SlotState.KEPT)

    @property
    def waiting(self) -> int:
        return sum(1 for e in self.entries if e.slot.state == SlotState.WAITING)

    @property
    def max_in_group(self) -> int:
        return max(Counter(e.group for e in self.entries).values(), default=0)




def line(label: str, value: object) -> str:
    """A header line: the label and its colon, the value at column LABEL_WIDTH."""
    return f"{label + ':':<{LABEL_WIDTH}}{value}"


def when(t: float) -> str:
    return time.ctime(t) if t else "never"


def tidy_period(seconds: int) -> str:
    if seconds % 60 == 0:
        return amount(seconds // 60, "minute")
    return amount(seconds, "second")


def mechanism(flags: int) -> str:
    """The "Locking mechanism" line: one SysV semaphore guards the table; whose locks they are."""
    owners = "PORT number" if flags & TableFlag.PORT_OWNERS else "THREAD id"
    stamped = ", locks time stamped" if flags & TableFlag.TIMESTAMPS else ""
    return f"IPC semaphores based on {owners}{stamped}"


def memory(header: Header, used_slots: int) -> tuple[int, int]:
    """(bytes used, bytes free): the header and the slots in use (each with its value word), and the rest."""
    total_slots = header.ngroups * header.per_group
    free = (total_slots - used_slots) * (header.slot_size + 4)
    return header.total_size - free, free


def age(seconds: float) -> str:
    """mm:ss, or h:mm:ss from an hour on."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def kept_for(expires: float, now: float) -> str:
    """How a kept lock's row says it is kept, and for how long still: "kept, 12 s left" (whole seconds,
    rounded up), or "kept, expired" once its lock-delay has passed and nobody has freed it yet."""
    left = expires - now
    return f"kept, {math.ceil(left)} s left" if left > 0 else "kept, expired"


def process_lines(monitor: Process, listener: Process) -> list[str]:
    """The first two lines: the monitor's and the listener's pid, Active or Inactive."""
    return [
        line(label, f"{p.pid} - {'Active' if p.active else 'Inactive'}")
        for label, p in (("Lock monitor at pid", monitor), ("Lock listener at pid", listener))
    ]


def detail_lines(snapshot: Snapshot, very: bool = False) -> list[str]:
    """The rest of the header (``-v``): times, counters, semaphore ids, memory, CPU; ``very`` (``-vv``) adds
    the IPC key and the shared memory id."""
    h = snapshot.header
    used_bytes, free_bytes = memory(h, len(snapshot.entries))
    text = [
        line("Time last ran", when(h.last_ran)),
        line("Time last tidied up", when(h.last_tidy)),
        line("Lock retries", h.lock_retries),
        line("Tidy-up time", tidy_period(h.tidy_period)),
        line("Locking mechanism", mechanism(h.flags)),
        line("Tidy-up operations", h.tidy_ops),
        line("Semaphore IDs", ", ".join(str(s) for s in snapshot.semaphore_ids)),
        line("Memory", f"{used_bytes} bytes used , {free_bytes} bytes free"),
        line("CPU Usage", f"{h.cpu_user:.2f} usr , {h.cpu_system:.2f} sys"),
    ]
    if very:
        text += [line("IPC key", f"0x{snapshot.key:08x}"), line("Shared memory ID", snapshot.shm_id)]
    return text


def lock_rows(snapshot: Snapshot) -> list[str]:
    """The column heads and one tab-separated row per used slot, by group and then in queue order."""
    timestamps = bool(snapshot.header.flags & TableFlag.TIMESTAMPS)
    rows = ["\t".join(COLUMNS + ((AGE_COLUMN,) if timestamps else ()))]
    for e in sorted(snapshot.entries, key=lambda e: (e.group, e.slot.ticket)):
        s = e.slot
        queued = "waiting" if s.state == SlotState.WAITING else (str(s.queued) if s.queued else "None")
        if s.state == SlotState.KEPT:
            kept = kept_for(s.timestamp + snapshot.header.lock_delay, snapshot.now)
            queued = f"{kept}, {s.queued} queued" if s.queued else kept
        row = [
            str(e.group), f"0x{e.value:08x}", str(s.pid), modes.DISPLAY[s.mode], str(s.port), f"{s.inode:08d}",
            str(s.device), queued, unpack_ip(s.ip), printable(s.key[: s.key_len].decode("utf-8", "backslashreplace")),
        ]
        if timestamps:
            row.append(age(snapshot.now - s.timestamp))
        rows.append("\t".join(row))
    return rows


def summary_lines(snapshot: Snapshot) -> list[str]:
    """The summary after a blank line: the table's size, the locks in use, the fullest group, the waiters."""
    g = snapshot.geometry
    indent = " " * LABEL_WIDTH
    text = [
        "",
        f"{'Record locks:':<{SUMMARY_WIDTH}}{g.locks} locks maximum in {g.ngroups} groups of "
        f"{g.per_group} locks/group",
        f"{indent}{snapshot.granted + snapshot.kept} locks currently in use",
        f"{indent}{snapshot.max_in_group} is max. locks found in one group",
    ]
    if snapshot.kept:
        text.append(f"{indent}{snapshot.kept} locks kept for their clients to reclaim "
                    f"(lock-delay {snapshot.header.lock_delay:g} s)")
    if snapshot.waiting:
        text.append(f"{indent}{snapshot.waiting} requests waiting")
    return text


def lines(
    snapshot: Snapshot, monitor: Process, listener: Process, *, details: bool = True, very: bool = False,
    locks: bool = True,
) -> list[str]:
    """The whole text, a line an item (without newlines): ``jdls -d``, with ``details`` ``-dv`` (``very``:
    ``-dvv``), with ``locks`` ``-dL``; the defaults are ``jdls -dvL``."""
    text = [*process_lines(monitor, listener), line("Program started", when(snapshot.header.created))]
    if details:
        text += detail_lines(snapshot, very)
    if locks:
        text += ["", "Record locks outstanding", "", *lock_rows(snapshot)]
    return text + summary_lines(snapshot)


#: The columns of OS file locks (``oslock_lines``): a table's, less what OS locks do not have (group, queue).
OSLOCK_COLUMNS = ("value", "pid", "type", "port", "i-node", "dev", "ipaddr", "key")


def oslock_lines(lock_dir: str, entries: list[dict[str, object]], *, servers: int | None = None,
                 locks: bool = True) -> list[str]:
    """What ``jdls -d`` shows of a service without a lock table (``jdls -ibD``), after the process lines: the
    locking mechanism and its directory, the lock servers (``servers``, when known), and with ``locks`` one
    row per OS record lock held (``oslock_entries``: held entries only), then how many."""
    held = [e for e in entries if e.get("state") == "granted"]
    text = [line("Locking mechanism", "OS file locks (no lock table)"), line("Lock directory", lock_dir)]
    if servers is not None:
        text.append(line("Lock servers", servers))
    if locks:
        text += ["", "Record locks outstanding", "", "\t".join(OSLOCK_COLUMNS)]
        for e in sorted(held, key=lambda e: (str(e["inode"]), str(e["key"]), str(e["pid"]))):
            text.append("\t".join((
                f"0x{int(str(e['value'])):08x}", str(e["pid"]), modes.DISPLAY[modes.parse(str(e["mode"]))],
                str(e["port"]), f"{int(str(e['inode'])):08d}", str(e["device"]), str(e["ip"]),
                printable(str(e["key"])))))
    waiting = sum(1 for e in entries if e.get("state") == "waiting")
    text += ["", f"{'OS file locks:':<{SUMMARY_WIDTH}}{len(held)} locks currently held"]
    if waiting:
        text.append(f"{' ' * LABEL_WIDTH}{waiting} requests waiting")
    return text

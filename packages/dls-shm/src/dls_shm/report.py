"""The text report of a lock table, as ``jdls -dvL`` prints it, written once for every tool that prints it.

``jdls -d`` (dls-daemon) and ``dls-dump`` (dls-utils) show the same lines
for the same table, byte for byte: the monitor and listener, the header
(``-v``; ``-vv`` adds the IPC key and shared memory id), one line per used
slot (``-L``) and the summary. The lines, their order and the columns are
those of the jDLS user guide's ``jDLS -dvL`` example.

A ``Snapshot`` is a table's header, and its used slots either read whole or
read as the text is made (``Snapshot.streamed``, what the tools use): the
table is then read a batch of groups at a time (``LockTable.scan``), each
batch a consistent copy, and each row written as its group is read, so that
a table of a million locks is listed without holding its semaphore for more
than one batch's copy, and without its rows in memory. The rows keep their
order (by group, then queue order); the Memory line of ``-v``, which comes
before the rows, counts the slots in use in a quick pass of its own over the
groups' values, and the summary counts the rows shown: on a busy table the two
are a few moments apart. Whether the monitor and listener run is not in the
table: each tool finds out in its own way (the daemon from its pid files,
dls-dump read only) and passes a ``Process`` for each.

A kept lock (its lock server ended while its client may live) is not in the
jDLS guide: its row says so where a held lock shows its queue ("kept, 12 s
left", then the queue if any), and the summary counts it among the locks in
use and then on a line of its own, with the table's lock-delay. A table with
no kept lock shows exactly the jDLS text.

Neither are conversions and deadlocks (issue 14): a conversion's slot is a
waiting request ("waiting" in its row, counted among the requests waiting),
and the summary ends with how many of them convert; a request refused to break
a deadlock shows "refused" where a waiter shows "waiting", and the summary ends
with how many there are. Each resource's queues (``queues``: its granted locks
and fencing tokens, conversions, waiters, refused requests, and whether its value
block is valid) are a section of their own after the summary, only on request
(``stream(show_queues=True)``, dls-dump --queues): the guide's lines stay as they are.
"""

from __future__ import annotations

import itertools
import math
import operator
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from dls_proto.text import amount
from dls_proto.text import printable as printable  # the reports' name for it, where the utilities find it

from . import info, modes, queues
from .layout import Geometry, Header, SlotFlag, SlotState, TableFlag, unpack_ip
from .table import Entry, LockTable

#: Where the values of the header lines start.
LABEL_WIDTH = 24
#: The summary's first line puts its figure one column to the left, as jDLS does.
SUMMARY_WIDTH = 23
COLUMNS = ("Group", "value", "pid", "type", "port", "i-node", "dev", "queued", "ipaddr", "key")
#: The columns of the resource queues section (``queue_rows``).
QUEUE_COLUMNS = ("Group", "value", "i-node", "dev", "key", "block", "granted", "converting", "waiting", "refused")
#: The title of that section.
QUEUES_TITLE = "Resource queues"
#: The extra column of a time-stamped table (jdls -iT): how long each lock has been held (or waited).
AGE_COLUMN = "age"


class Process(NamedTuple):
    """What a tool knows of the lock monitor or listener: its pid, and whether that process runs."""

    pid: int
    active: bool


class Tally:
    """The summary's counts, made group by group as the rows are read."""

    def __init__(self) -> None:
        self.used = self.granted = self.kept = self.waiting = self.max_in_group = 0
        #: Of the waiting requests, the conversions; the requests refused to break a deadlock.
        self.converting = self.refused = 0

    def add(self, group: list[Entry]) -> None:
        """Count one group's used slots."""
        self.used += len(group)
        self.max_in_group = max(self.max_in_group, len(group))
        for e in group:
            state = e.slot.state
            if state == SlotState.GRANTED:
                self.granted += 1
            elif state == SlotState.KEPT:
                self.kept += 1
            elif state == SlotState.WAITING:
                self.waiting += 1
                if e.slot.flags & SlotFlag.CONVERTING:
                    self.converting += 1
            elif state == SlotState.DEADLOCK:
                self.refused += 1


@dataclass(frozen=True)
class Snapshot:
    """A table as a report shows it: the header, ids and the time, taken while attached, and its used slots,
    either read whole (``read``: a tuple, the text made at leisure) or read as the text is made (``streamed``:
    the table's ``scan``, each batch of groups a consistent copy, the table attached until the text is
    written: a table of a million locks is listed without holding its semaphore more than a batch's copy at a
    time, and without its rows in memory)."""

    key: int
    shm_id: int
    semaphore_ids: tuple[int, ...]
    header: Header
    geometry: Geometry
    #: In group order when streamed (``scan``'s); a tuple in any order.
    entries: Iterable[Entry]
    #: When the slots were read: the ages of a time-stamped table are counted to it.
    now: float
    #: The slots in use, counted before the rows (the Memory line of ``-v`` comes first); None: the entries'.
    in_use: int | None = None

    @classmethod
    def read(cls, table: LockTable) -> Snapshot:
        """Every used slot read now, whole."""
        header = table.header()
        entries = tuple(table.scan())
        now = time.time()
        return cls(table.key, table.shm_id, table.semaphore_ids, header, table.geometry, entries, now)

    @classmethod
    def streamed(cls, table: LockTable, *, count: bool = True) -> Snapshot:
        """The header now, the used slots as the text is made (read once, ``table`` still attached); with
        ``count`` the slots in use are counted first, from the groups' values (``slots_in_use``)."""
        header = table.header()
        in_use = table.slots_in_use() if count else None
        return cls(table.key, table.shm_id, table.semaphore_ids, header, table.geometry, table.scan(), time.time(),
                   in_use)

    def groups(self) -> Iterator[list[Entry]]:
        """Each group's used slots in queue (ticket) order, by group: a streamed snapshot's as they are read."""
        entries = sorted(self.entries, key=_GROUP) if isinstance(self.entries, Sequence) else self.entries
        for _group, members in itertools.groupby(entries, key=_GROUP):
            yield sorted(members, key=_TICKET)

    def tally(self) -> Tally:
        """The counts of a snapshot read whole (a streamed one's are made as its rows are: ``stream``)."""
        tally = Tally()
        for group in self.groups():
            tally.add(group)
        return tally

    @property
    def used(self) -> int:
        return self.in_use if self.in_use is not None else len(tuple(self.entries))

    @property
    def granted(self) -> int:
        return self.tally().granted

    @property
    def kept(self) -> int:
        return self.tally().kept

    @property
    def waiting(self) -> int:
        return self.tally().waiting

    @property
    def max_in_group(self) -> int:
        return self.tally().max_in_group


_GROUP = operator.attrgetter("group")
#: What a lock row's queued column says of a request not granted.
_WAITING_WORDS = {int(SlotState.WAITING): "waiting", int(SlotState.DEADLOCK): "refused"}
_TIMESTAMPS = int(TableFlag.TIMESTAMPS)  # an int: a row tests it, and IntFlag's & costs a call
_TICKET = operator.attrgetter("slot.ticket")


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
    """(bytes used, bytes free): the header, the groups' ticket counters and the slots in use (each with its
    value word), and the rest."""
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
    used_bytes, free_bytes = memory(h, snapshot.used)
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


def column_heads(snapshot: Snapshot) -> str:
    """The heads of the lock rows (``age`` for a time-stamped table)."""
    timestamps = bool(snapshot.header.flags & TableFlag.TIMESTAMPS)
    return "\t".join(COLUMNS + ((AGE_COLUMN,) if timestamps else ()))


def lock_row(snapshot: Snapshot, e: Entry) -> str:
    """One used slot's tab-separated row."""
    s = e.slot
    queued = _WAITING_WORDS.get(s.state) or (str(s.queued) if s.queued else "None")
    if s.state == SlotState.KEPT:
        kept = kept_for(s.timestamp + snapshot.header.lock_delay, snapshot.now)
        queued = f"{kept}, {s.queued} queued" if s.queued else kept
    row = [
        str(e.group), f"0x{e.value:08x}", str(s.pid), modes.DISPLAY[s.mode], str(s.port), f"{s.inode:08d}",
        str(s.device), queued, unpack_ip(s.ip), printable(s.key[: s.key_len].decode("utf-8", "backslashreplace")),
    ]
    if snapshot.header.flags & _TIMESTAMPS:
        row.append(age(snapshot.now - s.timestamp))
    return "\t".join(row)


def lock_rows(snapshot: Snapshot) -> list[str]:
    """The column heads and one tab-separated row per used slot, by group and then in queue order."""
    return [column_heads(snapshot), *(lock_row(snapshot, e) for group in snapshot.groups() for e in group)]


def summary_lines(snapshot: Snapshot, tally: Tally | None = None) -> list[str]:
    """The summary after a blank line: the table's size, the locks in use, the fullest group, the waiters;
    counted in ``tally`` (by default the snapshot's own, read whole)."""
    g = snapshot.geometry
    t = tally or snapshot.tally()
    indent = " " * LABEL_WIDTH
    text = [
        "",
        f"{'Record locks:':<{SUMMARY_WIDTH}}{g.locks} locks maximum in {g.ngroups} groups of "
        f"{g.per_group} locks/group",
        f"{indent}{t.granted + t.kept} locks currently in use",
        f"{indent}{t.max_in_group} is max. locks found in one group",
    ]
    if t.kept:
        text.append(f"{indent}{t.kept} locks kept for their clients to reclaim "
                    f"(lock-delay {snapshot.header.lock_delay:g} s)")
    if t.waiting:
        text.append(f"{indent}{t.waiting} requests waiting")
    if t.converting:
        text.append(f"{indent}{t.converting} of them converting a lock held")
    if t.refused:
        text.append(f"{indent}{amount(t.refused, 'request')} refused to break a deadlock")
    return text


def queue_rows(group: list[Entry]) -> list[str]:
    """One tab-separated row per resource of a group's used slots (``queues``): its group, value, i-node,
    dev and key as the lock rows show them, whether its value block is valid, and its requests by state,
    each "port mode" in queue order, a held lock's with its fencing token ("#12"), a kept one's "kept", a
    conversion's mode as held->wanted, "-" for none."""
    by_resource: dict[tuple[int, int, int, str], list[dict[str, Any]]] = {}
    for e in group:
        entry = info.entry_json(e)
        by_resource.setdefault(queues.resource(entry), []).append(entry)
    rows = []
    for (value, inode, device, key), entries in by_resource.items():
        parts: dict[str, list[str]] = {"granted": [], "converting": [], "waiting": [], "refused": []}
        for request in queues.in_queue_order(entries):
            state = queues.request_state(request)
            token = queues.token(request)
            word = f"{request['port']} {queues.mode_change(str(request['mode']), queues.held_mode(request, entries))}"
            word += (f" #{token}" if token is not None else "") + (" kept" if state == "kept" else "")
            parts.get("granted" if state in queues.HELD else state, parts["waiting"]).append(word)
        rows.append("\t".join((str(entries[0]["group"]), f"0x{value:08x}", f"{inode:08d}", str(device), printable(key),
                               queues.block_word(queues.block_valid(entries)),
                               *(", ".join(words) or "-" for words in parts.values()))))
    return rows


def stream(
    snapshot: Snapshot, monitor: Process, listener: Process, *, details: bool = True, very: bool = False,
    locks: bool = True, show_queues: bool = False,
) -> Iterator[str]:
    """The whole text, a line at a time (without newlines), each row made as its group is read: ``jdls -d``,
    with ``details`` ``-dv`` (``very``: ``-dvv``), with ``locks`` ``-dL``; the defaults are ``jdls -dvL``.
    ``show_queues`` adds each resource's queues after the summary (``queue_rows``: made as the groups are read,
    kept until the summary is written, a line per resource)."""
    yield from process_lines(monitor, listener)
    yield line("Program started", when(snapshot.header.created))
    if details:
        yield from detail_lines(snapshot, very)
    if locks:
        yield from ("", "Record locks outstanding", "", column_heads(snapshot))
    tally = Tally()
    resources: list[str] = []
    for group in snapshot.groups():
        tally.add(group)
        if locks:
            for e in group:
                yield lock_row(snapshot, e)
        if show_queues:
            resources += queue_rows(group)
    yield from summary_lines(snapshot, tally)
    if show_queues:
        yield from ("", QUEUES_TITLE, "", "\t".join(QUEUE_COLUMNS), *resources)


def lines(
    snapshot: Snapshot, monitor: Process, listener: Process, *, details: bool = True, very: bool = False,
    locks: bool = True,
) -> list[str]:
    """``stream``'s text as a list."""
    return list(stream(snapshot, monitor, listener, details=details, very=very, locks=locks))


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

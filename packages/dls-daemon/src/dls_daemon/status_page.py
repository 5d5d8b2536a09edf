"""The live status page's data (issue 15): the JSON of ``/api/locks`` and ``/api/history``.

The page itself is one self-contained file, ``data/status.html`` (HTML, CSS, plain JS drawing SVG; nothing
fetched from elsewhere: the operator installs nothing and may have no Internet); it asks these two routes every
two seconds and draws what they say.

``/api/locks`` is the table now, as show-item-locks --queues --json shows it (``dls_shm.rows``, every request
of every resource joined with the clients' proc/info documents for file names), each row naming its owner; who
waits for whom (``LockTable.wait_for``: ``dls_shm.deadlocks.blockers``, the one rule the lock path and the
deadlock detector use), with any cycle; and the resources with the most requests. It is made from one
``scan``: each group's semaphore is held only while the group is copied.

``/api/history`` is the last hour, sampled by the monitor in its loop (``History.sample``, every
SAMPLE_PERIOD seconds): grants (the table's tickets issued less the waits begun: a lock granted at once takes
one ticket, a waiter one to queue and one when granted, and its wait is counted once in ``waits_begun``),
locks held, requests waiting and their ages, and which resources had waiters. A sample copies only the groups
that have a waiting request and counts the slots in use from the groups' values (what ``jdls -dv`` does), so
the monitor's tick, which also tidies and breaks deadlocks, stays cheap.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dls_shm import Entry, Instance, LockTable, SlotState, deadlocks, info, modes, rows, unpack_ip
from dls_shm.report import printable

from . import meter
from .web import Query, Reply, WebServer, text

#: Seconds between the monitor's samples of the history.
SAMPLE_PERIOD = 5.0
#: How long the history goes back (seconds).
HISTORY_SPAN = 3600.0
#: How many resources the hottest lists name.
HOTTEST = 10
#: At most this many requests are sent (the first groups'): a browser that refreshes every 2 s is no place for a
#: million rows (the graph and the hottest records are made of them all).
MAX_REQUESTS = 5000

_WAITING, _DEADLOCK = int(SlotState.WAITING), int(SlotState.DEADLOCK)


def owner_name(port_owners: bool, pid: int, thread: int, port: int, ip: str) -> str:
    """The page's name of an owner, as the table tells owners apart (``LockTable.owner_of``): by (port,
    thread, address) in a table made with jdls -P, else by (pid, thread)."""
    return f"{ip}:{port}/{thread}" if port_owners else f"{pid}/{thread}"


def owner_label(pid: int, thread: int, port: int, ip: str, client_pid: int) -> str:
    """How the page shows an owner: a local process by its pid, a client by its address and port."""
    if ip == info.LOCAL_ADDRESS:
        return f"local pid {pid} thread {thread}"
    return f"{ip} port {port} pid {client_pid or pid} thread {thread}"


def locks_document(table: LockTable, instance: Instance) -> dict[str, Any]:
    """``/api/locks``: the requests (``rows``; ``total`` says how many there are when MAX_REQUESTS is less), the
    wait-for graph (``graph``) and the hottest resources now.

    One pass of ``scan`` counts every request for the hottest records and keeps at most the first MAX_REQUESTS,
    in whole groups (a resource's queue is in one group); the graph is made from the groups that have a waiting request
    (``waiting_entries``). Neither holds more than that in memory, whatever the table's size."""
    delay = table.lock_delay
    hottest = Hottest()
    kept: list[dict[str, Any]] = []
    total = 0
    cut = -1  # the group of the first request left out
    for e in table.scan():
        total += 1
        hottest.add(e)
        if len(kept) < MAX_REQUESTS:
            kept.append(info.entry_json(e, delay))
        elif cut < 0:
            cut = e.group
    kept = [entry for entry in kept if entry["group"] != cut]  # a group's requests all, or none
    now = time.time()
    port_owners = table.port_owners
    requests = [{**row, "owner": owner_name(port_owners, row["pid"], row["thread"], row["port"], row["ipaddr"]),
                 "owner_label": owner_label(row["pid"], row["thread"], row["port"], row["ipaddr"], row["client_pid"])}
                for row in rows.build_rows(kept, list(info.read_all(instance)), every=True)]
    return {
        "time": now,
        "host": socket.gethostname(),
        "port_owners": port_owners,
        "requests": requests,
        #: The requests in the table; more than MAX_REQUESTS are cut to that many (the page says so).
        "total": total,
        "graph": wait_graph(table, table.waiting_entries()),
        "hottest": hottest.top(requests),
    }


def wait_graph(table: LockTable, entries: list[Entry]) -> dict[str, Any]:
    """Owners as nodes, an edge from each waiting request's owner to every owner that blocks it (``wait_for``),
    and the owners of any cycle (the monitor refuses one request of a cycle within a moment: one seen here is
    about to be broken)."""
    port_owners = table.port_owners
    names: dict[tuple[Any, ...], dict[str, Any]] = {}
    for e in entries:
        s = e.slot
        ip = unpack_ip(s.ip)
        names.setdefault(table.owner_of(s), {
            "id": owner_name(port_owners, s.pid, s.thread, s.port, ip),
            "label": owner_label(s.pid, s.thread, s.port, ip, s.client_pid),
        })
    edges = table.wait_for(entries)
    in_cycle = {w.owner for cycle in deadlocks.cycles(list(edges)) for w in cycle.waiters}
    out: list[dict[str, Any]] = []
    involved: set[tuple[Any, ...]] = set()
    for waiter, owners in edges:
        key = waiter.slot.key[: waiter.slot.key_len].decode("utf-8", "backslashreplace")
        for owner in sorted(owners, key=str):
            if owner not in names:
                continue  # a slot freed between the copies of two batches: drawn at the next refresh
            involved.update((waiter.owner, owner))
            out.append({"from": names[waiter.owner]["id"], "to": names[owner]["id"], "key": printable(key),
                        "mode": modes.NAMES[waiter.slot.mode], "cycle": waiter.owner in in_cycle and owner in in_cycle})
    nodes = [{**names[o], "cycle": o in in_cycle} for o in sorted(involved, key=lambda o: names[o]["id"])]
    return {"nodes": nodes, "edges": out}


class Hottest:
    """The resources with the most requests now (granted, kept or waiting, a conversion too; refused ones are
    on their way out), counted a slot at a time (``add``) over the whole table."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[int, int, str]] = Counter()
        self.waiting: Counter[tuple[int, int, str]] = Counter()

    def add(self, entry: Entry) -> None:
        s = entry.slot
        if s.state == _DEADLOCK:
            return
        resource = (s.inode, s.device, s.key[: s.key_len].decode("utf-8", "backslashreplace"))
        self.counts[resource] += 1
        if s.state == _WAITING:
            self.waiting[resource] += 1

    def top(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The HOTTEST most requested, most first, named as ``requests`` name their files (a resource not among
        them, or only a local process's request, which names no file: by its inode)."""
        names: dict[tuple[int, int], str] = {}
        for r in requests:
            if (r["inode"], r["device"]) not in names or r["filename"] != rows.inode_name(r["inode"]):
                names[r["inode"], r["device"]] = r["filename"]
        return [{"filename": names.get((i, d)) or rows.inode_name(i), "key": printable(k), "requests": n,
                 "waiting": self.waiting[i, d, k]} for (i, d, k), n in self.counts.most_common(HOTTEST)]


@dataclass(frozen=True)
class Sample:
    """One look at the table: when, the grants so far, locks held, requests waiting and their ages."""

    time: float
    grants: int
    held: int
    waiting: int
    wait_max: float
    wait_mean: float
    #: The resources that had a waiting request: (inode, device, key).
    contended: tuple[tuple[int, int, str], ...]
    #: The metrics' wait-time histogram so far (its count in each of meter.BUCKETS and above them; the
    #: lock servers' figures): empty when there is none.
    waits: tuple[float, ...] = ()


class History:
    """The last hour of samples (a ring), taken by the monitor in its loop (``due``, then ``sample``)."""

    def __init__(self, period: float = SAMPLE_PERIOD, span: float = HISTORY_SPAN) -> None:
        self.period = period
        self.samples: deque[Sample] = deque(maxlen=max(2, int(span / period) + 1))
        #: When the next sample is due (time.monotonic()).
        self.next_due = 0.0

    def due(self, now: float) -> bool:
        """Whether a sample is due at ``now`` (time.monotonic()); if so, the next one is planned."""
        if now < self.next_due:
            return False
        self.next_due = now + self.period
        return True

    def sample(self, table: LockTable, waits: Sequence[float] = ()) -> Sample:
        """Look at the table now: its grants, held locks and waiting requests (only the groups with one are
        copied), and keep it, with ``waits``, the metrics' wait-time histogram so far (meter.BUCKETS' counts)."""
        grants = table.tickets_issued() - table.header().waits_begun
        used = table.slots_in_use()
        waiting = table.waiting_entries()
        now = time.time()
        ages = [max(0.0, now - e.slot.timestamp) for e in waiting if e.slot.state == _WAITING]
        not_held = sum(1 for e in waiting if e.slot.state in (_WAITING, _DEADLOCK))
        contended = sorted({(e.slot.inode, e.slot.device, e.slot.key[: e.slot.key_len].decode("utf-8",
                                                                                                "backslashreplace"))
                            for e in waiting if e.slot.state == _WAITING})
        taken = Sample(now, grants, max(0, used - not_held), len(ages), max(ages, default=0.0),
                       sum(ages) / len(ages) if ages else 0.0, tuple(contended),
                       tuple(waits[: len(meter.BUCKETS) + 1]))
        self.samples.append(taken)
        return taken

    def document(self) -> dict[str, Any]:
        """``/api/history``: each sample with the lock rate since the one before (grants a second), the
        resources most often contended (in how many samples they had a waiter), and the waits that ended in
        the span by how long they took (``wait_histogram``: the metrics' histogram, the first sample's counts
        taken from the last's; ``le`` the buckets' upper bounds, null the last, unbounded)."""
        points = []
        before: Sample | None = None
        contended: Counter[tuple[int, int, str]] = Counter()
        samples = tuple(self.samples)  # a copy: the monitor's loop appends while a request thread reads
        for s in samples:
            rate = None
            if before is not None and s.time > before.time:
                rate = max(0, s.grants - before.grants) / (s.time - before.time)
            points.append({"time": s.time, "rate": rate, "held": s.held, "waiting": s.waiting,
                           "wait_max": s.wait_max, "wait_mean": s.wait_mean})
            contended.update(s.contended)
            before = s
        return {
            "period": self.period,
            "samples": points,
            "contended": [{"inode": i, "device": d, "key": printable(k), "samples": n}
                          for (i, d, k), n in contended.most_common(HOTTEST)],
            "wait_histogram": wait_histogram(samples),
        }


def wait_histogram(samples: Sequence[Sample]) -> dict[str, Any]:
    """The waits that ended between the first and the last of ``samples``, by bucket (see ``document``)."""
    first = samples[0].waits if samples else ()
    last = samples[-1].waits if samples else ()
    counts = [max(0.0, b - a) for a, b in zip(first, last, strict=True)] if len(first) == len(last) else []
    return {"le": [*meter.BUCKETS, None], "counts": counts}


def add_routes(web: WebServer, table: Callable[[], LockTable | None], instance: Instance, history: History) -> None:
    """Serve ``/api/locks`` (from the table ``table()`` gives: the monitor's, None once it has let go of it)
    and ``/api/history`` on ``web``, the monitor's HTTP server (``/`` serves the page)."""

    def locks(query: Query) -> Reply:
        now = table()
        if now is None:
            return text(503, "503 the lock monitor has no lock table (stopping)")
        return json_reply(locks_document(now, instance))

    web.add("/api/locks", locks)
    web.add("/api/history", lambda query: json_reply(history.document()))


def json_reply(document: dict[str, Any]) -> Reply:
    return Reply(200, "application/json", json.dumps(document, separators=(",", ":")).encode())

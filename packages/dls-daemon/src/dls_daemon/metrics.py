"""``/metrics``: the monitor's figures in the Prometheus text format, made with prometheus_client.

A CollectorRegistry of the monitor's own (not the library's global one, which
would add the library's process metrics and anything else imported) holds one
collector, evaluated at each scrape:

- the table: its used slots copied a batch of groups at a time by dls_shm's
  report code (``Snapshot.streamed``, as ``jdls -dL`` and show-item-locks read
  it: each batch's semaphores held only for its copy, the counting done after),
  and the groups' ticket counters (``LockTable.tickets_issued``);
- the lock servers' counts, which each sends the monitor as deltas over
  ``run/metrics.sock`` (see ``meter``) and ``Totals`` adds up, so that they
  outlive the lock servers;
- the monitor's own: tidy-ups, the locks they freed and kept, deadlocks broken;
  the lock servers running (run/servers) and the clients that published their
  lock information (proc/info).

The monitor's loop reads the datagrams (``Totals.drain``); a scrape runs in an
HTTP thread; the two meet under ``Totals.lock``, held only to add or copy a few
dozen numbers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

from dls_proto import ErrorCode, RefuseReason
from dls_shm import Instance, LockTable, SlotState, modes, running_servers
from dls_shm import info as info_files
from dls_shm.report import Snapshot, Tally
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .meter import BUCKETS, MODES, VERSION, short_address, socket_path
from .web import Reply

#: What ``generate_latest`` writes: the Prometheus text format 0.0.4 (every name here is a classic one, so the
#: format's 1.0.0, which the library's newest versions call latest, would read the same).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The largest datagram read (a lock server's are a few hundred bytes).
MAX_DATAGRAM = 8192
#: Most datagrams read in one round of the monitor's loop (the rest wait for the next round).
MAX_PER_ROUND = 1000
_HISTOGRAM_LENGTH = len(BUCKETS) + 2  # the bucket counts, +Inf's, and the sum
_REASONS = {int(r): r.name for r in RefuseReason}
_CODES = {int(c): c.name for c in ErrorCode}


class BadDatagram(ValueError):
    """A datagram that is not a lock server's counts."""


class Totals:
    """The lock servers' counts added up, and the monitor's own (tidy-ups, deadlocks broken)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.grants = [0] * MODES
        self.refusals: dict[int, int] = dict.fromkeys(_REASONS, 0)
        self.errors: dict[int, int] = dict.fromkeys(_CODES, 0)
        self.cancels = 0
        self.wait = [0.0] * _HISTOGRAM_LENGTH
        self.handoff = [0.0] * _HISTOGRAM_LENGTH
        self.tidies = 0
        self.tidy_freed = 0
        self.tidy_kept = 0
        self.deadlocks = 0
        self.datagrams = 0
        self.bad_datagrams = 0

    def add(self, payload: bytes) -> None:
        """One lock server's deltas; BadDatagram (nothing added) when they are not well formed."""
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            raise BadDatagram("not JSON") from None
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise BadDatagram(f"not a version {VERSION} object")
        grants = _counts(doc.get("grants", [0] * MODES), MODES, "grants")
        refusals = _coded(doc.get("refusals", {}), _REASONS, "refusals")
        errors = _coded(doc.get("errors", {}), _CODES, "errors")
        cancels = _count(doc.get("cancels", 0), "cancels")
        wait = _histogram(doc.get("wait"), "wait")
        handoff = _histogram(doc.get("handoff"), "handoff")
        with self.lock:
            self.grants = [a + b for a, b in zip(self.grants, grants, strict=True)]
            for code, n in refusals.items():
                self.refusals[code] += n
            for code, n in errors.items():
                self.errors[code] += n
            self.cancels += cancels
            for mine, theirs in ((self.wait, wait), (self.handoff, handoff)):
                if theirs is not None:
                    for i, value in enumerate(theirs):
                        mine[i] += value
            self.datagrams += 1


def _count(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise BadDatagram(f"{what}: not a count")
    return value


def _counts(value: object, length: int, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) != length:
        raise BadDatagram(f"{what}: not {length} counts")
    return [_count(v, what) for v in value]


def _coded(value: object, known: dict[int, str], what: str) -> dict[int, int]:
    if not isinstance(value, dict):
        raise BadDatagram(f"{what}: not an object")
    out = {}
    for key, n in value.items():
        code = int(key) if isinstance(key, str) and key.isdigit() else -1
        if code not in known:
            raise BadDatagram(f"{what}: unknown code {key!r}")
        out[code] = _count(n, what)
    return out


def _histogram(value: object, what: str) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != _HISTOGRAM_LENGTH:
        raise BadDatagram(f"{what}: not {_HISTOGRAM_LENGTH} numbers")
    counts = [float(_count(v, what)) for v in value[:-1]]
    total = value[-1]
    if type(total) not in (int, float) or not 0 <= total < float("inf"):
        raise BadDatagram(f"{what}: not a sum of seconds")
    return [*counts, float(total)]


class Receiver:
    """The monitor's end of ``run/metrics.sock``: bound at the monitor's start (mode 0600: only the service's
    user, whose lock servers send, may write to it), read by its loop."""

    def __init__(self, instance: Instance, totals: Totals, log: logging.Logger) -> None:
        self.totals = totals
        self.log = log
        self.path = socket_path(instance.run_dir)
        _unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        address, fd = short_address(self.path)
        old = os.umask(0o177)  # no thread runs yet (the HTTP server's starts in Monitor.run)
        try:
            self.sock.bind(address)
        except OSError:
            self.sock.close()
            raise
        finally:
            os.umask(old)
            if fd is not None:
                os.close(fd)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> None:
        """Read the datagrams that came (up to MAX_PER_ROUND): each added, or ignored and logged."""
        for _ in range(MAX_PER_ROUND):
            try:
                payload = self.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            try:
                self.totals.add(payload)
            except BadDatagram as exc:
                with self.totals.lock:
                    self.totals.bad_datagrams += 1
                self.log.warning("metrics: a datagram of %d bytes on %s ignored: %s", len(payload), self.path, exc)

    def close(self) -> None:
        self.sock.close()
        _unlink(self.path)


def _unlink(path: str) -> None:
    """Remove a socket file that may not be there (one of an earlier monitor, killed)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ServiceCollector(Collector):
    """The figures of one scrape (see the module docstring)."""

    def __init__(self, instance: Instance, table: LockTable, totals: Totals) -> None:
        self.instance = instance
        self.table = table
        self.totals = totals

    def collect(self) -> Iterator[Any]:
        yield from self._table()
        yield from self._lock_servers()
        yield from self._monitor()

    def _table(self) -> Iterator[Any]:
        table = self.table
        held = [0] * MODES
        waiting = [0] * MODES
        tally = Tally()
        for group in Snapshot.streamed(table, count=False).groups():
            tally.add(group)
            for e in group:
                state = e.slot.state
                if state == SlotState.GRANTED:
                    held[e.slot.mode] += 1
                elif state == SlotState.WAITING:
                    waiting[e.slot.mode] += 1
        g = table.geometry
        yield _by_mode(GaugeMetricFamily("dls_locks_held", "Locks granted in the table now, by mode (kept locks "
                                         "of ended lock servers not included: see dls_locks_kept)", labels=["mode"]),
                       held)
        yield _by_mode(GaugeMetricFamily("dls_requests_waiting", "Requests waiting in the table now, by the mode "
                                         "they want (conversions included)", labels=["mode"]), waiting)
        yield GaugeMetricFamily("dls_requests_converting", "Of the waiting requests, the conversions of a held lock",
                                value=tally.converting)
        yield GaugeMetricFamily("dls_locks_kept", "Locks kept for their clients to reclaim (their lock server "
                                "ended; freed at the lock-delay's end)", value=tally.kept)
        yield GaugeMetricFamily("dls_table_slots_used", "Slots of the table in use (granted, kept, waiting)",
                                value=tally.used)
        yield GaugeMetricFamily("dls_table_slots", "Slots (locks) of the table", value=g.locks)
        yield GaugeMetricFamily("dls_table_groups", "Lock groups of the table (a record's group is fixed by its "
                                "key; a full group refuses new locks)", value=g.ngroups)
        yield GaugeMetricFamily("dls_table_fullest_group_slots", "Slots in use in the fullest lock group",
                                value=tally.max_in_group)
        yield GaugeMetricFamily("dls_table_fullest_group_ratio", "Occupancy of the fullest lock group: its slots in "
                                "use over the slots of a group (1: the next lock of a record there is refused)",
                                value=tally.max_in_group / g.per_group)
        yield CounterMetricFamily("dls_table_tickets", "Tickets (fencing tokens) the table's groups have issued "
                                  "since the table was made: one for every lock granted at once, every request "
                                  "queued, every grant to a waiter and every conversion up, local processes' and "
                                  "remote clients' alike", value=table.tickets_issued())

    def _lock_servers(self) -> Iterator[Any]:
        t = self.totals
        with t.lock:
            grants, refusals, errors = list(t.grants), dict(t.refusals), dict(t.errors)
            cancels, wait, handoff = t.cancels, list(t.wait), list(t.handoff)
            datagrams, bad = t.datagrams, t.bad_datagrams
        yield _by_mode(CounterMetricFamily("dls_grants", "Locks granted to remote clients by their lock servers "
                                           "(at once, after a wait, or reclaimed), by mode", labels=["mode"]), grants)
        family = CounterMetricFamily("dls_refusals", "Lock and conversion requests refused to remote clients, by "
                                     "reason (BUSY: held and no wait asked; TIMEOUT; CANCELLED; DEADLOCK)",
                                     labels=["reason"])
        for code, name in _REASONS.items():
            family.add_metric([name], refusals[code])
        yield family
        yield CounterMetricFamily("dls_cancels", "Waiting requests withdrawn by their client (Cancel)", value=cancels)
        family = CounterMetricFamily("dls_errors", "Error replies sent to remote clients, by code", labels=["code"])
        for code, name in _CODES.items():
            family.add_metric([name], errors[code])
        yield family
        yield _histogram_family("dls_wait_seconds", "Time from a remote request's arrival to its grant sent, for "
                                "requests that waited", wait)
        yield _histogram_family("dls_handoff_seconds", "Hand-off time: from the lock server's wake-up by its "
                                "doorbell (rung by the release that let a waiting request in) to the grant sent to "
                                "the client", handoff)
        yield CounterMetricFamily("dls_metrics_datagrams", "Count datagrams received from lock servers (each sends "
                                  "at most one a second, and one as it ends)", value=datagrams)
        yield CounterMetricFamily("dls_metrics_bad_datagrams", "Datagrams on the metrics socket ignored as not "
                                  "well formed (each logged)", value=bad)

    def _monitor(self) -> Iterator[Any]:
        t = self.totals
        with t.lock:
            tidies, freed, kept, deadlocks = t.tidies, t.tidy_freed, t.tidy_kept, t.deadlocks
        yield CounterMetricFamily("dls_tidies", "Tidy-ups the monitor ran (periodic, when a kept lock is due, at "
                                  "start and stop)", value=tidies)
        yield CounterMetricFamily("dls_tidy_freed_locks", "Locks of dead owners freed by tidy-ups", value=freed)
        yield CounterMetricFamily("dls_tidy_kept_locks", "Locks of ended lock servers kept by tidy-ups for their "
                                  "clients to reclaim", value=kept)
        yield CounterMetricFamily("dls_deadlocks_broken", "Cycles of waiting requests broken by the monitor (one "
                                  "request of each refused DEADLOCK)", value=deadlocks)
        servers = len(running_servers(self.instance, tidy=False))
        yield GaugeMetricFamily("dls_lock_servers", "Lock servers running (one per remote client connection)",
                                value=servers)
        clients = sum(1 for _ in info_files.read_all(self.instance))
        yield GaugeMetricFamily("dls_clients_published", "Remote clients whose lock information document is in "
                                "proc/info (clients that published it; all connections: dls_lock_servers)",
                                value=clients)


def _by_mode(family: Any, values: list[int]) -> Any:
    for mode, value in enumerate(values):
        family.add_metric([modes.NAMES[mode]], value)
    return family


def _histogram_family(name: str, documentation: str, values: list[float]) -> HistogramMetricFamily:
    """A histogram from bucket counts (not cumulative), +Inf's count and the sum (``meter.Histogram``)."""
    cumulative = []
    running = 0.0
    for bound, count in zip((*BUCKETS, float("inf")), values[:-1], strict=True):
        running += count
        cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=values[-1])


class Metrics:
    """``/metrics`` of one monitor: its registry and the handler the web server calls."""

    def __init__(self, instance: Instance, table: LockTable, totals: Totals) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(instance, table, totals))

    def handler(self, query: dict[str, list[str]]) -> Reply:
        return Reply(200, CONTENT_TYPE, generate_latest(self.registry))

"""The history checker: from the logs alone, did the service keep its one promise?

A lock has at most one holder, and a holder that loses its lock is told. The checker proves it per
record from what the workers and the injector wrote (``history``), with CLOCK_MONOTONIC times:

- **No overlap.** A critical section is [enter, end]. Its end is when its worker stopped acting on the
  record: its exit (logged before release, as the next holder may be granted before release returns);
  for a lock it was told it lost, when it was first told, or its last write if that came later; for a
  worker killed (or dead) inside its section, the kill, or its last line if that came later. No section
  of a record may begin before another one's end. A holder killed before the next entered is no
  overlap: its end is the kill.
- **Exact counters.** Taken in the order they entered, every section that read the counter read what
  the writes before it left; the file's value at the end is what the last writes left. The one
  ambiguity allowed: a worker killed between "writing" and "wrote" left either value.
- **A history that makes sense.** Sections that never end without a kill, workers that died by
  themselves, services that could not be restarted are failures of the run, reported too.

``check`` gives a ``Verdict``: the problems found and the run's figures.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .history import (
    BEGIN,
    DIED,
    END,
    ENTER,
    ERROR,
    EXIT,
    KILL,
    LOST,
    READ,
    RESTART,
    STOP,
    WRITING,
    WROTE,
    Event,
    History,
)

#: How many problems of each kind a report spells out (the figures count them all).
SHOWN = 10


@dataclass
class Section:
    """One critical section of one worker on one record, as its log and the injector's tell it."""

    worker: str
    n: int
    record: int
    enter: float
    read: int | None = None
    writing: int | None = None
    wrote: int | None = None
    #: When it last acted on the record (enter, read, writing, wrote).
    acted: float = 0.0
    exit: float | None = None
    #: When it was first told its lock was lost, and how.
    told: float | None = None
    how: str | None = None
    #: When its worker was killed (or found dead) inside it.
    killed: float | None = None
    #: Its last line.
    last: float = 0.0

    @property
    def end(self) -> float | None:
        """When it stopped acting on the record (see the module docstring); None if its log never says."""
        stops = [t for t in (self.exit, self.told) if t is not None]
        if stops:
            return max(min(stops), self.acted)
        if self.killed is not None:
            return max(self.killed, self.last)
        return None

    @property
    def torn(self) -> bool:
        """Its worker was killed between "writing" and "wrote": the counter holds either value."""
        return self.writing is not None and self.wrote is None and self.killed is not None

    def describe(self, origin: float) -> str:
        end = self.end
        how = (f"told {self.told - origin:.3f} by {self.how}" if self.told is not None else
               f"killed {self.killed - origin:.3f}" if self.killed is not None and self.exit is None else "exited")
        until = "?" if end is None else f"{end - origin:.3f}"
        return f"{self.worker} #{self.n} [{self.enter - origin:.3f}, {until}] ({how})"


@dataclass(frozen=True)
class Overlap:
    """``second`` entered the record before ``first`` ended."""

    first: Section
    second: Section


@dataclass(frozen=True)
class BadRead:
    """A section read a counter value other than what the writes before it left: an update was lost."""

    section: Section
    expected: frozenset[int]


@dataclass
class Verdict:
    """What the checker found, and the run's figures."""

    sections: int = 0
    #: Sections that wrote their counter.
    completed: int = 0
    overlaps: list[Overlap] = field(default_factory=list)
    lost_updates: list[BadRead] = field(default_factory=list)
    #: Records whose file at the end is not what the writes left.
    final: list[str] = field(default_factory=list)
    #: Logs that do not make sense, workers that died, services that did not restart.
    broken: list[str] = field(default_factory=list)
    #: Sections whose worker was told the lock was lost, by how it was told first.
    told: Counter[str] = field(default_factory=Counter)
    #: Holders killed inside their section.
    killed_holders: int = 0
    #: Faults injected: "kill TARGET" / "stop TARGET".
    faults: Counter[str] = field(default_factory=Counter)
    #: Failed lock requests, by exception.
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    origin: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.overlaps or self.lost_updates or self.final or self.broken)

    def problems(self) -> list[str]:
        """Each problem in words (at most SHOWN of each kind, then how many more)."""
        o = self.origin
        lines: list[str] = []
        _some(lines, [f"R{v.first.record}: {v.second.describe(o)} entered while {v.first.describe(o)} held it"
                      for v in self.overlaps], "overlaps")
        _some(lines, [f"R{b.section.record}: {b.section.describe(o)} read {b.section.read}, the writes before it "
                      f"left {sorted(b.expected)}" for b in self.lost_updates], "lost updates")
        _some(lines, self.final, "final values")
        _some(lines, self.broken, "failures of the run")
        return lines

    def figures(self) -> str:
        """The run's figures, one per line."""
        per_second = self.completed / self.seconds if self.seconds > 0 else 0.0
        told = ", ".join(f"{how} {n}" for how, n in sorted(self.told.items())) or "none"
        return "\n".join([
            f"sections        {self.sections} ({self.completed} wrote their counter, {per_second:.1f}/s over "
            f"{self.seconds:.1f} s)",
            f"overlaps        {len(self.overlaps)}",
            f"lost updates    {len(self.lost_updates)} (final values wrong: {len(self.final)})",
            f"locks lost      {sum(self.told.values())} told ({told})",
            f"killed holders  {self.killed_holders}",
            f"faults          {_counts(self.faults)}",
            f"lock errors     {_counts(self.errors)}",
            f"run failures    {len(self.broken)}",
        ])


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{what} {n}" for what, n in sorted(counter.items())) or "none"


def _some(lines: list[str], items: list[str], what: str) -> None:
    lines.extend(items[:SHOWN])
    if len(items) > SHOWN:
        lines.append(f"... and {len(items) - SHOWN} more {what}")


def check(history: History) -> Verdict:
    """Check ``history`` (see the module docstring)."""
    verdict = Verdict()
    ended = _ends_of_workers(history.faults)
    sections: list[Section] = []
    for worker, events in sorted(history.workers.items()):
        sections.extend(_sections(worker, events, ended.get(worker), verdict))
    verdict.sections = len(sections)
    verdict.completed = sum(1 for s in sections if s.wrote is not None)
    verdict.killed_holders = sum(1 for s in sections if s.killed is not None and s.exit is None)
    for s in sections:
        if s.how is not None:
            verdict.told[s.how] += 1
    records = sorted(set(history.initial) | {s.record for s in sections})
    for record in records:
        mine = sorted((s for s in sections if s.record == record and s.end is not None), key=lambda s: s.enter)
        verdict.overlaps.extend(_overlaps(mine))
        _counter(record, mine, history, verdict)
    _faults(history.faults, verdict)
    verdict.origin = min((e["t"] for e in history.faults if e["ev"] == BEGIN), default=_first_time(history))
    return verdict


def _ends_of_workers(faults: list[Event]) -> dict[str, float]:
    """When each worker that did not end by itself was killed or found dead."""
    return {e["worker"]: e["t"] for e in faults if e["ev"] in (KILL, DIED) and e.get("worker")}


def _sections(worker: str, events: list[Event], ended: float | None, verdict: Verdict) -> list[Section]:
    sections: dict[int, Section] = {}
    for event in events:
        kind, t = event["ev"], event["t"]
        if kind == ERROR:
            verdict.errors[event["error"].partition(":")[0]] += 1
        if "n" not in event:
            continue
        if kind == ENTER:
            sections[event["n"]] = Section(worker, event["n"], event["rec"], t, acted=t, last=t)
            continue
        section = sections.get(event["n"])
        if section is None:
            verdict.broken.append(f"{worker}: {kind} of section #{event['n']}, which never entered")
            continue
        section.last = max(section.last, t)
        if kind in (READ, WRITING, WROTE):
            setattr(section, kind, event["value"])  # the field of that name
            section.acted = max(section.acted, t)
        elif kind == EXIT:
            section.exit = t
        elif kind == LOST and (section.told is None or t < section.told):
            section.told, section.how = t, event["how"]
    ordered = sorted(sections.values(), key=lambda s: s.n)
    for section in ordered:
        if section.exit is None and section.told is None:
            if ended is not None and section is ordered[-1]:
                section.killed = ended
            else:
                verdict.broken.append(f"{worker}: section #{section.n} on R{section.record} never ended and its "
                                      "worker was not killed")
        if section.writing is not None and section.wrote is None and not section.torn:
            verdict.broken.append(f"{worker}: section #{section.n} began a write that never finished, and its "
                                  "worker was not killed")
    return ordered


def _overlaps(sections: list[Section]) -> list[Overlap]:
    """Every pair of sections of one record (in the order they entered) where the second entered before the
    first ended."""
    found: list[Overlap] = []
    active: list[Section] = []
    for section in sections:
        active = [a for a in active if _end(a) > section.enter]
        found.extend(Overlap(a, section) for a in active)
        active.append(section)
    return found


def _end(section: Section) -> float:
    end = section.end
    assert end is not None
    return end


def _counter(record: int, sections: list[Section], history: History, verdict: Verdict) -> None:
    """Follow the record's counter through its sections: each read must find what the writes before left."""
    left = frozenset({history.initial.get(record, 0)})
    for section in sections:
        if section.read is not None:
            if section.read not in left:
                verdict.lost_updates.append(BadRead(section, left))
            left = frozenset({section.read})
        if section.wrote is not None:
            left = frozenset({section.wrote})
        elif section.writing is not None:
            left = left | {section.writing}
    final = history.final.get(record)
    if final is not None and final not in left:
        verdict.final.append(f"R{record}: the file holds {final} at the end, the writes left {sorted(left)}")


def _faults(faults: list[Event], verdict: Verdict) -> None:
    begin = end = None
    for event in faults:
        kind = event["ev"]
        if kind in (KILL, STOP) and not event.get("final"):
            verdict.faults[f"{kind} {event['target']}"] += 1
        elif kind == RESTART and not event["ok"]:
            verdict.broken.append(f"the {event['target']} could not be restarted: {event.get('detail', '')}")
        elif kind == DIED:
            verdict.broken.append(f"worker {event.get('worker')} ended by itself with status {event.get('status')}: "
                                  f"{event.get('detail', '')}")
        elif kind == BEGIN:
            begin = event["t"]
        elif kind == END:
            end = event["t"]
    if begin is not None and end is not None:
        verdict.seconds = end - begin


def _first_time(history: History) -> float:
    return min((e["t"] for events in history.workers.values() for e in events), default=0.0)

"""The history of a chaos run: what workers and the fault injector write, and reading it back.

Every process of the run appends its own log, one JSON object per line, each line one ``write(2)`` on
a file opened O_APPEND: a line is whole or absent whatever kills the writer, and two threads of one
process never interleave within a line. Each line carries ``t``, ``time.monotonic()`` when it was
written: CLOCK_MONOTONIC is one clock for every process of the host, so the lines of different
processes can be compared, which is all the checker does.

A worker's events carry ``n``, the number of its critical section, because its lost-lock callback runs
in another thread and may write after the next section began. The names of the events and of the
injector's targets are here, once, for the writers and the checker.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- a worker's events ------------------------------------------------------------------

#: The worker process started (``pid``).
START = "start"
#: Its lock on record ``rec`` was granted: section ``n`` begins.
ENTER = "enter"
#: It read the record's counter: ``value``.
READ = "read"
#: It is about to write ``value`` (the value read plus one).
WRITING = "writing"
#: It wrote ``value``.
WROTE = "wrote"
#: The events after which a worker is inside its critical section and has yet to write.
BEFORE_WRITING = (ENTER, READ)
#: It was told its lock was lost, ``how``: by the on_lost callback, ensure_held or release.
LOST = "lost"
#: It stops touching the record and calls release(): the section ends (logged before the release, since
#: the next holder may be granted before release() returns).
EXIT = "exit"
#: release() returned, or raised (``error``).
RELEASED = "released"
#: A lock request failed (``error``): no section.
ERROR = "error"

# -- the injector's events ------------------------------------------------------------------

#: The injector began injecting faults / stopped.
BEGIN, END = "begin", "end"
#: SIGKILL of ``pids`` (``target``; a worker's ``worker`` id); logged once the signals were sent.
KILL = "kill"
#: SIGSTOP of ``pids``, then SIGCONT of them.
STOP, CONT = "stop", "cont"
#: What a kill stopped was started again (``ok``: whether it started; ``detail``).
RESTART = "restart"
#: A worker ended by itself (``status``): a failure of the run, noticed at ``t``.
DIED = "died"

#: What the injector hits: a worker, one lock server, the listener, the monitor, a whole service.
WORKER, LOCK_SERVER, LISTENER, MONITOR, SERVICE = "worker", "lock server", "listener", "monitor", "service"
TARGETS = (WORKER, LOCK_SERVER, LISTENER, MONITOR, SERVICE)

Event = dict[str, Any]


class Log:
    """A process's own history file, appended one whole line per event."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, event: str, **fields: Any) -> float:
        """Append ``event`` with ``fields`` and the time now; that time."""
        t = time.monotonic()
        os.write(self._fd, (json.dumps({"t": t, "ev": event, **fields}, separators=(",", ":")) + "\n").encode())
        return t

    def close(self) -> None:
        os.close(self._fd)


def read_log(path: Path) -> list[Event]:
    """The events of one log, in the order written; a last line cut short is left out."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def last_event(path: Path, tail: int = 1024) -> Event | None:
    """The last whole event of a log (None if there is none yet), read from its end."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            event: Event = json.loads(line)
            return event
    return None


@dataclass
class History:
    """Everything the checker looks at: each worker's events by worker id, the injector's events, and each
    record's counter at the start and at the end."""

    workers: dict[str, list[Event]] = field(default_factory=dict)
    faults: list[Event] = field(default_factory=list)
    initial: dict[int, int] = field(default_factory=dict)
    final: dict[int, int] = field(default_factory=dict)


#: The injector's log in a run's log directory; every other ``*.jsonl`` there is a worker's, named by its id.
FAULTS_LOG = "faults.jsonl"


def read_history(directory: Path, initial: dict[int, int], final: dict[int, int]) -> History:
    """The history written into ``directory`` by a run whose records held ``initial`` and then ``final``."""
    history = History(initial=dict(initial), final=dict(final))
    for path in sorted(directory.glob("*.jsonl")):
        if path.name == FAULTS_LOG:
            history.faults = read_log(path)
        else:
            history.workers[path.stem] = read_log(path)
    return history

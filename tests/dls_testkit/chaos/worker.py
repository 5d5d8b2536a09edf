"""A chaos worker: a real client process taking exclusive record locks as an application would.

``python -m dls_testkit.chaos CONFIG`` (CONFIG: the JSON of ``WorkerConfig``), with JDLS naming
the service (or SERVER and SERVER2). Until the stop file exists, it picks one of the records at random,
locks it EX, reads the record's counter, holds the lock for a random time (long critical sections are
what make a lost lock overlap the next holder), checks it still holds the lock, writes the counter plus
one, and releases, logging each step (``history``). It only uses the public client API: a lock's
``on_lost`` callback logs that the worker was told, ``ensure_held()`` (no round trip) decides whether it
writes, and a LockLost from ``release()`` is logged as told. After a failed request it tries again
shortly with the same client, which reconnects by itself.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dls_client import Client, DlsError, HeldLock, LockLost, Mode

from . import records
from .history import ENTER, ERROR, EXIT, LOST, READ, RELEASED, START, WRITING, WROTE, Log

#: How long a worker waits before it tries again after a failed request.
RETRY_PAUSE = (0.05, 0.2)


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker process does: its id, where it logs, the record files, the file that tells it to
    stop, the longest it holds a lock, and the seed of its choices."""

    id: str
    log: str
    records: list[str]
    stop: str
    max_hold: float
    seed: int

    def argument(self) -> str:
        return json.dumps(asdict(self))


class Worker:
    """One worker's loop (see the module docstring)."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.log = Log(Path(config.log))
        self.random = random.Random(config.seed)
        self.fds = [os.open(path, os.O_RDWR) for path in config.records]
        self.client = Client()
        self.sections = 0

    def run(self) -> None:
        self.log.write(START, pid=os.getpid())
        while not os.path.exists(self.config.stop):
            record = self.random.randrange(len(self.fds))
            held = self._lock(record)
            if held is None:
                time.sleep(self.random.uniform(*RETRY_PAUSE))
            else:
                self._section(record, held)

    def _lock(self, record: int) -> HeldLock | None:
        """The record's lock, or None after logging why not."""
        n = self.sections + 1

        def told(_held: HeldLock) -> None:
            self.log.write(LOST, n=n, rec=record, how="callback")

        try:
            held = self.client.lock(self.config.records[record], records.key(record), Mode.EX, on_lost=told)
        except (DlsError, OSError) as exc:
            self.log.write(ERROR, rec=record, error=_name(exc))
            return None
        self.sections = n
        self.log.write(ENTER, n=n, rec=record)
        return held

    def _section(self, record: int, held: HeldLock) -> None:
        n, fd = self.sections, self.fds[record]
        value = records.load(fd)
        self.log.write(READ, n=n, rec=record, value=value)
        time.sleep(self.random.uniform(0, self.config.max_hold))
        try:
            held.ensure_held()
        except LockLost:
            self.log.write(LOST, n=n, rec=record, how="ensure_held")
        else:
            self.log.write(WRITING, n=n, rec=record, value=value + 1)
            records.store(fd, value + 1)
            self.log.write(WROTE, n=n, rec=record, value=value + 1)
        self.log.write(EXIT, n=n, rec=record)
        try:
            held.release()
        except LockLost:
            self.log.write(LOST, n=n, rec=record, how="release")
        except (DlsError, OSError) as exc:
            self.log.write(RELEASED, n=n, rec=record, error=_name(exc))
            return
        self.log.write(RELEASED, n=n, rec=record)


def _name(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str]) -> int:
    config = WorkerConfig(**json.loads(argv[0]))
    Worker(config).run()
    return 0

"""The chaos loop: every so often, a fault on one process or a whole service, and what was killed restarted.

A fault is SIGKILL, or SIGSTOP for a while then SIGCONT, of one victim: a worker, a worker's lock server,
the listener, the monitor, or a whole service (its monitor, listener and lock servers at once). Faults are
dealt from a shuffled deck in which each kind appears as often as its weight says, a kill of every target
first, so that even a short run meets every kind of kill. A fault on a worker or a lock server most
often hits a worker inside its critical section (or the lock server serving it: the other end of its
connection), where a fault hurts. What a kill stopped is started again at once: a worker by a new worker
in its slot, the listener by ``jdls -ibD``, the monitor by ``jdls -ibA``, a service by ``jdls -ib`` (a lock
server needs nothing: its client connects again). Daemons are found by their pid files, checked against
their start time, so a reused pid is never signalled. Every action is logged with its time.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from dls_shm import LISTENER as LISTENER_ROLE
from dls_shm import MONITOR as MONITOR_ROLE
from dls_shm import pidfiles

from ..processes import alive
from ..service import Service
from ..waiting import wait_for
from .history import (
    BEGIN,
    CONT,
    END,
    KILL,
    LISTENER,
    LOCK_SERVER,
    MONITOR,
    RESTART,
    SERVICE,
    STOP,
    TARGETS,
    WORKER,
    Log,
)
from .workers import Workers

#: How often each target is hit, relative to the others (lock servers most: each client has its own).
WEIGHTS = {WORKER: 3, LOCK_SERVER: 6, LISTENER: 1, MONITOR: 1, SERVICE: 2}
#: How often a fault on a worker or a lock server picks a worker inside its critical section, when there is one.
HIT_HOLDERS = 0.75
#: How often a restart is tried before it is logged as failed.
RESTART_ATTEMPTS = 5


@dataclass
class Victim:
    """What one fault hits: a target, its service's number (a daemon's), its pids, and what the log says
    of it besides (a worker's id; for a lock server, the worker it serves and whether that one held a lock)."""

    target: str
    service: int | None
    pids: list[int]
    fields: dict[str, Any] = field(default_factory=dict)


class Injector:
    """Faults on ``services`` and ``workers`` for a while (see the module docstring), logged to ``log``."""

    def __init__(self, services: Sequence[Service], workers: Workers, log: Log, rng: random.Random, *,
                 pause: tuple[float, float], stop_for: tuple[float, float]) -> None:
        self.services = services
        self.workers = workers
        self.log = log
        self.random = rng
        self.pause = pause
        self.stop_for = stop_for
        #: The deck has its own random sequence: which faults come, in which order, depends on the seed alone.
        self._deck_random = random.Random(rng.random())
        self._deck: list[tuple[str, str]] = []

    def run(self, seconds: float) -> None:
        """Inject faults for ``seconds``."""
        self.log.write(BEGIN)
        deadline = time.monotonic() + seconds
        while True:
            time.sleep(self.random.uniform(*self.pause))
            self.workers.replace_dead()
            if time.monotonic() >= deadline:
                break
            self.step()
        self.log.write(END)

    def step(self) -> None:
        """The next fault of the deck, on a victim with a live process (the next fault while there is none)."""
        for _ in range(len(TARGETS)):
            target, fault = self._deal()
            victim = self._victim(target)
            if victim.pids:
                if fault == KILL:
                    self._kill(victim)
                else:
                    self._stop(victim)
                return

    def _deal(self) -> tuple[str, str]:
        if not self._deck:
            rest = [(t, f) for t in TARGETS for n in range(WEIGHTS[t]) for f in (KILL, STOP) if n or f != KILL]
            self._deck_random.shuffle(rest)
            first = [(t, KILL) for t in TARGETS]
            self._deck_random.shuffle(first)
            self._deck = [*rest, *first]  # dealt from the end: the kills of every target first
        return self._deck.pop()

    # -- victims ---------------------------------------------------------------------------

    def _victim(self, target: str) -> Victim:
        if target == WORKER:
            running = self.workers.slots[self._worker()]
            return Victim(target, None, [running.proc.pid], {"worker": running.id})
        number = self.random.randrange(len(self.services))
        instance = self.services[number].instance
        servers = live_pids(sorted(instance.servers_dir.glob("*.pid")))
        if target == LOCK_SERVER:
            slot = self._worker()
            running = self.workers.slots[slot]
            server = server_of(running.proc.pid, self.services[number].port, servers)
            fields = {"client": running.id, "holding": slot in self.workers.holding()}
            if server is None and servers:
                server, fields = self.random.choice(servers), {}
            return Victim(target, number, [] if server is None else [server], fields)
        roles = {LISTENER: (LISTENER_ROLE,), MONITOR: (MONITOR_ROLE,), SERVICE: (MONITOR_ROLE, LISTENER_ROLE)}[target]
        pids = live_pids([instance.pid_file(role) for role in roles])
        if target == SERVICE:
            pids += servers
            pids += [p for p in _children(self.services[number].pid(LISTENER_ROLE), pids) if p not in pids]
        return Victim(target, number, pids)

    def _worker(self) -> int:
        """A worker's slot: most often one inside its critical section, when there is one."""
        holding = self.workers.holding()
        if holding and self.random.random() < HIT_HOLDERS:
            return self.random.choice(holding)
        return self.random.choice(sorted(self.workers.slots))

    # -- faults ----------------------------------------------------------------------------

    def _kill(self, victim: Victim) -> None:
        if victim.target == WORKER:
            slot = next(s for s, r in self.workers.slots.items() if r.id == victim.fields["worker"])
            self.workers.kill(slot)
            self.workers.spawn(slot)
            return
        for pid in victim.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log.write(KILL, target=victim.target, service=victim.service, pids=victim.pids, **victim.fields)
        wait_for(lambda: not any(alive(p) for p in victim.pids), 10, f"the killed {victim.target} to end")
        if victim.target != LOCK_SERVER and victim.service is not None:
            self._restart(self.services[victim.service], victim.target, victim.service)

    def _restart(self, service: Service, target: str, number: int) -> None:
        """``jdls -ib`` again for what was killed: the listener alone (-D) on its port, the monitor alone
        (-A) with the service's table options, or both."""
        port = ("--port", str(service.port))
        options = {LISTENER: ("-ib", "-D", *port), MONITOR: (*service.start_options, "-A"),
                   SERVICE: (*service.start_options, *port)}[target]
        detail = ""
        for _ in range(RESTART_ATTEMPTS):
            result = service.jdls(*options)
            if result.returncode == 0:
                self.log.write(RESTART, target=target, service=number, ok=True)
                return
            detail = (result.stderr + result.stdout).strip()
            time.sleep(0.5)
        self.log.write(RESTART, target=target, service=number, ok=False, detail=detail)

    def _stop(self, victim: Victim) -> None:
        """SIGSTOP the victim for a while, then SIGCONT it (also when interrupted)."""
        for pid in victim.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        logged = {"target": victim.target, "service": victim.service, "pids": victim.pids, **victim.fields}
        try:
            self.log.write(STOP, **logged)
            time.sleep(self.random.uniform(*self.stop_for))
        finally:
            for pid in victim.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            self.log.write(CONT, **logged)


def live_pids(paths: Sequence[Path]) -> list[int]:
    """The pids of the pid files among ``paths`` whose very process still runs."""
    records = (pidfiles.read_or_none(p) for p in paths)
    return [r.pid for r in records if r is not None and r.alive()]


def server_of(client: int, port: int, servers: list[int]) -> int | None:
    """Which of ``servers`` (listening on ``port``) serves the process ``client``: the other end of its
    connection there."""
    with contextlib.suppress(psutil.Error):
        connections = psutil.net_connections(kind="tcp")
        ends = {_port(c.laddr) for c in connections if c.pid == client and _port(c.raddr) == port}
        for c in connections:
            if c.pid in servers and _port(c.laddr) == port and _port(c.raddr) in ends:
                return c.pid
    return None


def _port(address: object) -> int | None:
    """The port of a connection's address (None for a socket connected nowhere)."""
    port = getattr(address, "port", None)
    return port if isinstance(port, int) else None


def _children(listener: int | None, known: list[int]) -> list[int]:
    """The listener's children (lock servers whose pid file is not written yet), if it is among ``known``."""
    if listener is None or listener not in known:
        return []
    with contextlib.suppress(psutil.Error):
        return [c.pid for c in psutil.Process(listener).children()]
    return []

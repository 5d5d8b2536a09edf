"""A whole chaos run: real services, worker processes, the chaos loop, then the checker's verdict.

``chaos_run(base, settings)`` starts one service (or two, with the workers' JDLS naming them SERVER and
SERVER2) of its own under ``base``, the records and the workers, injects faults for
``settings.seconds``, tells the workers to stop (killing, logged, those that do not within the grace),
stops the services and checks that nothing of them is left (``Service.stop_and_check``), and gives the
checker's ``Verdict`` of the logs it leaves in base/logs. Whatever happens, nothing it started outlives
it.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path

from ..service import SMALL, Service, make_service
from . import records
from .checker import Verdict, check
from .history import FAULTS_LOG, Log, read_history
from .injector import Injector
from .workers import Workers


@dataclass(frozen=True)
class Settings:
    """How a chaos run goes: how long faults are injected; how many workers on how many records, holding
    each lock up to ``max_hold`` seconds; one service or two (``pair``: SERVER and SERVER2); the seed of
    every random choice; the pause between faults and how long a SIGSTOP lasts (ranges in seconds); the
    clients' JDLS TIMEOUT; more ``jdls -i`` options for the services; how long workers have to stop at
    the end before they are killed."""

    seconds: float = 60.0
    workers: int = 8
    records: int = 3
    max_hold: float = 0.3
    pair: bool = False
    seed: int = 1
    pause: tuple[float, float] = (0.2, 1.0)
    stop_for: tuple[float, float] = (0.2, 1.5)
    timeout: float = 5.0
    jdls_options: tuple[str, ...] = ()
    grace: float = 5.0


def chaos_run(base: Path, settings: Settings) -> Verdict:
    """Run (see the module docstring); the verdict on the history in base/logs."""
    logs = base / "logs"
    logs.mkdir(parents=True)
    paths = records.create(base / "records", settings.records)
    initial = {i: records.value_of(p) for i, p in enumerate(paths)}
    names = ("primary", "secondary") if settings.pair else ("service",)
    services = [make_service(base / name, start_options=(*SMALL, *settings.jdls_options)) for name in names]
    faults = Log(logs / FAULTS_LOG)
    try:
        with contextlib.ExitStack() as stack:
            for service in services:
                stack.enter_context(service.checked())
                service.start()
            env = dict(services[0].env, JDLS=_jdls(services, settings.timeout))
            workers = stack.enter_context(Workers(logs, env, paths, max_hold=settings.max_hold, seed=settings.seed,
                                                  faults=faults))
            workers.start(settings.workers)
            injector = Injector(services, workers, faults, random.Random(settings.seed), pause=settings.pause,
                                stop_for=settings.stop_for)
            injector.run(settings.seconds)
            workers.finish(settings.grace)
    finally:
        faults.close()
    final = {i: records.value_of(p) for i, p in enumerate(paths)}
    return check(read_history(logs, initial, final))


def _jdls(services: list[Service], timeout: float) -> str:
    """The workers' JDLS: the first service as SERVER, the second (if any) as SERVER2."""
    second = [f"SERVER2=127.0.0.1,{s.port}" for s in services[1:]]
    return services[0].jdls_value(*second, f"TIMEOUT={timeout:g}")

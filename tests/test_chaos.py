"""A bounded fault-injection run, for one service and for SERVER and SERVER2: under SIGKILL and SIGSTOP of
workers, lock servers, listeners, monitors and whole services, no two critical sections of a record
overlap and every counter is exact (tests/dls_testkit/chaos; ``./dev chaos`` is the long run).

Each run injects faults for RUN_SECONDS; a run that did too little (too few sections or faults, a kind of
kill never dealt) fails, so the test cannot pass by doing nothing. And the injector finds the lock server of
a client, which it hits while the client holds a lock.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from dls_testkit import Service
from dls_testkit.chaos import Settings, chaos_run, history
from dls_testkit.chaos.injector import live_pids, server_of

pytestmark = pytest.mark.slow

#: How long each run injects faults (the whole test takes about 10 s more).
RUN_SECONDS = 20.0
#: The services' lock-delay: shorter than jdls's 15 s, so that a lock kept for a holder that is really gone
#: (killed while its service was away) stalls a short run less; still above the client's 5 s bound for
#: finding a dead server, as the lock-delay must be.
LOCK_DELAY = ("--lock-delay", "8")
#: Sections a run must complete at least: a run that did nothing proves nothing.
PROGRESS = 20


@pytest.mark.parametrize("pair", [False, True], ids=["one-service", "server2"])
def test_no_overlap_and_exact_counters_under_faults(tmp_path: Path, pair: bool) -> None:
    settings = Settings(seconds=RUN_SECONDS, workers=8, records=3, pair=pair, seed=10 + pair, jdls_options=LOCK_DELAY)
    verdict = chaos_run(tmp_path, settings)
    report = verdict.figures() + "\n" + "\n".join(verdict.problems())
    print(report)  # the figures of a run that passed too (pytest -rP)
    assert verdict.ok, report
    assert verdict.completed >= PROGRESS, report
    killed = {kind.removeprefix("kill ") for kind in verdict.faults if kind.startswith("kill ")}
    assert killed == set(history.TARGETS), report
    assert sum(verdict.faults.values()) >= 10, report


def test_the_lock_server_of_a_client_is_found_by_its_connection(service: Service) -> None:
    """The injector hits a worker's own lock server: the other end of the worker's connection."""
    with service.client() as client:
        server = client.connect().welcome.server_pid
        servers = live_pids(sorted(service.instance.servers_dir.glob("*.pid")))
        assert server in servers
        assert server_of(os.getpid(), service.port, servers) == server
        assert server_of(os.getpid(), service.port, [p for p in servers if p != server]) is None

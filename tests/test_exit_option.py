"""JDLS EXIT: a process that can reach no lock service any more wraps up and exits, as the guide's client does
(issue 12, item 7).

Real processes: a real service, a client process holding a lock (the library, in a Python child), and the
service stopped under it (``jdls -k``). With EXIT the client writes why to the error trace and ends itself
with SIGTERM once its locks could no longer be reclaimed (the lock-delay less the dead-server bound); without
it, it lives on (its requests raise, its lock is told lost). A restart within that time is survived (audit
i12b F15: EXIT fired at the first failed reconnect, so every restart killed every EXIT client).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dls_testkit import Service, data_file, make_service, wait_for

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent("""
    import sys, time
    from dls_client import Client
    client = Client()
    client.lock(sys.argv[1], "K")
    print("held", flush=True)
    time.sleep(30)
    sys.exit(3)
""")


def _holder(service: Service, data: Path, *options: str) -> subprocess.Popen[str]:
    env = dict(service.env, JDLS=service.jdls_value(*options))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n", proc.stderr.read() if proc.stderr else ""
    return proc


@pytest.mark.parametrize("exit_option", [True, False], ids=["EXIT", "without"])
def test_a_process_that_lost_every_service_exits_with_exit(service: Service, tmp_path: Path,
                                                           exit_option: bool) -> None:
    data = data_file(tmp_path)
    proc = _holder(service, data, *(["EXIT"] if exit_option else []))
    try:
        stopped = service.jdls("-k")
        assert stopped.returncode == 0, stopped.stderr
        if exit_option:
            assert proc.wait(timeout=25) == -signal.SIGTERM
            trace = (service.root / "tmp" / "jbase_error_trace").read_text()
            assert "no lock service can be reached" in trace and "wrapping up and exiting (JDLS EXIT)" in trace, trace
        else:
            time.sleep(3)
            assert proc.poll() is None, "the process ended without EXIT"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        service.start()  # for the fixture's stop and check
        wait_for(lambda: service.pid("listener") is not None, 10, "the service to be back")


#: The lock-delay of the restart tests, and the reclaim window it leaves (less the dead-server bound, 5 s).
LOCK_DELAY = 12.0
WINDOW = LOCK_DELAY - 5.0


@pytest.fixture
def delayed(tmp_path: Path) -> Iterator[Service]:
    """A service keeping a lost client's locks LOCK_DELAY seconds."""
    with make_service(tmp_path, start_options=("-ibs1000,10", "--lock-delay", f"{LOCK_DELAY:g}")).checked() as svc:
        svc.start()
        yield svc


def test_an_exit_process_survives_a_restart_of_the_service_within_the_lock_delay(delayed: Service,
                                                                                 tmp_path: Path) -> None:
    """jdls -k, then jdls -ib: the EXIT process reconnects and reclaims its lock; it lives on past the
    window, and the lock is still its own (another process is refused it)."""
    data = data_file(tmp_path)
    proc = _holder(delayed, data, "EXIT")
    try:
        stopped = delayed.jdls("-k")
        assert stopped.returncode == 0, stopped.stderr
        time.sleep(1.5)  # the client has found its lock server gone and failed to reach the service again
        delayed.start()
        time.sleep(WINDOW + 2)
        assert proc.poll() is None, f"the EXIT process ended at a restart: {proc.communicate(timeout=10)}"
        witness = delayed.dls_lock("-n", str(data), "K", "true")
        assert witness.returncode == 1, witness.stderr  # busy: the lock was taken back
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_an_exit_process_ends_once_its_locks_could_no_longer_be_reclaimed(delayed: Service, tmp_path: Path) -> None:
    """jdls -k and the service stays away: SIGTERM once the window is over, not at the first failed attempt."""
    data = data_file(tmp_path)
    proc = _holder(delayed, data, "EXIT")
    try:
        stopped = delayed.jdls("-k")
        assert stopped.returncode == 0, stopped.stderr
        began = time.monotonic()
        assert proc.wait(timeout=WINDOW + 10) == -signal.SIGTERM
        assert time.monotonic() - began >= WINDOW - 2, "EXIT fired before the locks' reclaim window was over"
        trace = (delayed.root / "tmp" / "jbase_error_trace").read_text()
        assert "wrapping up and exiting (JDLS EXIT)" in trace, trace
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        delayed.start()  # for the fixture's stop and check

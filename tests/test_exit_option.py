"""JDLS EXIT: a process that can reach no lock service any more wraps up and exits, as the guide's client does
(issue 12, item 7).

Real processes: a real service, a client process holding a lock (the library, in a Python child), and the
service stopped under it (``jdls -k``). With EXIT the client writes why to the error trace and ends itself
with SIGTERM within a few seconds; without it, it lives on (its requests raise, its lock is told lost).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from dls_testkit import Service, data_file, wait_for

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
            assert proc.wait(timeout=15) == -signal.SIGTERM
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

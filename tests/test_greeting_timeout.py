"""JDLS WAIT lets a lock request wait, not the greeting (audit i12b F16): against a listener that accepts and
never answers (stopped by SIGSTOP), dls-lock and the library give up after TIMEOUT, WAIT or not, as
dls-jdls(7) says ("the greeting included").

Real processes: a real service whose listener is stopped (the kernel still accepts the connection into its
backlog), dls-lock as a program, and the library's Client in this process; the listener is continued and the
service stopped at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dls_client import Client, ServiceUnavailable
from dls_client.config import parse
from dls_proto import Mode
from dls_testkit import DLS_LOCK, KEY, Service, data_file

pytestmark = pytest.mark.slow


@pytest.fixture
def stopped(service: Service) -> Iterator[Service]:
    """The service with its listener stopped (SIGSTOP) for the test, continued after it."""
    listener = service.pid("listener")
    assert listener is not None
    os.kill(listener, signal.SIGSTOP)
    try:
        yield service
    finally:
        os.kill(listener, signal.SIGCONT)


@pytest.mark.parametrize("options", [("WAIT", "TIMEOUT=2"), ("TIMEOUT=2",)])
def test_dls_lock_gives_up_a_silent_greeting_after_timeout_with_wait_too(stopped: Service, tmp_path: Path,
                                                                         options: tuple[str, ...]) -> None:
    data = data_file(tmp_path)
    env = dict(stopped.env, JDLS=stopped.jdls_value(*options))
    began = time.monotonic()
    done = subprocess.run([DLS_LOCK, str(data), KEY, "true"], env=env, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    took = time.monotonic() - began
    assert done.returncode == 69, done.stderr
    assert "did not answer within 2 seconds" in done.stderr, done.stderr
    assert 1.9 <= took < 10, took


def test_the_library_gives_up_a_silent_greeting_after_timeout_with_wait(stopped: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    client = Client(parse(stopped.jdls_value("WAIT", "TIMEOUT=2")))
    try:
        began = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="did not answer within 2 seconds"):
            client.lock(data, "s2", Mode.EX)
        assert time.monotonic() - began < 10
    finally:
        client.close()

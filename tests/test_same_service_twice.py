"""SERVER2 naming the same lock service as SERVER under another name (localhost and 127.0.0.1), which the
parser cannot tell apart without a look-up (audit i12b F6): every lock waited behind its own grant for ever
(or was refused as "held by another"). The resilient route now knows the holder the secondary names as this
very client's grant on the primary and says so: ConfigurationError, in the error trace too, and the lock is
left free.

Real processes: one real service, reached under both names by dls-lock and by the library in this process.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from dls_client import Client, ConfigurationError
from dls_client.config import parse
from dls_proto import Mode, environment
from dls_testkit import DLS_LOCK, KEY, Service, data_file

pytestmark = pytest.mark.slow

SAID = "SERVER and SERVER2 name the same lock service"


def _twice(service: Service, *options: str) -> str:
    return ",".join((f"SERVER=localhost,{service.port}", f"SERVER2=127.0.0.1,{service.port}", *options))


@pytest.mark.parametrize("nonblock", [False, True], ids=["waiting", "nonblocking"])
def test_dls_lock_says_the_two_servers_are_one(service: Service, tmp_path: Path, nonblock: bool) -> None:
    data = data_file(tmp_path)
    env = dict(service.env, JDLS=_twice(service))
    began = time.monotonic()
    done = subprocess.run([DLS_LOCK, *(["-n"] if nonblock else []), str(data), KEY, "echo", "RAN"], env=env,
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert time.monotonic() - began < 15
    assert done.returncode == 78, (done.returncode, done.stdout, done.stderr)  # EX_CONFIG, as for a refused JDLS
    assert "RAN" not in done.stdout
    assert SAID in done.stderr, done.stderr
    trace = environment.error_trace(service.env).read_text()
    assert SAID in trace, trace
    with service.client() as other:  # nothing is left held, on either connection
        other.lock(data, KEY, Mode.EX, timeout=5).release()  # not held: its release may lag a moment


def test_the_library_with_wait_raises_configuration_error(service: Service, tmp_path: Path) -> None:
    """JDLS WAIT asks for no interim messages; the secondary's request asks for them all the same, so that the
    first, at once, names the holder."""
    data = data_file(tmp_path)
    client = Client(parse(_twice(service, "WAIT")))
    try:
        with pytest.raises(ConfigurationError, match=SAID):
            client.lock(data, KEY, Mode.EX)
    finally:
        client.close()
    with service.client() as other:
        other.lock(data, KEY, Mode.EX, timeout=5).release()  # not held: its release may lag a moment

"""A JDLS TIMEOUT shorter than the lock server's interim period: a contended wait ends in a grant, not in a lost
connection (issue 12, item 6).

The client tells its lock server its acknowledgement timeout (protocol version 3, Settings) and the lock
server sends its interim Waiting messages a third of it apart; before, they came every 5 s whatever TIMEOUT
said, so a client of TIMEOUT=2 gave its connection up two seconds into every contended wait, and with it
every lock it held. Real processes: a real service, a real ``dls-lock`` holding the lock ``HOLD`` seconds,
waiters of TIMEOUT=2 and TIMEOUT=1 (a dls-lock process, and a Client holding another lock meanwhile); and a
client of version 2, spoken by hand, which still gets its interim messages 5 s apart, as before.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import time
from pathlib import Path

import pytest
from dls_client.locks import REMOTE_DEVICE
from dls_proto import (
    PROTOCOL_VERSIONS,
    WAIT_FOREVER,
    Connection,
    Error,
    ErrorCode,
    Granted,
    Hello,
    Lock,
    Mode,
    Role,
    Settings,
    Waiting,
    Welcome,
    encode,
)
from dls_testkit import DLS_LOCK, KEY, Service, data_file, lock_holder, running
from dls_testkit.wire import greet, receive

pytestmark = pytest.mark.slow

#: How long the holder keeps the lock (seconds): longer than the old interim period (5 s), so that a waiter
#: of a short TIMEOUT that heard nothing in between would give up.
HOLD = 6
#: The lock server's interim period for a client that does not tell its timeout (dls_daemon.context).
OLD_INTERIM_PERIOD = 5.0


@pytest.mark.parametrize("timeout", [2, 1])
def test_a_short_timeout_waits_for_the_grant_and_keeps_its_other_locks(service: Service, tmp_path: Path,
                                                                        timeout: int) -> None:
    data = data_file(tmp_path)
    client = service.client(timeout=float(timeout))
    try:
        other = client.lock(data, "OTHER")
        with running(lock_holder(service, data, tmp_path / "held", seconds=HOLD)):
            started = time.monotonic()
            waited = client.lock(data, KEY)  # waits until the holder's sleep ends
            took = time.monotonic() - started
        assert took > timeout + 1, f"granted after {took:.1f} s: the wait was not contended"
        other.ensure_held()  # no LockLost: the connection was never given up
        waited.release()
        other.release()
    finally:
        client.close()
    trace = service.root / "tmp" / "jbase_error_trace"
    assert "did not answer" not in (trace.read_text() if trace.exists() else "")


def test_dls_lock_with_timeout_1_waits_for_the_grant(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    env = dict(service.env, JDLS=service.jdls_value("TIMEOUT=1"))
    with running(lock_holder(service, data, tmp_path / "held", seconds=HOLD)):
        done = subprocess.run([DLS_LOCK, str(data), KEY, "true"], env=env, capture_output=True, text=True,
                              timeout=HOLD + 20, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr


def _waiting_gaps(sock: socket.socket, conn: Connection, rid: int, count: int) -> list[float]:
    """The seconds between the first ``count`` Waiting messages for request ``rid``."""
    times = []
    for _ in range(count):
        event = receive(sock, conn, Waiting)
        assert event.request_id == rid
        times.append(time.monotonic())
    return [b - a for a, b in itertools.pairwise(times)]


def test_a_version_2_client_still_gets_its_interim_messages_5_s_apart(service: Service, tmp_path: Path) -> None:
    """Spoken by hand: a Hello offering version 2 alone; the service answers in version 2, takes Settings as a
    kind it does not know (as a version-2 service did), and sends its interim messages every 5 s."""
    data = data_file(tmp_path)
    with running(lock_holder(service, data, tmp_path / "held", seconds=HOLD + 2)), \
            socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        conn = Connection(Role.CLIENT)
        sock.sendall(conn.send(Hello(1, 2, 2, 0, 4712, 4712, 1, "old-host", "old-client")))
        assert receive(sock, conn, Welcome).version == 2
        sock.sendall(encode(Settings(2, 0, 1000)))  # not a version-2 message: unknown to the conversation
        refused = receive(sock, conn, Error)
        assert (refused.request_id, refused.code) == (2, ErrorCode.UNKNOWN_MESSAGE)
        sock.sendall(conn.send(Lock(3, Mode.EX, 0, WAIT_FOREVER, 1, data.stat().st_ino, REMOTE_DEVICE, KEY.encode(),
                                    str(data))))
        gaps = _waiting_gaps(sock, conn, 3, 2)
        assert gaps[0] >= OLD_INTERIM_PERIOD - 0.5, gaps


def test_a_version_3_client_that_tells_its_timeout_gets_interims_within_it(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    with running(lock_holder(service, data, tmp_path / "held", seconds=HOLD)), \
            socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        assert PROTOCOL_VERSIONS[1] >= 3
        conn, welcome = greet(sock, 4713, max_version=3)
        assert welcome.version == 3
        sock.sendall(conn.send(Settings(1, 0x8000, 1500)))  # a flag this service does not know: refused
        refused = receive(sock, conn, Error)
        assert (refused.request_id, refused.code) == (1, ErrorCode.BAD_REQUEST)
        sock.sendall(conn.send(Settings(2, 0, 1500)))  # a third of it: 0.5 s
        sock.sendall(conn.send(Lock(3, Mode.EX, 0, WAIT_FOREVER, 1, data.stat().st_ino, REMOTE_DEVICE, KEY.encode(),
                                    str(data))))
        gaps = _waiting_gaps(sock, conn, 3, 4)
        assert all(0.3 <= gap <= 0.9 for gap in gaps), gaps
        while isinstance(event := receive(sock, conn, Granted | Waiting, timeout=HOLD + 5), Waiting):
            pass
        assert event.request_id == 3

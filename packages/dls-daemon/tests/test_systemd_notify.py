"""systemd readiness with real processes: ``jdls -i --foreground`` under a notify socket the test listens on.

The test plays systemd's part: it binds an AF_UNIX datagram socket (a path, or an abstract name), passes it
as $NOTIFY_SOCKET with $WATCHDOG_USEC, and reads what the service sends, with the sender's pid from the
kernel (SO_PASSCRED), as systemd does for NotifyAccess=main.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dls_testkit import wait_for

#: WATCHDOG_USEC the tests give: WATCHDOG=1 every 0.2 s.
WATCHDOG_USEC = 400_000
PERIOD = WATCHDOG_USEC / 2e6
#: This work's ports (see the brief): each test takes a free one of them.
PORTS = range(47400, 47500)


def own_port() -> int:
    """A free port of PORTS, tried in a random order (tests run side by side)."""
    for port in random.sample(PORTS, len(PORTS)):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port in 47400-47499")


class Systemd:
    """The receiving end of $NOTIFY_SOCKET: each datagram with its sender's pid and when it came."""

    def __init__(self, address: str) -> None:
        self.variable = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + os.fsencode(address[1:]) if address.startswith("@") else address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def next(self, timeout: float) -> tuple[float, int, list[str]] | None:
        """The next notification (when, the sender's pid, its assignments), None if none came in time."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
        return time.monotonic(), pid, data.decode().splitlines()

    def until(self, assignment: str, timeout: float) -> list[tuple[float, int, list[str]]]:
        """Every notification up to and with the first that carries ``assignment``."""
        seen = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.next(left)
            if got is None:
                break
            seen.append(got)
            if assignment in got[2]:
                return seen
        pytest.fail(f"no {assignment} within {timeout} s; got {seen}")

    def drain(self) -> list[tuple[float, int, list[str]]]:
        seen = []
        while (got := self.next(0.0001)) is not None:
            seen.append(got)
        return seen

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def foreground(service, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``jdls -is1000,10 --foreground`` on the test's instance with extra environment; stopped (jdls -k)
    and waited for at the end, whatever happened."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> subprocess.Popen[bytes]:
        service._use_port(own_port())
        out = open(tmp_path / f"stdout{len(procs)}", "wb")
        err = open(tmp_path / f"stderr{len(procs)}", "wb")
        with out, err:
            proc = subprocess.Popen([sys.executable, "-m", "dls_daemon", "-is1000,10", "--foreground"],
                                    env={**service.env, **env}, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                with_stop = service.jdls("-k")
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    pytest.fail(f"the foreground service did not stop: {with_stop.stdout}{with_stop.stderr}")


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("name", ["path", "abstract"])
def test_the_monitor_tells_systemd_ready_status_watchdog_and_stopping(service, foreground, tmp_path, name):
    address = str(tmp_path / "notify") if name == "path" else f"@dls-test-notify-{os.getpid()}-{time.time_ns()}"
    systemd = Systemd(address)
    try:
        proc = foreground(NOTIFY_SOCKET=address, WATCHDOG_USEC=str(WATCHDOG_USEC))
        # Up to READY=1: a status first, and when READY=1 comes the lock port already accepts.
        before = systemd.until("READY=1", timeout=30)
        ready_at = before[-1]
        assert accepts(service.port), "READY=1 came before the listener accepts"
        assert any(a.startswith("STATUS=") for _, _, lines in before[:-1] for a in lines), before
        assert any(a.startswith("STATUS=ready") and f"port {service.port}" in a for a in ready_at[2]), ready_at
        # Only the main process (the monitor, the one systemd started) speaks.
        assert service.pid("monitor") == proc.pid
        assert {pid for _, pid, _ in before} == {proc.pid}

        # The watchdog, every WATCHDOG_USEC/2, from the monitor.
        time.sleep(1.5)
        beats = [(at, pid) for at, pid, lines in systemd.drain() if "WATCHDOG=1" in lines]
        assert len(beats) >= 1.5 / PERIOD - 2, beats
        assert {pid for _, pid in beats} == {proc.pid}
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(beats)]
        assert max(gaps) < 2 * PERIOD, gaps

        # A stopped monitor sends nothing (systemd would kill it); it goes on when continued.
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.1)
            systemd.drain()
            assert systemd.next(5 * PERIOD) is None, "a WATCHDOG=1 while the monitor was stopped"
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        again = systemd.until("WATCHDOG=1", timeout=2 * PERIOD + 1)
        assert again[-1][1] == proc.pid

        # jdls -k: STOPPING=1, and the service ends well. Read meanwhile, as systemd does: the socket's queue
        # is short (net.unix.max_dgram_qlen), and the service drops what does not fit rather than wait.
        stop = subprocess.Popen([sys.executable, "-m", "dls_daemon", "-k"], env=service.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        stopping = systemd.until("STOPPING=1", timeout=10)
        assert stop.wait(timeout=30) == 0
        assert stopping[-1][1] == proc.pid
        assert proc.wait(timeout=10) == 0
        assert "cannot notify" not in service.log()
    finally:
        systemd.close()


def test_a_notify_socket_that_is_not_there_is_logged_once_and_the_service_runs(service, foreground, tmp_path):
    proc = foreground(NOTIFY_SOCKET=str(tmp_path / "nobody-listens"), WATCHDOG_USEC=str(WATCHDOG_USEC))
    wait_for(lambda: accepts(service.port), 30, "the listener to accept")
    time.sleep(5 * PERIOD)  # several watchdog notifications fail meanwhile
    assert proc.poll() is None
    data = tmp_path / "data"
    data.write_bytes(b"")
    with service.client() as client, client.lock(data, "record"):
        pass
    stop = service.jdls("-k")
    assert stop.returncode == 0, stop.stderr
    assert proc.wait(timeout=10) == 0
    said = [line for line in service.log().splitlines() if "cannot notify systemd" in line]
    assert len(said) == 1, said
    assert "nobody-listens" in said[0]


def test_in_the_background_nothing_is_sent(service, tmp_path):
    """-ib is not the process systemd watches: it says nothing, even with NOTIFY_SOCKET in its environment."""
    address = str(tmp_path / "notify")
    systemd = Systemd(address)
    try:
        service._use_port(own_port())
        service.env.update(NOTIFY_SOCKET=address, WATCHDOG_USEC=str(WATCHDOG_USEC))
        result = service.jdls("-ibs1000,10")
        assert result.returncode == 0, result.stderr
        assert systemd.next(5 * PERIOD) is None
    finally:
        systemd.close()


def test_a_receiver_that_does_not_read_never_holds_up_the_monitor(service, foreground, tmp_path):
    """A full notify socket (systemd busy: the queue holds net.unix.max_dgram_qlen datagrams) drops a notification
    rather than stop the monitor's loop in a send: the service still stops at once when told."""
    address = str(tmp_path / "notify")
    systemd = Systemd(address)  # never read until the end
    try:
        proc = foreground(NOTIFY_SOCKET=address, WATCHDOG_USEC=str(WATCHDOG_USEC))
        wait_for(lambda: accepts(service.port), 30, "the listener to accept")
        queue = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
        time.sleep((queue + 5) * PERIOD)  # more watchdog notifications than the queue holds
        stop = service.jdls("-k")
        assert stop.returncode == 0, stop.stderr
        assert "killing" not in stop.stderr + stop.stdout
        assert proc.wait(timeout=10) == 0
        said = [line for line in service.log().splitlines() if "cannot notify systemd" in line]
        assert len(said) == 1, said
    finally:
        systemd.close()


def test_an_abstract_name_that_is_not_utf8_is_used_as_the_bytes_it_is(service, foreground):
    """Issue 15 (L1): ``NOTIFY_SOCKET=@<bytes that are not UTF-8>`` used to crash the monitor at start (exit 70,
    a traceback): the name is the environment's bytes (os.fsencode), and READY=1 comes there."""
    address = os.fsdecode(b"@dls-test-\xff\xfe-" + str(time.time_ns()).encode())
    systemd = Systemd(address)
    try:
        proc = foreground(NOTIFY_SOCKET=address)
        ready = systemd.until("READY=1", timeout=30)
        assert ready[-1][1] == proc.pid
        assert "Traceback" not in service.log()
    finally:
        systemd.close()


def test_a_tiny_watchdog_usec_is_held_to_the_floor(service, foreground, tmp_path):
    """Issue 15 (L2): ``WATCHDOG_USEC=1`` used to make the monitor's loop send WATCHDOG=1 without pause (tens of
    thousands a second, a core burnt): no more often than every 50 ms (WATCHDOG_FLOOR)."""
    address = str(tmp_path / "notify")
    systemd = Systemd(address)
    try:
        foreground(NOTIFY_SOCKET=address, WATCHDOG_USEC="1")
        systemd.until("READY=1", timeout=30)
        systemd.drain()
        time.sleep(1)
        beats = [at for at, _, lines in systemd.drain() if "WATCHDOG=1" in lines]
        assert 5 <= len(beats) <= 1 / 0.05 + 3, len(beats)
    finally:
        systemd.close()


@pytest.mark.parametrize(("variable", "value"), [("WATCHDOG_USEC", "abc"), ("WATCHDOG_USEC", "-5"),
                                                 ("WATCHDOG_PID", "x1")])
def test_a_watchdog_variable_not_understood_is_logged_once(service, foreground, tmp_path, variable, value):
    """Issue 15 (L2): a WATCHDOG_USEC or WATCHDOG_PID that is not a number used to turn the watchdog off without
    a word: one line says so (a mistake in the unit's WatchdogSec= is seen in the journal)."""
    address = str(tmp_path / "notify")
    systemd = Systemd(address)
    try:
        environment = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(WATCHDOG_USEC), variable: value}
        foreground(**environment)
        systemd.until("READY=1", timeout=30)
        time.sleep(3 * PERIOD)
        assert not [lines for _, _, lines in systemd.drain() if "WATCHDOG=1" in lines]
        said = [line for line in service.log().splitlines() if "not understood" in line]
        assert len(said) == 1 and f"{variable}={value!r}" in said[0] and "no watchdog" in said[0], said
    finally:
        systemd.close()


def test_jdls_k_of_a_foreground_service_logs_no_warning(service, foreground):
    """Issue 15 (L7): ``jdls -k`` stops the listener first, a moment before the monitor that forked it: the
    monitor used to log "lock listener ... ended on its own" as a WARNING at every normal stop."""
    proc = foreground()
    wait_for(lambda: accepts(service.port), 30, "the listener to accept")
    stop = service.jdls("-k")
    assert stop.returncode == 0, stop.stderr
    assert proc.wait(timeout=10) == 0
    log = service.log()
    assert "stopping" in log, log
    assert "stopped when told to" in log, log
    warnings = [line for line in log.splitlines() if ("WARNING" in line or "ERROR" in line)
                and "no --allow" not in line]  # the listener's word on its open port, at start
    assert warnings == [], log

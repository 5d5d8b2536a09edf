"""End to end: the lock service and its clients as real processes, over real TCP, on a real SysV table.

Every test has its own instance and port (the ``service`` fixture in conftest.py),
whose teardown fails the test if a process or IPC resource of the instance is left.
Subprocesses a test starts are ended in ``finally`` blocks, so a failing test
leaves nothing running either.
"""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from dls_client import LockRefused, RequestFailed, ServiceUnavailable
from dls_proto import PROTOCOL_VERSIONS, Connection, ErrorCode, Hello, Role
from dls_shm import SlotState, resource_value
from dls_testkit import (
    DLS_LOCK,
    KEY,
    Service,
    alive,
    data_file,
    free_port,
    lock_holder,
    running,
    running_service,
    wait_for,
)


@pytest.fixture
def in_instance(service: Service, monkeypatch: pytest.MonkeyPatch) -> Service:
    """The service, with this process's own clients writing their error trace into its instance."""
    monkeypatch.setenv("JBCRELEASEDIR", str(service.root))
    monkeypatch.delenv("JBCPORTNO", raising=False)
    return service


# -- dls-lock --------------------------------------------------------------------------


def test_dls_lock_processes_exclude_each_other(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    log = tmp_path / "order.log"
    q = shlex.quote(str(log))
    script = f"echo start >> {q}; sleep 0.3; echo end >> {q}"
    procs = [service.dls_lock_popen(str(data), KEY, "sh", "-c", script) for _ in range(4)]
    with running(*procs):
        statuses = [p.wait(timeout=30) for p in procs]
    assert statuses == [0, 0, 0, 0]
    assert log.read_text().split() == ["start", "end"] * 4


@pytest.mark.parametrize("jbcportno", ["abc", "-1", "4294967296"])
def test_dls_lock_refuses_a_malformed_jbcportno_by_name(tmp_path: Path, jbcportno: str) -> None:
    """Exit 78 and the client's message, as for a malformed JDLS (the man page's promise); the command never
    runs and nothing is asked of the service."""
    data = data_file(tmp_path)
    ran = tmp_path / "ran"
    env = {**os.environ, "JBCRELEASEDIR": str(tmp_path / "release"), "JDLS": f"SERVER=127.0.0.1,{free_port()}",
           "JBCPORTNO": jbcportno}
    done = subprocess.run([DLS_LOCK, str(data), KEY, "touch", str(ran)], env=env, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stderr) == (
        78, f"dls-lock: JBCPORTNO={jbcportno!r} is not a port number (0 to 4294967295)\n")
    assert not ran.exists()


def test_dls_lock_nonblocking_conflict_codes_and_status_passthrough(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    held = lock_holder(service, data, tmp_path / "held")
    with running(held):
        t0 = time.monotonic()
        refused = service.dls_lock("-n", str(data), KEY, "true")
        quick = time.monotonic() - t0
        assert refused.returncode == 1, refused.stderr
        assert "waiting for" not in refused.stderr

        custom = service.dls_lock("-n", "-E", "7", str(data), KEY, "true")
        assert custom.returncode == 7, custom.stderr

        t0 = time.monotonic()
        waited = service.dls_lock("-w", "0.5", str(data), KEY, "true")
        elapsed = time.monotonic() - t0
        assert waited.returncode == 1, waited.stderr
        assert 0.5 <= elapsed < quick + 1.0, f"-w 0.5 gave up after {elapsed:.2f} s (a refusal takes {quick:.2f} s)"

        held.send_signal(signal.SIGTERM)  # passed on to the sleep; dls-lock then releases
        assert held.wait(timeout=10) == 128 + signal.SIGTERM

    free = service.dls_lock("-n", str(data), KEY, "true")
    assert free.returncode == 0, free.stderr
    passed = service.dls_lock("-n", str(data), KEY, "sh", "-c", "exit 3")
    assert passed.returncode == 3, passed.stderr


def test_killed_holder_frees_its_lock_and_its_command(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    proc = service.dls_lock_popen(str(data), KEY, "sleep", "60")
    with running(proc):
        sleeps: list[psutil.Process] = []

        def command_started() -> bool:
            sleeps[:] = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "sleep"]
            return bool(sleeps) or proc.poll() is not None

        wait_for(command_started, 10, "dls-lock to start its command")
        assert proc.poll() is None and sleeps, f"dls-lock ended with status {proc.returncode}"
        command = sleeps[0].pid
        assert service.dls_lock("-n", str(data), KEY, "true").returncode == 1

        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=10)
        while True:
            attempt = service.dls_lock("-n", str(data), KEY, "true")
            elapsed = time.monotonic() - killed
            if attempt.returncode == 0 or elapsed > 5:
                break
            assert attempt.returncode == 1, attempt.stderr
        assert attempt.returncode == 0, f"lock still held {elapsed:.2f} s after its holder was killed"
        assert elapsed < 1.0, f"the lock of a killed holder was freed only after {elapsed:.2f} s"
        wait_for(lambda: not alive(command), 1.0, "the holder's command (sleep) to die with it")
    service.wait_for_log(r"server INFO released 1 lock\(s\) of 127\.0\.0\.1:\d+ \(port \d+, pid " + f"{proc.pid}\\)")


def test_waiter_is_told_and_served_promptly(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    got = tmp_path / "got"
    waiter_err = tmp_path / "waiter.err"
    held = lock_holder(service, data, tmp_path / "held")
    with running(held):
        with waiter_err.open("wb") as err:
            waiter = service.dls_lock_popen(str(data), KEY, "sh", "-c", f"date +%s.%N > {shlex.quote(str(got))}",
                                            stderr=err)
        with running(waiter):
            wait_for(lambda: "waiting for" in waiter_err.read_text() or waiter.poll() is not None, 10,
                     "the waiter to say it waits")
            assert waiter.poll() is None, f"the waiter ended ({waiter.returncode}): {waiter_err.read_text()}"
            assert not got.exists()
            released = time.time()
            held.send_signal(signal.SIGTERM)
            assert waiter.wait(timeout=10) == 0, waiter_err.read_text()
    text = waiter_err.read_text()
    assert f"dls-lock: waiting for {data} {KEY}, held by port {held.pid}, pid {held.pid} on 127.0.0.1" in text
    served = float(got.read_text())
    assert served - released < 0.5, f"the waiter got the lock {served - released:.3f} s after the release"


# -- bad input on the port ---------------------------------------------------------------------


def _hello_bytes() -> bytes:
    return Connection(Role.CLIENT).send(Hello(1, *PROTOCOL_VERSIONS, 0, 4242, os.getpid(), 1, "test-host", "pytest"))


def _random_bytes() -> bytes:
    data = bytearray(random.Random(20240611).randbytes(4096))  # a fixed seed: the same bytes every run
    assert data[4] != 1, "the seed must give a frame version other than 1"
    return bytes(data)


def _closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Read until the server closes (EOF or reset); False if it is still open after ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


GARBAGE = b"garbage!" * 64  # a header of frame version 0x61 ('a')

#: What each bad client sends: its writes in order (after each but the last, it reads the server's
#: answer), whether it then half-closes, and the reason the server must log for closing it.
BAD_INPUT: dict[str, tuple[Callable[[], list[bytes]], bool, str]] = {
    "random-bytes": (lambda: [_random_bytes()], False, r": frame version \d+, this side speaks 1"),
    "huge-length": (lambda: [struct.pack(">IBBHI", 2**31, 1, 1, 0, 0)], False,
                    r": frame of 2147483648 bytes exceeds the limit of \d+"),
    "half-hello": (lambda: [_hello_bytes()[: len(_hello_bytes()) // 2]], True,
                   r": connection closed in the middle of a frame"),
    "hello-then-garbage": (lambda: [_hello_bytes(), GARBAGE], False,
                           r" \(port 4242, pid \d+\): frame version 97, this side speaks 1"),
    # The same bytes in one write, as a client that does not wait for Welcome sends them.
    "hello-and-garbage-in-one-write": (lambda: [_hello_bytes() + GARBAGE], False,
                                       r" \(port 4242, pid \d+\): frame version 97, this side speaks 1"),
}


@pytest.mark.parametrize("case", [*BAD_INPUT, "silent"])
def test_bad_input_closes_that_connection_only(in_instance: Service, tmp_path: Path, case: str) -> None:
    service = in_instance
    data = data_file(tmp_path)
    monitor, listener = service.pid("monitor"), service.pid("listener")
    assert monitor and listener
    owner, rival = service.client(), service.client()
    try:
        held = owner.lock(data, KEY)
        with pytest.raises(LockRefused):
            rival.try_lock(data, KEY)
        wait_for(lambda: len(service.server_pids()) == 2, 5, "two lock servers")
        servers = service.server_pids()

        sock = socket.create_connection(("127.0.0.1", service.port))
        try:
            where = f"127.0.0.1:{sock.getsockname()[1]}"
            if case == "silent":
                # The server waits for Hello (10 s by default, not configurable): it must not have
                # given up on us yet, nor let the silent connection hold anyone else up.
                time.sleep(0.2)
                assert not _closed_by_server(sock, timeout=0.2)
                wait_for(lambda: len(service.server_pids()) == 3, 5, "a lock server for the silent connection")
                with service.client() as third:
                    assert third.echo(b"still serving")[0] == b"still serving"
            else:
                writes, half_close, reason = BAD_INPUT[case]
                *first, last = writes()
                for write in first:
                    sock.sendall(write)
                    sock.settimeout(5)
                    assert sock.recv(65536), "the server closed before answering"
                sock.sendall(last)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                assert _closed_by_server(sock), "the server kept a connection that sent garbage"
                service.wait_for_log(r" server WARNING closing connection from " + where.replace(".", r"\.") + reason)
        finally:
            sock.close()
        if case == "silent":
            service.wait_for_log(r" server INFO client " + where.replace(".", r"\.") + r" closed: closed before Hello")
        # The lock server of the bad connection has gone; the others are the same.
        wait_for(lambda: service.server_pids() == servers, 5, f"lock servers back to {servers}")

        assert alive(monitor) and alive(listener), "the monitor or the listener died"
        assert (service.pid("monitor"), service.pid("listener")) == (monitor, listener)
        assert owner.status(data, KEY)[0] == 1, "the owner lost its lock"
        with pytest.raises(LockRefused):
            rival.try_lock(data, KEY)
        held.release()
        again = owner.lock(data, KEY, timeout=5)
        with pytest.raises(LockRefused):
            rival.try_lock(data, KEY)
        again.release()
        rival.lock(data, KEY, timeout=5).release()
        with service.client() as newcomer:
            assert newcomer.echo(b"x")[0] == b"x"
    finally:
        owner.close()
        rival.close()


# -- jdls -k and -K -------------------------------------------------------------------------------


def test_stop_leaves_no_process_and_remove_leaves_no_ipc(in_instance: Service, tmp_path: Path) -> None:
    service = in_instance
    data = data_file(tmp_path)
    held = lock_holder(service, data, tmp_path / "held")
    client = service.client()
    with running(held):
        try:
            client.lock(data, "another record")
            wait_for(lambda: len(service.server_pids()) == 2, 5, "two lock servers")
            daemons = {service.pid("monitor"), service.pid("listener"), *service.server_pids()}
            assert None not in daemons and len(daemons) == 4

            stop = service.jdls("-k")
            assert stop.returncode == 0, stop.stderr
            left = [pid for pid in daemons if pid is not None and alive(pid)]
            assert not left, f"still running after jdls -k: {left}"
            ours = [p for p in service.processes() if p.pid not in (held.pid, *(c.pid for c in _children(held)))]
            assert not ours, f"processes of the instance after jdls -k: {[p.cmdline() for p in ours]}"
            with pytest.raises(ServiceUnavailable):
                client.status(data, "another record")
        finally:
            client.close()
    key = f"0x{service.key:08x}"
    assert key in service.ipc_listing(), "jdls -k removed the table (that is -K's job)"
    remove = service.jdls("-K")
    assert remove.returncode == 0, remove.stderr
    listing = service.ipc_listing()
    assert key not in listing, listing


def _children(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


# -- mutual exclusion under load -------------------------------------------------------------


COUNTER = textwrap.dedent("""
    import sys
    from dls_client import Client

    path, cycles = sys.argv[1], int(sys.argv[2])
    client = Client()
    for _ in range(cycles):
        with client.lock(path, "counter"):
            with open(path) as f:
                value = int(f.read())
            with open(path, "w") as f:
                f.write(str(value + 1))
    client.close()
""")


def test_counter_is_exact_under_load(service: Service, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", COUNTER, str(counter), "200"], env=service.env,
                              stdin=subprocess.DEVNULL) for _ in range(4)]
    with running(*procs):
        statuses = [p.wait(timeout=60) for p in procs]
    assert statuses == [0, 0, 0, 0]
    assert counter.read_text() == "800"


# -- a client-only install ------------------------------------------------------------------------


REPO = Path(__file__).resolve().parent.parent

CLIENT_ONLY = textwrap.dedent("""
    import os, sys
    import dls_client
    from dls_client import Client

    assert "dls_shm" not in sys.modules and "sysv_ipc" not in sys.modules and "psutil" not in sys.modules
    path = sys.argv[1]
    client = Client()
    held = client.lock(path, "client-only")
    state, holder = client.status(path, "client-only")
    assert state == 1, state
    held.release()
    assert client.status(path, "client-only")[0] == 0
    client.close()
    print("locked and released with dls_client", dls_client.__version__, "from", dls_client.__file__)
""")


@pytest.mark.slow
def test_client_only_install_locks_through_the_service(service: Service, tmp_path: Path) -> None:
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in service.env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-cache-dir", "-q", "--disable-pip-version-check",
         str(REPO / "packages" / "dls-proto"), str(REPO / "packages" / "dls-client")],
        env=env, capture_output=True, text=True, timeout=100, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr + install.stdout
    listed = subprocess.run([python, "-m", "pip", "list", "--disable-pip-version-check"], env=env,
                            capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path).stdout
    names = {line.split()[0].lower().replace("_", "-") for line in listed.splitlines()[2:] if line.strip()}
    assert {"dls-proto", "dls-client"} <= names, listed
    assert not names & {"sysv-ipc", "psutil", "dls-shm"}, listed

    data = data_file(tmp_path)
    used = subprocess.run([python, "-c", CLIENT_ONLY, str(data)], env=env, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert used.returncode == 0, used.stderr
    assert "locked and released" in used.stdout and str(venv) in used.stdout, used.stdout
    service.wait_for_log(r" server INFO client 127\.0\.0\.1:\d+ \(port \d+, pid \d+\) closed: end of stream")


def test_a_full_lock_group_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    """A table of 4 locks in 2 groups of 2: the third lock of one group is refused at once, as a full table;
    the log names the group (the client is not told the table's geometry)."""
    with running_service(tmp_path / "release", start_options=("-ibs4,2",)) as service:
        data = tmp_path / "FBNK.ACCOUNT"
        data.write_text("")
        inode = data.stat().st_ino
        same_group = [k for k in (f"K{i}" for i in range(100)) if resource_value(inode, -1, k.encode()) % 2 == 0][:3]
        client = service.client()
        held = [client.lock(data, key) for key in same_group[:2]]
        start = time.monotonic()
        with pytest.raises(RequestFailed, match=r"lock table full \(the group of this record's lock\)$") as refused:
            client.lock(data, same_group[2])
        assert refused.value.code == ErrorCode.GROUP_FULL
        assert time.monotonic() - start < 1.0
        assert "lock group 0 is full (2 locks)" in service.log()
        held[0].release()
        client.lock(data, same_group[2]).release()  # a slot is free again
        client.close()


_LOCAL_HOLDER = """
import sys, time
from dls_client import LocalClient
held = LocalClient().lock(sys.argv[1], sys.argv[2])
print(LocalClient().mechanism, flush=True)
time.sleep(60)
"""


def test_a_remote_waiter_is_served_at_once_when_a_local_holder_is_killed(service: Service, tmp_path: Path) -> None:
    """A process killed holding a table lock rings nobody: the lock server of the waiting client watches it (a
    pidfd) and takes the lock the moment it ends, not at its next look at the table a second later."""
    data = data_file(tmp_path)
    env = {k: v for k, v in service.env.items() if k != "JDLS"}
    holder = subprocess.Popen([sys.executable, "-c", _LOCAL_HOLDER, str(data), KEY], env={**env, "JBCPORTNO": "2"},
                              text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    with running(holder):
        assert holder.stdout is not None and holder.stdout.readline() == "table\n"
        client = service.client()
        try:
            with pytest.raises(LockRefused):
                client.try_lock(data, KEY)
            killer = threading.Timer(0.3, holder.kill)
            killer.start()
            start = time.monotonic()
            with client.lock(data, KEY, timeout=10):
                elapsed = time.monotonic() - start
            killer.join()
        finally:
            client.close()
    assert elapsed < 0.3 + 0.4, f"served {elapsed:.2f} s after asking, the holder killed at 0.3 s"


def test_a_lock_server_told_to_stop_while_it_releases_finishes_quietly(service: Service, tmp_path: Path) -> None:
    """SIGTERM (jdls -k) reaching a lock server that is releasing the locks of its client, gone: the release
    is finished, every lock freed, and nothing but the usual lines logged (it broke off half done, with a
    traceback, when the signal came in the middle of a semaphore operation)."""
    data = data_file(tmp_path)
    before = service.server_pids()
    client = service.client()
    try:
        for n in range(250):  # the most a client may hold (--max-locks)
            client.lock(data, f"K{n}")
        [server] = service.server_pids() - before
    finally:
        client.close()
    while alive(server):  # signals while it releases, from the moment it begins
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGTERM)
        time.sleep(0.0002)
    wait_for(lambda: not alive(server), 10, "the lock server to end")
    # Released, or kept for the client when the signal came before the end of its stream was seen.
    ended = service.wait_for_log(r"(released|kept) 250 lock\(s\)")
    log = service.log()
    assert "Traceback" not in log and f"lock server {server} exited with status" not in log, log
    table = service.table()
    try:
        left = {e.slot.state for e in table.scan()}
        assert left == (set() if " released " in ended else {SlotState.KEPT}), (left, ended)
    finally:
        table.close()

"""End to end with OS file locks: ``jdls -ibD`` alone (no monitor, so no table), real clients.

The listener is started as the real program with its lock directories under
tmp_path (``--lock-dir``, ``--binary-lock-dir``); clients are ``dls_client``
Clients, in this process and in child processes. At the end ``jdls -k`` (and
``-K``) must leave no process of the instance (``Service.stop_and_check``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dls_client import LockRefused, LockTimeout
from dls_shm import LockTable, lock_file_name
from dls_testkit import KEY, Service, alive, client_for, make_service, wait_for

HERE = Path(__file__).resolve().parent

#: A client process that takes a lock, says so on stdout, and keeps it until killed.
HOLDER = textwrap.dedent("""\
    import sys, time
    from dls_client import Client
    client = Client()  # JDLS from the environment
    held = client.lock(sys.argv[1], sys.argv[2])
    print(f"held 0x{held.value:08x}", flush=True)
    time.sleep(600)
""")




@pytest.fixture
def os_service(tmp_path: Path) -> Iterator[Service]:
    """``jdls -ibD --port P --lock-dir ... --binary-lock-dir ...``: the listener alone, lock files under tmp_path."""
    with make_service(tmp_path, start_options=("-ibD",)).checked() as svc:
        usage = svc.jdls("-h")
        if "--lock-dir" not in usage.stdout:
            pytest.skip("jdls has no --lock-dir option: the lock files would go to /tmp/jbase")
        assert (svc.lock_dir, svc.binary_lock_dir) == (tmp_path / "jbase", tmp_path / "jbase_lock")
        svc.start("--lock-dir", str(svc.lock_dir), "--binary-lock-dir", str(svc.binary_lock_dir))
        assert "OS file locks" in "\n".join(svc.started), svc.started
        assert not LockTable.exists(svc.key), "-ibD made a lock table"
        yield svc


@contextlib.contextmanager
def holder_process(svc: Any, data: Path, key: str = KEY) -> Iterator[subprocess.Popen[str]]:
    """A client process holding (data, key); killed (if still running) when the block is left."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(data), key], env=svc.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("held "):
            proc.kill()
            raise AssertionError(f"the holder did not get its lock: {line!r} {proc.communicate(timeout=10)[1]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_with_the_listener_alone_locks_are_jlock_files_that_exclude_other_clients(
        os_service: Any, tmp_path: Path) -> None:
    svc = os_service
    data = tmp_path / "FBNK.ACCOUNT"
    data.touch()
    jlock = svc.lock_dir / lock_file_name(data.stat().st_ino, -1)
    before = svc.server_pids()
    with holder_process(svc, data) as holder, client_for(svc) as rival:
        assert jlock.exists(), f"no lock file {jlock.name} in {sorted(p.name for p in svc.lock_dir.iterdir())}"
        wait_for(lambda: len(svc.server_pids() - before) == 1, 5, "the holder's lock server to be listed")
        (server,) = svc.server_pids() - before
        with pytest.raises(LockRefused) as refused:
            rival.try_lock(data, KEY)
        who = refused.value.holder
        # Known by its lock server's pid only, as F_GETLK tells it.
        assert (who.mode, who.pid, who.port, who.client_pid, who.thread, who.ip) == (5, server, 0, 0, 0, "0.0.0.0")
        # Another key of the same file is another lock.
        rival.try_lock(data, "another key").release()
        # A waiting request with a deadline is told whom it waits for, then times out.
        waited: list[Any] = []
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            rival.lock(data, KEY, timeout=0.6, on_wait=waited.append)
        assert 0.5 <= time.monotonic() - started < 3
        assert waited and waited[0].pid == who.pid

        # The holder's client process dies: its lock server sees the connection go and ends,
        # and with it its fcntl locks.
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        wait_for(lambda: not alive(who.pid), 10, f"the holder's lock server {who.pid} to end")
        rival.try_lock(data, KEY).release()
        # A waiting request is granted when the holder goes.
        with holder_process(svc, data) as second:
            granted: list[float] = []

            def kill_soon() -> None:
                time.sleep(0.3)
                granted.append(time.monotonic())
                second.kill()

            killer = threading.Thread(target=kill_soon)
            killer.start()
            held = rival.lock(data, KEY, timeout=10)
            killer.join()
            assert time.monotonic() - granted[0] < 3
            held.release()
    # A lock file goes with its last lock (the lock servers of the closed clients end meanwhile).
    wait_for(lambda: not list(svc.lock_dir.iterdir()), 10, "the lock files to go with their last locks")


def test_two_client_processes_count_under_an_os_lock_without_losing_an_update(
        os_service: Any, tmp_path: Path) -> None:
    """Mutual exclusion between processes through OS locks: a counter incremented under the lock is exact."""
    svc = os_service
    counter = tmp_path / "counter"
    counter.write_text("0")
    rounds = 150
    script = textwrap.dedent(f"""\
        import sys
        from pathlib import Path
        from dls_client import Client
        counter = Path({str(counter)!r})
        client = Client()
        for _ in range({rounds}):
            with client.lock(counter, "COUNTER"):
                value = int(counter.read_text())
                counter.write_text(str(value + 1))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], env=svc.env, stdin=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert int(counter.read_text()) == 3 * rounds
    assert os.listdir(svc.lock_dir) == [], "a lock file goes with its last lock"

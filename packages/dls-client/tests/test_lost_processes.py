"""The holder is told, with real processes: a real lock service (``jdls`` of the test's own instance), its
lock server killed with SIGKILL under a held lock, or the whole service stopped and started again.

- A service that keeps a lost client's locks (a lock-delay): the client reclaims its lock through a new
  lock server, nobody else gets it meanwhile, and the holder is not disturbed; the same across
  ``jdls -k`` and ``jdls -ib``; a service that stays away longer than the lock-delay allows loses it.
- A service that keeps nothing of a lost client (``--lock-delay 0``): the lock is lost, ``held.lost``, ``on_lost`` runs
  within a second with no call from the application, another client gets the lock, the holder's
  ``release()`` raises LockLost, and its next request works without ``close()``.
- A lock server killed while a request of the client waits: the request is asked again through a new lock
  server, and granted when the holder releases.

The rules one by one, against fakes, are in test_lost.py.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dls_client import Client, HeldLock, LockLost, LockRefused
from dls_testkit import KEY, alive, running_service, wait_for, wait_free
from dls_testkit import Service as Daemon

#: The lock-delay of the service that keeps: longer than the client's 5 s dead-server bound, so that the
#: client has a second to reconnect after a failure (lock-delay - 5 s).
DELAY = 8.0


@pytest.fixture
def keeping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A service with a lock-delay of DELAY s."""
    root = tmp_path / "release"
    monkeypatch.setenv("JBCRELEASEDIR", str(root))
    monkeypatch.delenv("JBCPORTNO", raising=False)
    with running_service(root, "--lock-delay", f"{DELAY:g}") as svc:
        yield svc


@pytest.fixture
def forgetful(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A service that keeps nothing of a lost client (--lock-delay 0)."""
    root = tmp_path / "release"
    monkeypatch.setenv("JBCRELEASEDIR", str(root))
    monkeypatch.delenv("JBCPORTNO", raising=False)
    with running_service(root, "--lock-delay", "0") as svc:
        yield svc


def kill_lock_server(client: Client) -> int:
    """SIGKILL the lock server serving ``client``; its pid, once it is gone."""
    pid = client.connect().welcome.server_pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 5, f"lock server {pid} to die")
    return pid


def test_a_killed_lock_server_costs_its_live_client_nothing(keeping: Daemon, data: Path) -> None:
    told: list[HeldLock] = []
    with keeping.client() as client, keeping.client() as other:
        held = client.lock(data, KEY, on_lost=told.append)
        first = kill_lock_server(client)
        # The client notices the hang-up and reclaims through a new lock server; nobody else gets it meanwhile.
        wait_for(lambda: client.connected and client.connect().welcome.server_pid != first, 5,
                 "the client to connect again")
        with pytest.raises(LockRefused):
            other.try_lock(data, KEY)
        time.sleep(1.0)
        assert not told and not held.lost
        held.ensure_held()
        with pytest.raises(LockRefused):
            other.try_lock(data, KEY)
        held.release()
        assert wait_free(other, data, KEY, 3) <= 3  # the reclaimed lock was really released


def test_a_service_restarted_on_its_table_gives_the_lock_back(keeping: Daemon, data: Path) -> None:
    told: list[HeldLock] = []
    with keeping.client() as client:
        held = client.lock(data, KEY, on_lost=told.append)
        keeping.jdls("-k")  # the lock servers keep their clients' locks for the lock-delay
        keeping.start()
        with keeping.client() as other:
            with pytest.raises(LockRefused):
                other.try_lock(data, KEY)  # kept for its holder, or reclaimed by it: never granted
            wait_for(lambda: client.connected and client.connect().welcome is not None, 5, "a new connection")
            time.sleep(1.0)
            assert not told and not held.lost
            with pytest.raises(LockRefused):
                other.try_lock(data, KEY)
            held.release()
            assert wait_free(other, data, KEY, 3) <= 3


def test_a_service_away_longer_than_the_lock_delay_allows_loses_the_lock(keeping: Daemon, data: Path) -> None:
    told: list[tuple[HeldLock, float]] = []
    with keeping.client() as client:
        held = client.lock(data, KEY, on_lost=lambda h: told.append((h, time.monotonic())))
        stopped = time.monotonic()
        keeping.jdls("-k")
        wait_for(lambda: bool(told), DELAY, "the holder to be told")
        # Told before the service could have handed the lock on (it keeps it DELAY s from the stop).
        assert told[0][0] is held and told[0][1] - stopped < DELAY - 2, f"told {told[0][1] - stopped:.1f} s after"
        assert held.lost
        with pytest.raises(LockLost, match=KEY):
            held.release()
        keeping.start()


def test_a_lock_the_service_does_not_keep_is_lost_and_the_holder_told_within_a_second(
        forgetful: Daemon, data: Path) -> None:
    daemon = forgetful
    told: list[tuple[HeldLock, float]] = []
    called = threading.Event()

    def on_lost(held: HeldLock) -> None:
        told.append((held, time.monotonic()))
        called.set()

    with daemon.client() as client, daemon.client() as other:
        held = client.lock(data, KEY, on_lost=on_lost)
        assert client.connect().welcome.lock_delay_ms == 0, "this service keeps a lost client's locks"
        first = kill_lock_server(client)
        killed = time.monotonic()
        assert called.wait(2.0), "on_lost was not called"
        assert told[0][0] is held and told[0][1] - killed < 1.0, f"told {told[0][1] - killed:.2f} s after the kill"
        assert held.lost
        other.try_lock(data, KEY).release()  # the service freed it: someone else may have it now
        with pytest.raises(LockLost, match=KEY):
            held.ensure_held()
        with pytest.raises(LockLost, match=KEY):
            held.release()
        again = client.lock(data, KEY)  # no close() needed: the client connected again by itself
        assert client.connect().welcome.server_pid != first
        again.release()


def test_a_request_waiting_when_its_lock_server_is_killed_is_asked_again(daemon: Daemon, data: Path) -> None:
    with daemon.client() as client, daemon.client() as other:
        blocker = other.lock(data, KEY)
        client.connect()
        got: list[HeldLock] = []
        waiter = threading.Thread(target=lambda: got.append(client.lock(data, KEY, timeout=20)))
        waiter.start()
        try:
            time.sleep(0.3)  # the request waits on the service
            kill_lock_server(client)
            time.sleep(0.5)  # asked again through a new lock server, where it waits
            assert not got
            blocker.release()
        finally:
            waiter.join(25)
        assert got and not got[0].lost
        got[0].release()


#: A holder that takes the lock, says its lock server's pid, then runs without a pause (its watcher thread
#: cannot run meanwhile: the main thread keeps the GIL) until the first byte of a shared file is set, and asks
#: ensure_held() at once (the watcher, waiting for the GIL since it woke, gets it when the main thread next
#: waits). A byte of a shared mapping, not a signal: reading it never lets the GIL go.
_PAUSED_HOLDER = """
import mmap, sys
from dls_client import LockLost, get_client
with open(sys.argv[3], "r+b") as f:
    go = mmap.mmap(f.fileno(), 1)
client = get_client()
held = client.lock(sys.argv[1], sys.argv[2])
sys.setswitchinterval(1000)
print(client.connect().welcome.server_pid, flush=True)
while not go[0]:
    pass
sys.setswitchinterval(0.005)
try:
    held.ensure_held()
    print("HELD", flush=True)
except LockLost:
    print("LOST", flush=True)
"""


@pytest.fixture
def short_delay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A service with a lock-delay of 2 s."""
    root = tmp_path / "release"
    monkeypatch.setenv("JBCRELEASEDIR", str(root))
    monkeypatch.delenv("JBCPORTNO", raising=False)
    with running_service(root, "--lock-delay", "2") as svc:
        yield svc


def test_a_holder_stopped_longer_than_the_lock_delay_is_told_by_ensure_held_before_its_watcher_runs(
        short_delay: Daemon, data: Path) -> None:
    """SIGSTOP of the holder's process, its lock server killed meanwhile, the lock-delay out and the lock
    another's: when the holder resumes, its application may run before its watcher thread, and nothing was
    marked lost while it slept; ensure_held() must look at the connection (a hang-up), not at the mark."""
    go = data.parent / "go"
    go.write_bytes(b"\0")
    holder = subprocess.Popen([sys.executable, "-c", _PAUSED_HOLDER, str(data), KEY, str(go)], env=short_delay.env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        server = int(holder.stdout.readline())
        os.kill(holder.pid, signal.SIGSTOP)
        os.kill(server, signal.SIGKILL)
        with short_delay.client() as other:
            taken = other.lock(data, KEY, timeout=10)  # after the lock-delay: the holder may be gone
            with go.open("r+b") as flag:  # seen when it resumes (in place: the holder maps it)
                flag.write(b"\1")
            os.kill(holder.pid, signal.SIGCONT)
            ready, _, _ = select.select([holder.stdout], [], [], 20)
            said = holder.stdout.readline().strip() if ready else "nothing"
            taken.release()
        assert said == "LOST", f"the stopped holder was told {said!r} while another held its lock"
    finally:
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait()



@pytest.mark.parametrize("config", [{"binary": True}, {"oslocks": True}], ids=["binary", "oslocks"])
def test_a_lock_the_service_held_as_an_os_lock_is_lost_the_moment_its_lock_server_dies(
        keeping: Daemon, data: Path, config: dict[str, bool]) -> None:
    """Beside a table, a binary lock (JDLS BINARY) is an OS file lock of the lock server, which the kernel
    frees when it dies, whatever the lock-delay: the holder is told at once, not when the lock-delay it
    could not use runs out (a table lock of the same client stays reclaimable meanwhile). A record lock
    taken with JDLS OSLOCKS is told lost at once too (link.OS_LOCK_FLAGS: an earlier service held it as
    an OS lock, and the Welcome does not tell them apart), though the table keeps it now. The listener is
    stopped first, so that no reconnection and refused Reclaim says it sooner."""
    told: list[HeldLock] = []
    with keeping.client(**config) as client:
        if config.get("binary"):
            osheld = client.binary_lock(data)
            assert isinstance(osheld, HeldLock)
            in_table: HeldLock | None = client.lock(data, KEY)
        else:
            osheld, in_table = client.lock(data, KEY, on_lost=told.append), None
        result = keeping.jdls("-kD")
        assert result.returncode == 0, result.stderr
        kill_lock_server(client)
        wait_for(lambda: osheld.lost, 1.5, "the OS-locked lock to be marked lost")
        with pytest.raises(LockLost, match="OS file lock"):
            osheld.release()
        if in_table is not None:
            assert not in_table.lost, "a table lock was given up before its lock-delay"
        else:
            assert told == [osheld]

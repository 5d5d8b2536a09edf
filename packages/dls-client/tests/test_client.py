"""The client library against a real lock service (``jdls`` as a real program, on its own instance and port).

The ``daemon`` fixture starts the harness's ``Service`` (``jdls -ibs1000,10``) with a
private JBCRELEASEDIR and a free port, and at the end stops it (``-k``), removes its
table (``-K``) and fails the test if a process or IPC resource of the instance is left.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dls_client import (
    Client,
    Config,
    HeldLock,
    Holder,
    LockRefused,
    LockTimeout,
    Mode,
    Server,
    ServiceUnavailable,
)
from dls_testkit import KEY, free_port, lock_holder, running
from dls_testkit import Service as Daemon


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture
def holder(daemon: Daemon, data: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Another process (``dls-lock DATA KEY sleep 60``) holding the lock on (data, KEY)."""
    proc = lock_holder(daemon, data, tmp_path / "held", KEY)
    with running(proc):
        yield proc


def test_lock_and_unlock(client: Client, data: Path, daemon: Daemon) -> None:
    held = client.lock(data, KEY)
    assert isinstance(held, HeldLock)
    assert held.mode == Mode.EX and held.key == KEY.encode() and held.file.path == str(data)
    assert held.file.inode == data.stat().st_ino
    assert client.status(data, KEY)[0] == 1
    with daemon.client() as other:
        with pytest.raises(LockRefused):
            other.try_lock(data, KEY)
        held.release()
        assert client.status(data, KEY) == (0, None)
        other.try_lock(data, KEY).release()
    held.release()  # a second release is a no-op
    assert client.async_errors == []


def test_lock_in_a_with_block(client: Client, data: Path, daemon: Daemon) -> None:
    with client.lock(data, KEY, Mode.PR) as held:
        assert held.mode == Mode.PR
        with daemon.client() as other:
            other.try_lock(data, KEY, Mode.PR).release()  # shared with another reader
            with pytest.raises(LockRefused):
                other.try_lock(data, KEY, Mode.EX)
    assert held.released
    assert client.status(data, KEY) == (0, None)


def test_try_lock_refused_with_the_holder(client: Client, data: Path, holder: subprocess.Popen[bytes]) -> None:
    t0 = time.monotonic()
    with pytest.raises(LockRefused) as caught:
        client.try_lock(data, KEY)
    assert time.monotonic() - t0 < 1.0
    assert type(caught.value) is LockRefused
    who = caught.value.holder
    assert isinstance(who, Holder)
    assert who.client_pid == holder.pid
    assert who.port == holder.pid  # JBCPORTNO unset: the port number is the pid
    assert who.ip == "127.0.0.1"
    assert who.mode == Mode.EX
    assert who.pid not in (0, holder.pid, os.getpid())  # the holder's lock server
    assert f"pid {holder.pid}" in str(caught.value)


def test_timeout_raises_lock_timeout(client: Client, data: Path, holder: subprocess.Popen[bytes]) -> None:
    waits: list[Holder] = []
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as caught:
        client.lock(data, KEY, timeout=0.3, on_wait=waits.append)
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 1.5, elapsed
    assert caught.value.holder.client_pid == holder.pid
    assert [w.client_pid for w in waits] == [holder.pid]  # told at once that it waits, for whom
    assert client.status(data, KEY)[0] == 2  # the request left no trace


def test_status(client: Client, data: Path, daemon: Daemon, holder: subprocess.Popen[bytes]) -> None:
    state, who = client.status(data, KEY)
    assert state == 2 and who is not None
    assert (who.client_pid, who.mode, who.ip) == (holder.pid, Mode.EX, "127.0.0.1")
    assert client.status(data, "another key") == (0, None)
    with client.lock(data, "another key"):
        state, who = client.status(data, "another key")
        assert state == 1 and who is not None and who.client_pid == os.getpid()


def test_echo(client: Client) -> None:
    data = bytes(range(256)) * 4
    back, seconds = client.echo(data)
    assert back == data
    assert 0 <= seconds < 1.0
    assert client.echo(b"")[0] == b""


def test_release_all(client: Client, data: Path, daemon: Daemon) -> None:
    keys = [f"K{i}" for i in range(3)]
    held = [client.lock(data, k) for k in keys]
    assert client.release_all() == 3
    assert client.release_all() == 0
    with daemon.client() as other:
        for k in keys:
            other.try_lock(data, k).release()
    for h in held:
        assert h.released
        h.release()  # released by release_all: nothing is sent
    assert client.echo(b"sync")[0] == b"sync"
    assert client.async_errors == []


def test_threads_share_the_connection_without_blocking_each_other(client: Client, data: Path,
                                                                 daemon: Daemon) -> None:
    """Thread A holds K0 and waits for K1 (held elsewhere); meanwhile thread B gets K2 at once."""
    outsider = daemon.client()
    blocker = outsider.lock(data, "K1")
    waiting = threading.Event()
    result: dict[str, object] = {}

    def thread_a() -> None:
        try:
            result["k0"] = client.lock(data, "K0")
            got = client.lock(data, "K1", timeout=10, on_wait=lambda _h: waiting.set())
            result["k1_at"] = time.monotonic()
            got.release()
        except BaseException as exc:
            result["error"] = exc
            waiting.set()

    a = threading.Thread(target=thread_a, daemon=True)
    try:
        a.start()
        assert waiting.wait(5), "thread A was not told it waits"
        assert "error" not in result, result
        t0 = time.monotonic()
        k2 = client.lock(data, "K2", timeout=5)
        assert time.monotonic() - t0 < 0.5, "another thread's lock was held up by the waiting one"
        assert client.status(data, "K2")[0] == 1
        with pytest.raises(LockRefused):
            client.try_lock(data, "K0")  # owned by thread A: threads are distinct owners
        k2.release()
        assert a.is_alive(), "thread A stopped waiting"
        released = time.monotonic()
        blocker.release()
        a.join(5)
        assert not a.is_alive(), "thread A did not get K1 after it was released"
        assert "error" not in result, result
        assert float(result["k1_at"]) - released < 0.5  # type: ignore[arg-type]
    finally:
        outsider.close()
        a.join(5)
    k0 = result["k0"]
    assert isinstance(k0, HeldLock)
    k0.release()
    assert client.echo(b"sync")[0] == b"sync"
    assert client.async_errors == []


def test_threads_lock_and_release_at_once_through_the_shared_connection(client: Client, data: Path) -> None:
    """Eight threads cycle at once through one connection (one reads while others send and look at the
    socket at their releases): every cycle of every thread completes, and nothing is reported."""
    failures: list[BaseException] = []

    def cycles(n: int) -> None:
        try:
            for i in range(300):
                client.lock(data, f"T{n}-{i % 7}").release()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=cycles, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:3]
    assert client.echo(b"sync")[0] == b"sync"
    assert client.async_errors == []


def test_asyncio_through_worker_threads(client: Client, data: Path, daemon: Daemon) -> None:
    """The documented asyncio use: ``asyncio.to_thread``. A coroutine waiting for a held lock does not
    stop the event loop, nor another coroutine's lock."""
    outsider = daemon.client()
    blocker = outsider.lock(data, "A1")

    async def scenario() -> list[str]:
        done: list[str] = []

        async def waiter() -> None:
            held = await asyncio.to_thread(client.lock, data, "A1", timeout=10)
            done.append("A1")
            await asyncio.to_thread(held.release)

        task = asyncio.create_task(waiter())
        other = await asyncio.wait_for(asyncio.to_thread(client.lock, data, "A2"), 2)
        done.append("A2")
        other.release()
        await asyncio.to_thread(blocker.release)
        await asyncio.wait_for(task, 5)
        return done

    try:
        assert asyncio.run(scenario()) == ["A2", "A1"]
    finally:
        outsider.close()


def test_nothing_listening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: Path) -> None:
    root = tmp_path / "release"
    monkeypatch.setenv("JBCRELEASEDIR", str(root))
    port = free_port()  # bound and closed again: nothing listens there
    client = Client(Config(server=Server("127.0.0.1", port)))
    with pytest.raises(ServiceUnavailable) as caught:
        client.lock(data, KEY)
    message = str(caught.value)
    assert "127.0.0.1" in message and str(port) in message, message
    assert "refused" in message.lower(), message
    trace = (root / "tmp" / "jbase_error_trace").read_text()
    lines = [line for line in trace.splitlines() if "127.0.0.1" in line and str(port) in line]
    assert len(lines) == 1, trace
    assert f"pid {os.getpid()}" in lines[0] and "unable to connect" in lines[0], lines[0]


def test_losing_the_service_is_reported(client: Client, data: Path, daemon: Daemon) -> None:
    """The connection dies under a client: its next request tries to connect again, fails clearly (the
    service is stopped), and the error trace says so."""
    client.lock(data, KEY)
    stop = daemon.jdls("-k")
    assert stop.returncode == 0, stop.stderr
    with pytest.raises(ServiceUnavailable) as caught:
        client.status(data, KEY)
    message = str(caught.value)
    assert f"host '127.0.0.1', service '{daemon.port}'" in message and "refused" in message, message
    trace = daemon.root / "tmp" / "jbase_error_trace"
    text = trace.read_text() if trace.exists() else ""
    assert f"pid {os.getpid()}" in text and f"127.0.0.1,{daemon.port}" in text, (
        f"the lost connection is not in the error trace:\n{text}"
    )

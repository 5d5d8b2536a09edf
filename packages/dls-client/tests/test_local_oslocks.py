"""Local direct locking without a lock table: OS file locks shared with a ``jdls -ibD`` lock server; and -P tables.

Each test starts its own service in its own instance (``local_env``: JBCRELEASEDIR
and JDLS_LOCK_DIR under tmp_path, for this process, its children and the
daemon, so no lock file goes to /tmp/jbase). ``jdls -ibD`` is the listener
alone: no table, every record lock an ``fcntl`` lock in JDLS_LOCK_DIR, whether a
lock server takes it for a remote client or a local process takes it itself.
The fixture stops the service and checks that nothing of the instance is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dls_client import Client, Holder, LocalClient, LockRefused, LockTimeout, Mode
from dls_client.local import local_mechanism, local_table_key
from dls_shm import Instance, LockTable, lock_file_name
from dls_testkit import KEY, wait_for
from dls_testkit import Service as Daemon

Holders = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def daemon(local_env: Path, running_daemon: Callable[..., Any]) -> Iterator[Daemon]:
    with running_daemon(local_env, "-ibD") as svc:
        assert not LockTable.exists(svc.key), "-ibD made a lock table"
        yield svc


def release(proc: subprocess.Popen[str]) -> None:
    """Have a local holder release its lock, and wait until it has."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "released"


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=10)


def test_without_a_table_a_local_client_takes_os_locks_in_the_lock_dir(local: LocalClient, data: Path,
                                                                      tmp_path: Path) -> None:
    assert local_table_key() is None and local_mechanism() == "oslocks"
    assert local.mechanism == "oslocks" and local.table is None and local.lock_dir == tmp_path / "jbase"
    with local.lock(data, KEY) as held:
        assert held.mode == Mode.EX and held.key == KEY.encode()
        assert (tmp_path / "jbase" / lock_file_name(data.stat().st_ino, -1)).exists()
        assert local.status(data, KEY)[0] == 1
        # proc/info is written as with a table (the first lock in the file publishes it)
        assert not local.publish_info()
        document = json.loads((Instance.from_environment().info_dir / f"{local.port}@0.0.0.0").read_text())
        assert document["ip"] == "0.0.0.0" and [lk["key"] for lk in document["locks"]] == [KEY]
    assert local.status(data, KEY) == (0, None)


def test_local_and_remote_exclude_each_other_both_ways(local: LocalClient, remote: Client, data: Path) -> None:
    with local.lock(data, KEY):
        with pytest.raises(LockRefused) as refused:
            remote.try_lock(data, KEY)
        assert refused.value.holder.pid == os.getpid()  # an OS lock names its process only
        with pytest.raises(LockRefused):
            remote.lock(data, KEY, timeout=0.3)
        state, _ = remote.status(data, KEY)
        assert state == 2
    with remote.lock(data, KEY):
        with pytest.raises(LockRefused) as refused:
            local.try_lock(data, KEY)
        assert not isinstance(refused.value, LockTimeout) and refused.value.holder.pid != os.getpid()
        state, holder = local.status(data, KEY)
        assert state == 2 and holder is not None and holder.pid == refused.value.holder.pid
        with pytest.raises(LockRefused):
            local.try_lock(data, KEY, Mode.PR)
    assert remote.status(data, KEY) == (0, None)
    # shared modes share across both kinds
    with local.lock(data, KEY, Mode.PR), remote.lock(data, KEY, Mode.PR):
        pass


def test_a_local_wait_times_out_and_is_granted_when_the_remote_releases(local: LocalClient, remote: Client,
                                                                         data: Path) -> None:
    held = remote.lock(data, KEY)
    seen: list[Holder] = []
    started = time.monotonic()
    with pytest.raises(LockTimeout) as timed_out:
        local.lock(data, KEY, timeout=0.4, on_wait=seen.append)
    assert 0.4 <= time.monotonic() - started < 1.5
    assert len(seen) == 1 and seen[0].pid == timed_out.value.holder.pid != os.getpid()
    assert not local.info.waiting and not local.info.held

    got: list[float] = []
    waiting = threading.Event()
    published: list[dict[str, Any]] = []

    def wait_for_it() -> None:
        with local.lock(data, KEY, timeout=10, on_wait=lambda h: waiting.set()):
            got.append(time.monotonic())

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    assert waiting.wait(5)
    document = Instance.from_environment().info_dir / f"{local.port}@0.0.0.0"

    def published_waiting() -> bool:  # once it has waited a moment (LONG_WAIT): most waits are shorter
        published[:] = [json.loads(document.read_text())]
        return [lk["state"] for lk in published[0]["locks"]] == ["waiting"]

    wait_for(published_waiting, 2, "the wait published")
    time.sleep(0.3)
    assert not got
    released_at = time.monotonic()
    held.release()
    waiter.join(10)
    assert got and got[0] - released_at < 0.6  # polled: 250 ms at most between looks
    assert not local.info.waiting and not local.info.held


def test_a_remote_waiter_gets_a_local_lock_of_another_process(remote: Client, data: Path,
                                                              local_holder: Holders) -> None:
    proc = local_holder(data, KEY)
    try:
        with pytest.raises(LockRefused) as refused:
            remote.try_lock(data, KEY)
        assert refused.value.holder.pid == proc.pid
        got: list[float] = []

        def wait_for_it() -> None:
            with remote.lock(data, KEY, timeout=10):
                got.append(time.monotonic())

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.3)
        assert not got
        released_at = time.monotonic()
        release(proc)
        waiter.join(10)
        assert got and got[0] - released_at < 0.6
    finally:
        stop(proc)


def test_a_local_waiter_gets_a_local_lock_of_another_process(local: LocalClient, data: Path,
                                                             local_holder: Holders) -> None:
    proc = local_holder(data, KEY)
    try:
        with pytest.raises(LockRefused) as refused:
            local.try_lock(data, KEY)
        assert refused.value.holder.pid == proc.pid
        threading.Timer(0.3, release, (proc,)).start()
        started = time.monotonic()
        with local.lock(data, KEY, timeout=10):
            assert 0.25 < time.monotonic() - started < 2
    finally:
        stop(proc)


def test_a_killed_local_holder_lock_is_freed_by_the_kernel(local: LocalClient, remote: Client, data: Path,
                                                          local_holder: Holders) -> None:
    proc = local_holder(data, KEY)
    with pytest.raises(LockRefused):
        remote.try_lock(data, KEY)
    proc.send_signal(signal.SIGKILL)
    stop(proc)
    with remote.lock(data, KEY, timeout=2) as held:
        assert held.mode == Mode.EX
    local.lock(data, KEY, timeout=2).release()  # the remote unlock travels without an answer: wait for it


def test_closing_releases_the_os_locks_and_release_all(daemon: Daemon, remote: Client, data: Path,
                                                       tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.touch()
    local = LocalClient()
    local.lock(data, KEY)
    local.lock(other, KEY)
    assert local.release_all() == 2
    local.lock(data, KEY)
    local.close()
    remote.try_lock(data, KEY).release()


# -- a table made with -P: owners are (port, thread, address) ----------------------------------------

@pytest.fixture
def port_daemon(local_env: Path, running_daemon: Callable[..., Any]) -> Iterator[Daemon]:
    with running_daemon(local_env, "-ib", "-P") as svc:
        yield svc


def slots(daemon: Daemon) -> list[tuple[int, int, int]]:
    table = LockTable.attach(daemon.key)
    try:
        assert table.port_owners
        return [(e.slot.pid, e.slot.port, e.slot.thread) for e in table.scan()]
    finally:
        table.close()


def test_a_port_owner_table(port_daemon: Daemon, data: Path, local_holder: Holders,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JBCPORTNO", "7")
    with LocalClient() as local, port_daemon.client() as remote:
        assert local.mechanism == "table" and local.port == 7
        # another process on the same port is another owner: its thread differs
        proc = local_holder(data, KEY, JBCPORTNO="7")
        try:
            assert slots(port_daemon) == [(proc.pid, 7, proc.pid)]
            with pytest.raises(LockRefused) as refused:
                local.try_lock(data, KEY)
            assert (refused.value.holder.port, refused.value.holder.pid) == (7, proc.pid)
            release(proc)
        finally:
            stop(proc)
        with local.lock(data, KEY):
            assert slots(port_daemon) == [(os.getpid(), 7, threading.get_native_id())]
            # the same port and thread through the listener is another owner: the address is part of it (a
            # local process shows 0.0.0.0), so a peer naming a local process's port is not that process
            with pytest.raises(LockRefused) as through_the_listener:
                remote.try_lock(data, KEY, Mode.EX)
            assert through_the_listener.value.holder.pid == os.getpid()
            # another thread of the same port is another owner
            refusals: list[BaseException] = []
            thread = threading.Thread(target=lambda: _expect_refusal(local, data, refusals))
            thread.start()
            thread.join(10)
            assert len(refusals) == 1 and refusals[0].holder.port == 7  # type: ignore[attr-defined]
        assert slots(port_daemon) == []


def _expect_refusal(local: LocalClient, data: Path, refusals: list[BaseException]) -> None:
    try:
        local.try_lock(data, KEY).release()
    except LockRefused as exc:
        refusals.append(exc)


def test_a_forked_child_locks_under_its_own_port(port_daemon: Daemon, data: Path) -> None:
    with LocalClient() as local:
        assert local.port == os.getpid()
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            try:
                with local.lock(data, KEY):
                    os.write(write, json.dumps(slots(port_daemon)).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            reported = json.loads(pipe.read() or "null")
        os.waitpid(child, 0)
        assert reported == [[child, child, child]]
        assert slots(port_daemon) == []

"""Local direct locking (``LocalClient``) against a real lock service on this host.

Each test starts its own ``jdls -ib`` with JBCRELEASEDIR, JDLS_LOCK_DIR and
JDLS_BINARY_LOCK_DIR under ``tmp_path``; this process uses the same
JBCRELEASEDIR with JDLS and DLS_IPC_KEY unset, so a LocalClient finds the
instance's table. At the end every LocalClient is closed, the service is
stopped (``-k``) and its table removed (``-K``), and the test fails if a
process or IPC resource of the instance is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dls_client as client_module
import dls_client.local as local_module
import dls_shm
import pytest
from dls_client import (
    Client,
    ConfigurationError,
    HeldLock,
    Holder,
    LocalClient,
    LocalHeldLock,
    LockLost,
    LockRefused,
    Mode,
    get_client,
)
from dls_client.local import local_mechanism, local_table_key
from dls_shm import LockTable, geometry_for, unpack_ip
from dls_testkit import KEY, free_key, own_table, wait_for
from dls_testkit import Service as Daemon


@pytest.fixture
def daemon(local_env: Path, running_daemon: Callable[..., Any]) -> Iterator[Daemon]:
    with running_daemon(local_env, "-ib") as svc:
        yield svc


def table_entries(daemon: Daemon) -> list[tuple[str, int, int, int, bytes]]:
    table = LockTable.attach(daemon.key)
    try:
        return [(unpack_ip(e.slot.ip), e.slot.pid, e.slot.client_pid, e.slot.device, e.slot.key[: e.slot.key_len])
                for e in table.scan()]
    finally:
        table.close()


def test_a_local_lock_shows_in_the_table_as_0000_with_the_process_pid(local: LocalClient, data: Path,
                                                                      daemon: Daemon) -> None:
    held = local.lock(data, KEY)
    assert isinstance(held, LocalHeldLock)
    assert held.mode == Mode.EX and held.key == KEY.encode() and held.file.inode == data.stat().st_ino
    assert table_entries(daemon) == [("0.0.0.0", os.getpid(), os.getpid(), -1, KEY.encode())]
    assert local.status(data, KEY)[0] == 1
    held.release()
    assert local.status(data, KEY) == (0, None)
    assert table_entries(daemon) == []


def test_local_and_remote_respect_each_other(local: LocalClient, remote: Client, data: Path) -> None:
    with local.lock(data, KEY):
        with pytest.raises(LockRefused) as refused:
            remote.try_lock(data, KEY)
        assert refused.value.holder.ip == "0.0.0.0" and refused.value.holder.client_pid == os.getpid()
        state, holder = remote.status(data, KEY)
        assert state == 2 and holder is not None and holder.ip == "0.0.0.0"
    with remote.lock(data, KEY):
        with pytest.raises(LockRefused) as refused:
            local.try_lock(data, KEY)
        assert refused.value.holder.ip == "127.0.0.1" and refused.value.holder.client_pid == os.getpid()
        with pytest.raises(LockRefused):
            local.lock(data, KEY, timeout=0.2)
        state, holder = local.status(data, KEY)
        assert state == 2 and holder is not None and holder.ip == "127.0.0.1"
    assert remote.status(data, KEY) == (0, None)  # a round trip: the unlock sent before it is done
    local.try_lock(data, KEY).release()
    # shared modes share across both kinds
    with local.lock(data, KEY, Mode.PR), remote.lock(data, KEY, Mode.PR):
        pass


def test_a_remote_waiter_gets_a_local_lock_of_another_process_promptly(
    remote: Client, data: Path, local_holder: Callable[..., subprocess.Popen[str]],
) -> None:
    proc = local_holder(data, KEY)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with pytest.raises(LockRefused) as refused:
            remote.try_lock(data, KEY)
        assert refused.value.holder.ip == "0.0.0.0" and refused.value.holder.client_pid == proc.pid
        got: list[float] = []
        waiting = threading.Event()

        def wait_for_it() -> None:
            with remote.lock(data, KEY, timeout=10, on_wait=lambda h: waiting.set()):
                got.append(time.monotonic())

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.3)  # the remote request is queued behind the child's lock
        assert not got
        released_at = time.monotonic()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "released"
        waiter.join(10)
        assert got and got[0] - released_at < 0.5
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_local_waiter_is_woken_promptly_when_a_remote_holder_releases(local: LocalClient, remote: Client,
                                                                        data: Path) -> None:
    held = remote.lock(data, KEY)
    holders: list[Holder] = []
    got: list[float] = []

    def wait_for_it() -> None:
        with local.lock(data, KEY, timeout=10, on_wait=holders.append):
            got.append(time.monotonic())

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    wait_for(lambda: holders, 5, "the waiting client to be told who holds the lock")
    assert holders[0].ip == "127.0.0.1"
    time.sleep(0.2)
    released_at = time.monotonic()
    held.release()
    waiter.join(10)
    assert got and got[0] - released_at < 0.5


def test_a_killed_local_process_lock_is_reclaimed_for_a_remote_request(
    remote: Client, data: Path, local_holder: Callable[..., subprocess.Popen[str]],
) -> None:
    proc = local_holder(data, KEY)
    with pytest.raises(LockRefused):
        remote.try_lock(data, KEY)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    with remote.lock(data, KEY, timeout=2) as held:
        assert held.mode == Mode.EX


def test_release_all_and_threads(local: LocalClient, data: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.touch()
    local.lock(data, KEY)
    local.lock(other, KEY)
    with pytest.raises(LockRefused):  # another thread is another owner
        pool: list[BaseException] = []
        t = threading.Thread(target=lambda: _try(local, data, pool))
        t.start()
        t.join()
        raise pool[0]
    assert local.release_all() == 2
    assert local.status(data, KEY) == (0, None)


def _try(local: LocalClient, data: Path, errors: list[BaseException]) -> None:
    try:
        local.try_lock(data, KEY).release()
    except BaseException as exc:
        errors.append(exc)


def test_get_client_locks_directly_with_jdls_unset(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    assert local_table_key() == daemon.key
    client = get_client()
    try:
        assert isinstance(client, LocalClient)
        assert get_client() is client
    finally:
        client.close()
    monkeypatch.setattr(client_module, "_process_client", None)
    monkeypatch.setenv("JDLS", f"SERVER=127.0.0.1,{daemon.port}")
    client = get_client()
    try:
        assert type(client) is Client
    finally:
        client.close()


def test_get_client_locks_with_os_locks_without_a_table(local_env: Path) -> None:
    """No table on this host and JDLS unset: local OS file locks, as jDLS without its monitor."""
    assert local_table_key() is None
    assert local_mechanism() == "oslocks"
    client = get_client()
    try:
        assert isinstance(client, LocalClient) and client.mechanism == "oslocks"
    finally:
        client.close()


def test_get_client_is_remote_without_dls_shm(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_module, "HAVE_SHM", False)  # as when `import dls_shm` failed (no local extra)
    assert local_table_key() is None
    assert type(get_client()) is Client


def test_dls_client_does_not_import_dls_shm() -> None:
    code = "import sys, dls_client; assert 'dls_shm' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_a_bad_dls_ipc_key_is_refused_not_guessed(local_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JDLS unset and DLS_IPC_KEY malformed: the table the service uses cannot be known, so no local client
    falls back to OS file locks (a mechanism the service's clients would not see); jdls refuses it too."""
    monkeypatch.setenv("DLS_IPC_KEY", "abc")
    for make in (get_client, LocalClient, local_mechanism):
        with pytest.raises(ConfigurationError, match="DLS_IPC_KEY: 'abc' is not a number"):
            make()


def test_a_local_lock_is_lost_only_when_its_table_is_removed(local_env: Path, data: Path, tmp_path: Path,
                                                            trace: Callable[[], str]) -> None:
    """The one way a local process loses a lock it holds: the table removed under it (ipcrm). ensure_held
    looks in shared memory (no round trip) and says LockLost, and so does release(), once; on_lost runs."""
    told: list[HeldLock] = []
    with own_table(free_key(tmp_path), geometry_for(100, 10)) as table, LocalClient(table.key) as local:
        held = local.lock(data, KEY, on_lost=told.append)
        kept = local.lock(data, "other")
        held.ensure_held()  # the table is there: held
        table.remove()
        with pytest.raises(LockLost, match=f"{data} {KEY}") as lost:
            held.ensure_held()
        assert "was removed" in str(lost.value) and told == [held] and held.lost
        with pytest.raises(LockLost):
            held.release()
        held.release()
        with pytest.raises(LockLost, match=f"{data} other"):
            kept.release()  # found by the release itself
    assert f"lock {data} {KEY} lost" in trace()



def test_the_lock_manager_works_in_the_table_the_service_made(
    local: LocalClient, data: Path, daemon: Daemon, local_holder: Callable[..., subprocess.Popen[str]],
) -> None:
    """Conversions, value blocks and tokens in the instance's own table (jdls made it; its value blocks are
    of the default size), beside another local process; the rest is tests/test_local_dlm.py's, in tables of
    their own."""
    held = local.lock(data, KEY, Mode.NL, value_block=True)
    assert held.value_block == bytes(dls_shm.DEFAULT_BLOCK_SIZE) and held.value_block_valid
    held.convert(Mode.EX)
    token = held.token
    held.convert(Mode.NL, value_block=b"v1")
    held.convert(Mode.PR)
    assert held.value_block == b"v1".ljust(dls_shm.DEFAULT_BLOCK_SIZE, b"\0") and held.token > token
    held.convert(Mode.NL)
    proc = local_holder(data, KEY)  # EX in another process, beside the NL lock
    try:
        with pytest.raises(LockRefused) as refused:
            held.convert(Mode.PR, wait=False)
        assert refused.value.holder.client_pid == proc.pid and held.mode == Mode.NL
    finally:
        proc.kill()
        proc.wait(timeout=10)
    held.release()

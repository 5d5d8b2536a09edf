"""One mechanism per instance, the daemon's half: the monitor's look after it made a table (``claim``), the
refusal ``jdls -i`` asks first (``start_refusal``), and which OS locks of a lock server look for a table.

The monitor's side runs in this process on a table of the test's own key; whatever stands in its way is
a real process (a forked child holding OS locks, or a pid file held as a running listener holds it).
The race of "announce, then look" is tried here many times over: a child takes and releases OS locks
in a loop while this process makes a table, looks, and either keeps it (and locks in it) or removes it;
each side marks its critical section with a file made O_EXCL, so two holders at once cannot go unseen.
End to end with real jdls commands: tests/test_one_mechanism.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from dls_daemon.lifecycle import StartFailed
from dls_daemon.mechanisms import Mechanisms
from dls_daemon.one_mechanism import claim, refusal, start_refusal
from dls_daemon.settings import Settings
from dls_proto import LockFlag
from dls_shm import (
    LISTENER,
    Grant,
    HeldPidFile,
    Instance,
    LockTable,
    OsLocks,
    Owner,
    TableServes,
    geometry_for,
    pidfiles,
    proc_locks,
)
from dls_testkit import Children, Pipe, free_key, ipc_left, remove_ipc

INODE, DEVICE, KEY = 0x2468, -1, b"FBNK.ACCOUNT*USD1"
SMALL = geometry_for(100, 10)
#: Rounds of the race: each makes a table, looks, and keeps it or removes it.
RACE_ROUNDS = 400

T = TypeVar("T")


def owner(thread: int = 1) -> Owner:
    return Owner(os.getpid(), thread, 0, 0, bytes(16))


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    """An instance of the test's own (its key free) and its lock directory; nothing left under the key after."""
    key = free_key(tmp_path)
    made = Settings(Instance(tmp_path / "release", key), lock_dir=tmp_path / "jbase")
    made.instance.make_dirs()
    yield made
    left = ipc_left(key)
    remove_ipc(key)
    assert not left, f"left under 0x{key:08x}: {left}"


@contextlib.contextmanager
def child_while(children: Children, pipes: Callable[[], Pipe], enter: Callable[[], T],
                leave: Callable[[T], object]) -> Iterator[int]:
    """A forked child that runs ``enter()``, and ``leave(what enter gave)`` when the block ends; its pid."""
    started, stop = pipes(), pipes()

    def body() -> int:
        held = enter()
        started.send()
        stop.recv(timeout=60)
        leave(held)
        return 0

    pid = children.fork(body)
    started.recv()
    try:
        yield pid
    finally:
        stop.send()
        assert children.wait(pid) == 0


def holding_os_lock(settings: Settings) -> tuple[Callable[[], OsLocks], Callable[[OsLocks], object]]:
    """``child_while``'s enter and leave for an OS record lock of the instance."""

    def enter() -> OsLocks:
        locks = OsLocks(settings.lock_dir, table_key=settings.instance.key)
        assert isinstance(locks.lock(owner(), INODE, DEVICE, KEY, 5), Grant)
        return locks

    return enter, OsLocks.close


def test_nothing_in_the_way_the_table_made_is_kept(settings: Settings) -> None:
    assert refusal(settings.instance, settings.lock_dir) is None
    assert start_refusal(settings) is None
    table, created = LockTable.create(settings.instance.key, SMALL)
    try:
        claim(settings, table, created)
        assert LockTable.exists(table.key)
    finally:
        table.remove()


def test_a_held_os_lock_makes_the_monitor_remove_its_new_table_and_name_the_holder(
        settings: Settings, children: Children, pipes: Callable[[], Pipe]) -> None:
    with child_while(children, pipes, *holding_os_lock(settings)) as holder:
        said = start_refusal(settings)
        assert said is not None and said.startswith(f"OS file locks in {settings.lock_dir} are held by pid {holder} (")
        assert said.endswith(": 1 lock): they serve the instance without a table, and a table now would grant their "
                             "records again: have them released (or stop those processes), then start the monitor "
                             "again")
        table, created = LockTable.create(settings.instance.key, SMALL)
        with pytest.raises(StartFailed) as refused:
            claim(settings, table, created)
        assert str(refused.value) == said
        assert ipc_left(settings.instance.key) == []  # removed again
        # A table that existed already is the instance's: attached as it is, whatever OS locks are held.
        table, created = LockTable.create(settings.instance.key, SMALL)
        try:
            again, created_again = LockTable.create(settings.instance.key, SMALL)
            assert not created_again
            claim(settings, again, created_again)
            assert start_refusal(settings) is None
            again.close()
        finally:
            table.remove()
    assert start_refusal(settings) is None


def test_a_listener_or_lock_servers_without_a_table_make_the_monitor_refuse(
        settings: Settings, children: Children, pipes: Callable[[], Pipe]) -> None:
    instance = settings.instance
    with child_while(children, pipes, lambda: HeldPidFile.acquire(instance.pid_file(LISTENER)),
                     HeldPidFile.release) as pid:
        said = start_refusal(settings)
        assert said == (f"the lock listener (pid {pid}) runs without a lock table: it serves the instance with OS "
                        "file locks, and a table now would be a second mechanism beside them: stop the service "
                        "(jdls -k), then start it with its table (jdls -ib)")
        table, created = LockTable.create(instance.key, SMALL)
        with pytest.raises(StartFailed, match="runs without a lock table"):
            claim(settings, table, created)
        assert ipc_left(instance.key) == []

    # A lock server listed in run/servers (of a listener stopped with jdls -kD) refuses it as well. A process
    # of its own (exec'd: a forked child would inherit any table this test process has mapped, and be taken
    # for a lock server of a removed table).
    server = subprocess.Popen(["sleep", "60"])
    try:
        instance.servers_dir.mkdir(parents=True, exist_ok=True)
        path = instance.server_pid_file(server.pid)
        path.write_text(pidfiles.record_of(server.pid).text())
        assert start_refusal(settings) == (
            f"lock servers (pid {server.pid}) run without a lock table: they serve their clients with OS file "
            "locks, and a table now would be a second mechanism beside them: stop the service (jdls -k), then "
            "start it with its table (jdls -ib)")
        path.unlink()
    finally:
        server.kill()
        server.wait()
    assert start_refusal(settings) is None


def test_an_unreadable_proc_locks_is_a_refusal_not_a_guess(settings: Settings,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    settings.lock_dir.mkdir()
    (settings.lock_dir / "jlock_00000001_ffffffff").touch()
    monkeypatch.setattr(proc_locks, "PROC_LOCKS", settings.lock_dir / "no-proc-locks")
    assert refusal(settings.instance, settings.lock_dir) == (
        f"cannot tell whether OS file locks are held in {settings.lock_dir}: /proc/locks: No such file or directory")


def test_only_the_main_os_locks_of_a_lock_server_without_a_table_look_for_one(tmp_path: Path) -> None:
    key = free_key(tmp_path)
    without = Mechanisms(None, tmp_path / "jbase", tmp_path / "jbase_lock", key)
    assert isinstance(without.main, OsLocks) and without.main.table_key == key
    assert without.for_flags(int(LockFlag.OSLOCK)) is without.main
    binary = without.for_flags(int(LockFlag.BINARY))
    assert isinstance(binary, OsLocks) and binary.table_key is None
    without.close()
    table, _ = LockTable.create(key, SMALL)
    try:
        beside = Mechanisms(table, tmp_path / "jbase", tmp_path / "jbase_lock", key)
        assert beside.main is table
        assert beside.for_flags(int(LockFlag.OSLOCK)) is table  # one mechanism per record lock
        binary = beside.for_flags(int(LockFlag.BINARY))
        assert isinstance(binary, OsLocks) and binary.table_key is None  # a namespace of its own: no look
        assert isinstance(binary.lock(owner(), INODE, DEVICE, KEY, 5), Grant)
        beside.close()
    finally:
        table.remove()


# -- the race ----------------------------------------------------------------------------------


def _inside(marker: Path, seconds: float) -> bool:
    """A critical section of ``seconds``, marked by a file made O_EXCL: False (and no wait) when another
    holder's mark is there, that is two holders at once."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    time.sleep(seconds)
    marker.unlink()
    return True


def test_the_race_of_a_monitor_making_a_table_and_a_process_taking_os_locks_never_gives_two_holders(
        settings: Settings, children: Children, pipes: Callable[[], Pipe], tmp_path: Path) -> None:
    marker = tmp_path / "inside"
    key = settings.instance.key
    stop, report = pipes(), pipes()

    def taker() -> int:
        locks = OsLocks(settings.lock_dir, table_key=key)
        granted = served = inside = 0
        while True:
            try:
                got = locks.lock(owner(), INODE, DEVICE, KEY, 5)
            except TableServes:
                served += 1
            else:
                assert isinstance(got, Grant)
                granted += 1
                inside += not _inside(marker, 0.0005)
                locks.unlock(got.handle)
            try:
                stop.recv(timeout=0.0003)
                break
            except AssertionError:
                continue
        report.send(f"{granted:08d}{served:08d}{inside:08d}".encode())
        return 0

    pid = children.fork(taker)
    kept = refused = overlaps = 0
    for _ in range(RACE_ROUNDS):
        time.sleep(0.001)  # a moment without a table: the taker's OS locks serve
        table, created = LockTable.create(key, SMALL)
        assert created
        try:
            claim(settings, table, created)
        except StartFailed as exc:
            assert "are held by pid" in str(exc)
            refused += 1
            continue
        kept += 1
        try:
            got = table.lock(owner(), INODE, DEVICE, KEY, 5)
            assert isinstance(got, Grant)  # nobody else locks in the table
            overlaps += not _inside(marker, 0.001)
            table.unlock(got.handle)
        finally:
            table.remove()
    stop.send()
    counts = report.recv(24, timeout=30)
    assert children.wait(pid) == 0
    granted, served, inside = int(counts[:8]), int(counts[8:16]), int(counts[16:])
    print("COUNTS", kept, refused, granted, served, inside, overlaps)
    assert (overlaps, inside) == (0, 0), "two holders at once: a table lock and an OS lock"
    # Both ways out of the race were taken, many times, on both sides.
    assert kept and refused and granted and served, (kept, refused, granted, served)

"""OS-lock files as another local user sees them: the group's directory (03770) and 0660 files keep a third
user out, an untrusted directory is refused, and a lock file goes with its last lock, never while a lock
is about to be taken on it (real files, real fcntl locks, real users through forked children)."""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dls_shm import Conflict, Grant, OsLockError, OsLocks, Owner
from dls_shm.layout import LOCAL_IP
from dls_testkit import NOBODY, SERVICE_GID, Children, as_user, reachable_dir

INODE, DEVICE, KEY = 0x1234, -1, b"ORDERS*1001"
FILE = "jlock_00001234_ffffffff"
EX = 5
#: How long each of the two processes of the removal race locks and unlocks (seconds).
RACE_SECONDS = 1.5


def owner(thread: int = 1) -> Owner:
    return Owner(os.getpid(), 0, 0, thread, LOCAL_IP, keep=False)


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_dir() as made:
        yield made


def test_a_third_user_can_neither_open_hold_nor_delete_a_lock_file_a_member_can_lock(base: Path) -> None:
    lock_dir = base / "jbase"
    locks = OsLocks(lock_dir, gid=SERVICE_GID)
    got = locks.lock(owner(), INODE, DEVICE, KEY, EX)
    assert isinstance(got, Grant)
    st = lock_dir.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o3770, SERVICE_GID)
    assert stat.S_IMODE((lock_dir / FILE).stat().st_mode) == 0o660
    jlock = lock_dir / FILE

    def stranger() -> int:
        for attempt in (lambda: os.open(jlock, os.O_RDWR), lambda: os.open(jlock, os.O_RDONLY),
                        lambda: os.unlink(jlock), lambda: os.listdir(lock_dir)):
            try:
                attempt()
            except PermissionError:
                continue
            print("a stranger got in", flush=True)
            return 1
        try:
            OsLocks(lock_dir, owners=frozenset({0})).lock(owner(), INODE, DEVICE, KEY, EX)
        except OsLockError as exc:
            print(exc, flush=True)
            return 0
        return 1

    code, output = as_user(stranger)
    assert code == 0, output
    assert f"cannot open lock file {jlock}: Permission denied" in output

    def member() -> int:
        answer = OsLocks(lock_dir, owners=frozenset({0})).lock(owner(), INODE, DEVICE, KEY, EX)
        return 0 if isinstance(answer, Conflict) and answer.holder.pid == os.getppid() else 1

    code, output = as_user(member, groups=[SERVICE_GID])
    assert code == 0, output
    assert jlock.exists()
    locks.unlock(got.handle)
    assert not jlock.exists()
    locks.close()


@pytest.mark.parametrize("problem", ["symlink", "nobody's", "world-writable", "group-writable without sticky"])
def test_an_untrusted_lock_directory_is_refused_and_named(base: Path, problem: str) -> None:
    lock_dir = base / "jbase"
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    if problem == "symlink":
        lock_dir.symlink_to(elsewhere)
        why = "is a symbolic link"
    else:
        lock_dir.mkdir()
        if problem == "nobody's":
            os.chown(lock_dir, NOBODY, NOBODY)
            lock_dir.chmod(0o3770)
            why = "owned by another user"
        elif problem == "world-writable":
            lock_dir.chmod(0o1777)
            why = "writable by others (mode 1777)"
        else:
            lock_dir.chmod(0o770)
            why = "writable by group without the sticky bit (mode 0770)"
    locks = OsLocks(lock_dir)
    with pytest.raises(OsLockError, match=re.escape(f"cannot use the lock directory {lock_dir}: {why}")):
        locks.lock(owner(), INODE, DEVICE, KEY, EX)
    assert locks.close() == 0
    assert list(elsewhere.iterdir()) == []


def test_a_planted_lock_file_is_not_followed_or_used(base: Path) -> None:
    lock_dir = base / "jbase"
    lock_dir.mkdir(mode=0o700)
    target = base / "precious"
    target.write_text("keep")
    (lock_dir / FILE).symlink_to(target)
    with pytest.raises(OsLockError, match=f"cannot open lock file {lock_dir / FILE}"):
        OsLocks(lock_dir).lock(owner(), INODE, DEVICE, KEY, EX)
    (lock_dir / FILE).unlink()
    os.link(target, lock_dir / FILE)
    with pytest.raises(OsLockError, match="has 2 hard links"):
        OsLocks(lock_dir).lock(owner(), INODE, DEVICE, KEY, EX)
    assert target.read_text() == "keep"


def test_lock_files_do_not_pile_up(base: Path) -> None:
    lock_dir = base / "jbase"
    locks = OsLocks(lock_dir)
    for inode in range(1, 51):
        got = locks.lock(owner(), inode, DEVICE, KEY, EX)
        shared = locks.lock(owner(2), inode, DEVICE, b"another key", EX)
        assert isinstance(got, Grant) and isinstance(shared, Grant)
        locks.unlock(got.handle)
        assert len(os.listdir(lock_dir)) == 1, "the file stays while a lock is held on it"
        locks.unlock(shared.handle)
    assert os.listdir(lock_dir) == []
    locks.close()


def test_removing_a_lock_file_never_lets_two_processes_hold_one_lock(base: Path, children: Children) -> None:
    """Two processes lock and unlock one key as fast as they can, each removing the file as it lets go:
    a critical section marked by an O_EXCL file is never entered twice at once."""
    lock_dir = base / "jbase"
    marker = base / "inside"

    def hammer() -> int:
        locks = OsLocks(lock_dir)
        me = Owner(os.getpid(), 0, 0, 1, LOCAL_IP, keep=False)
        rounds = overlaps = 0
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            got = locks.lock(me, INODE, DEVICE, KEY, EX)
            if not isinstance(got, Grant):
                continue
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                overlaps += 1
            else:
                marker.unlink()
            locks.unlock(got.handle)
            rounds += 1
        locks.close()
        return 0 if overlaps == 0 and rounds > 10 else 1

    pids = [children.fork(hammer) for _ in range(2)]
    assert [children.wait(pid) for pid in pids] == [0, 0]
    assert os.listdir(lock_dir) == []

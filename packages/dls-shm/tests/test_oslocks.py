"""OS file locks (``OsLocks``): the lock mechanism without a table, in one process and between processes.

In one process the owners are threads (told apart by OsLocks itself, as fcntl
cannot); between processes they are forked children holding real fcntl locks,
reaped by the test or at the latest by the ``children`` fixture. Every lock
directory is under tmp_path. One mechanism per instance: OS locks made with a
table key, which look for a table after each take (tables of the test's own,
``make_table``), and who holds OS locks in a lock directory (``proc_locks``).
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sysv_ipc
from dls_shm import (
    LOCAL_IP,
    Conflict,
    Doorbell,
    Grant,
    Holder,
    LockTable,
    NotHeld,
    OsLockError,
    OsLockHolder,
    OsLocks,
    Owner,
    Queued,
    TableError,
    TableServes,
    key_offset,
    lock_file_name,
    modes,
    oslock_holders,
    resource_value,
    table_serves,
)
from dls_shm.oslocks import OS_CLASS, compatible
from dls_testkit import Children, Pipe, free_key, wait_for

NL, CR, CW, PR, PW, EX = range(6)
INODE, DEVICE, KEY = 0x1234, -1, b"ORDERS*1001"
FILE = "jlock_00001234_ffffffff"
IP = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 7])


def owner(thread: int = 1, *, port: int = 0, client_pid: int = 0, ip: bytes = LOCAL_IP) -> Owner:
    """An owner in this process (called in a child, in the child)."""
    return Owner(os.getpid(), thread, port, client_pid, ip)


def foreign(pid: int, mode: int = EX) -> Holder:
    """A holder in another process, as F_GETLK shows it."""
    return Holder(mode, pid, 0, 0, 0, LOCAL_IP)


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "jbase"


@pytest.fixture
def locks(lock_dir: Path) -> Iterator[OsLocks]:
    made = OsLocks(lock_dir)
    yield made
    made.close()


def open_lock_files(lock_dir: Path) -> int:
    """Descriptors of this process open on files of ``lock_dir``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(lock_dir) + os.sep)
        except OSError:
            pass
    return count


# -- names and mapping ----------------------------------------------------------------------


def test_lock_file_names_are_inode_and_device_in_hex_with_minus_one_as_ffffffff() -> None:
    assert lock_file_name(0x7B, -1) == "jlock_0000007b_ffffffff"
    assert lock_file_name(0x12345678, 0x801) == "jlock_12345678_00000801"
    assert lock_file_name(1, -2) == "jlock_00000001_fffffffe"
    assert lock_file_name(0x1_0000_0001, 5) == "jlock_100000001_00000005"  # wide inodes are not cut


def test_key_offsets_are_stable_distinct_and_valid_file_offsets() -> None:
    offsets = {key_offset(b"K%d" % i) for i in range(10_000)}
    assert len(offsets) == 10_000
    assert all(0 <= o < 1 << 62 for o in offsets)
    assert key_offset(b"USD163170001") == key_offset(b"USD163170001")
    assert key_offset(b"x" * 5000) != key_offset(b"x" * 4999)


def test_the_os_mapping_is_never_looser_than_the_dlm_matrix() -> None:
    assert OS_CLASS == (0, 1, 2, 1, 2, 2)
    for requested in range(6):
        for held in range(6):
            if compatible(requested, held):
                assert modes.compatible(requested, held), (modes.NAMES[requested], modes.NAMES[held])
    # What jBASE uses is exact: READ (PR) is shared, WRITE (EX) excludes, NL excludes nobody.
    assert compatible(PR, PR) and compatible(CR, PR) and compatible(NL, EX) and compatible(EX, NL)
    assert not compatible(EX, PR) and not compatible(PR, EX) and not compatible(EX, EX)
    # Stricter than the DLM where fcntl has no finer lock.
    assert modes.compatible(CW, CW) and not compatible(CW, CW)
    assert modes.compatible(CR, PW) and not compatible(CR, PW)


# -- one process, several threads -----------------------------------------------------------


def test_a_lock_makes_its_directory_and_lock_file(locks: OsLocks, lock_dir: Path) -> None:
    assert not lock_dir.exists()
    g = locks.lock(owner(), INODE, DEVICE, KEY, EX)
    assert isinstance(g, Grant) and g.mode == EX
    assert g.value == resource_value(INODE, DEVICE, KEY)
    assert [p.name for p in lock_dir.iterdir()] == [FILE]
    assert locks.path_of(INODE, DEVICE) == lock_dir / FILE
    assert stat.S_IMODE((lock_dir / FILE).stat().st_mode) == 0o660
    assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o3770
    locks.unlock(g.handle)
    assert not (lock_dir / FILE).exists(), "a lock file goes with its last lock"


def test_exclusive_excludes_another_thread_which_is_told_who_holds_it(locks: OsLocks) -> None:
    a = owner(1, port=51, client_pid=4242, ip=IP)
    g = locks.lock(a, INODE, DEVICE, KEY, EX)
    assert isinstance(g, Grant)
    refused = locks.lock(owner(2), INODE, DEVICE, KEY, PR)
    assert refused == Conflict(Holder(EX, os.getpid(), 51, 4242, 1, IP))
    assert isinstance(locks.lock(owner(2), INODE, DEVICE, b"another key", EX), Grant)
    assert isinstance(locks.lock(owner(2), INODE + 1, DEVICE, KEY, EX), Grant)
    locks.unlock(g.handle)
    assert isinstance(locks.lock(owner(2), INODE, DEVICE, KEY, EX), Grant)


def test_readers_share_and_a_writer_waits_for_all_of_them(locks: OsLocks) -> None:
    r1 = locks.lock(owner(1), INODE, DEVICE, KEY, PR)
    r2 = locks.lock(owner(2), INODE, DEVICE, KEY, CR)
    assert isinstance(r1, Grant) and isinstance(r2, Grant) and r1.handle != r2.handle
    assert isinstance(locks.lock(owner(3), INODE, DEVICE, KEY, EX), Conflict)
    locks.unlock(r1.handle)
    assert isinstance(locks.lock(owner(3), INODE, DEVICE, KEY, PW), Conflict)
    locks.unlock(r2.handle)
    assert isinstance(locks.lock(owner(3), INODE, DEVICE, KEY, EX), Grant)


def test_a_null_lock_excludes_nobody(locks: OsLocks) -> None:
    n = locks.lock(owner(1), INODE, DEVICE, KEY, NL)
    assert isinstance(n, Grant)
    assert isinstance(locks.lock(owner(2), INODE, DEVICE, KEY, EX), Grant)
    assert locks.status(owner(1), INODE, DEVICE, KEY)[0] == 1


def test_a_second_request_of_one_thread_converts_its_lock(locks: OsLocks) -> None:
    g = locks.lock(owner(1), INODE, DEVICE, KEY, PR)
    assert isinstance(g, Grant)
    up = locks.lock(owner(1), INODE, DEVICE, KEY, EX)
    assert up == Grant(g.handle, EX, g.value)
    assert isinstance(locks.lock(owner(2), INODE, DEVICE, KEY, PR), Conflict)
    down = locks.lock(owner(1), INODE, DEVICE, KEY, PR)
    assert down == Grant(g.handle, PR, g.value)
    r = locks.lock(owner(2), INODE, DEVICE, KEY, PR)
    assert isinstance(r, Grant)
    assert locks.lock(owner(1), INODE, DEVICE, KEY, EX) == Conflict(Holder(PR, os.getpid(), 0, 0, 2, LOCAL_IP))
    assert locks.held() == 2


def test_a_queued_request_is_granted_by_retry_and_rung_when_a_thread_releases(locks: OsLocks) -> None:
    bell = Doorbell()
    try:
        g = locks.lock(owner(1), INODE, DEVICE, KEY, EX)
        assert isinstance(g, Grant)
        q = locks.lock(owner(2), INODE, DEVICE, KEY, EX, wait_token=bell.token)
        assert isinstance(q, Queued) and q.holder.thread == 1
        assert locks.retry(q.handle) == q
        assert not bell.wait(0)
        locks.unlock(g.handle)
        assert bell.wait(5.0), "the waiter's doorbell was not rung"
        granted = locks.retry(q.handle)
        assert granted == Grant(q.handle, EX, g.value)
        with pytest.raises(NotHeld):
            locks.retry(q.handle)
        locks.unlock(q.handle)
    finally:
        bell.close()


def test_a_cancelled_request_is_gone(locks: OsLocks, lock_dir: Path) -> None:
    g = locks.lock(owner(1), INODE, DEVICE, KEY, EX)
    assert isinstance(g, Grant)
    q = locks.lock(owner(2), INODE, DEVICE, KEY, PR, wait_token=99)
    assert isinstance(q, Queued)
    assert locks.cancel(q.handle) is True
    assert locks.cancel(q.handle) is False
    with pytest.raises(NotHeld):
        locks.retry(q.handle)
    with pytest.raises(NotHeld):
        locks.unlock(q.handle)


def test_unlock_of_what_is_not_held(locks: OsLocks) -> None:
    with pytest.raises(NotHeld):
        locks.unlock(1 << 63 | 12345)
    g = locks.lock(owner(), INODE, DEVICE, KEY, EX)
    assert isinstance(g, Grant)
    locks.unlock(g.handle)
    with pytest.raises(NotHeld):
        locks.unlock(g.handle)


def test_status_free_mine_and_another_thread(locks: OsLocks, lock_dir: Path) -> None:
    assert locks.status(owner(1), INODE, DEVICE, KEY) == (0, None)
    assert not lock_dir.exists(), "status makes no directory or file"
    g = locks.lock(owner(1, port=7), INODE, DEVICE, KEY, PR)
    assert isinstance(g, Grant)
    assert locks.status(owner(1), INODE, DEVICE, KEY) == (1, Holder(PR, os.getpid(), 7, 0, 1, LOCAL_IP))
    assert locks.status(owner(2), INODE, DEVICE, KEY) == (2, Holder(PR, os.getpid(), 7, 0, 1, LOCAL_IP))
    assert locks.status(owner(2), INODE, DEVICE, b"other") == (0, None)


def test_release_owner_frees_one_thread_or_all_and_close_lets_go_of_every_file(
        locks: OsLocks, lock_dir: Path) -> None:
    for i in range(3):
        assert isinstance(locks.lock(owner(1), INODE + i, DEVICE, KEY, EX), Grant)
    assert isinstance(locks.lock(owner(2), INODE + 9, DEVICE, KEY, EX), Grant)
    assert isinstance(locks.lock(owner(2), INODE, DEVICE, KEY, EX, wait_token=5), Queued)
    assert open_lock_files(lock_dir) == 4
    assert locks.release_owner(os.getpid() + 1) == 0
    assert locks.release_owner(os.getpid(), 1) == 3
    assert locks.held() == 1
    assert locks.release_owner(os.getpid()) == 2  # a lock and a queued request
    assert locks.held() == 0
    assert open_lock_files(lock_dir) == 0, "a lock file stayed open with nothing held on it"
    assert isinstance(locks.lock(owner(3), INODE, DEVICE, KEY, EX), Grant)
    assert open_lock_files(lock_dir) == 1
    assert locks.close() == 1
    assert open_lock_files(lock_dir) == 0


def test_a_lock_file_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    locks = OsLocks(blocker / "jbase")
    with pytest.raises(OsLockError, match=r"cannot use the lock directory .*not-a-directory.*: Not a directory"):
        locks.lock(owner(), INODE, DEVICE, KEY, EX)
    assert locks.close() == 0


def test_lock_files_are_made_for_the_group_whatever_the_umask(lock_dir: Path) -> None:
    old = os.umask(0o077)
    try:
        locks = OsLocks(lock_dir)
        g = locks.lock(owner(), INODE, DEVICE, KEY, EX)
        assert isinstance(g, Grant)
        assert stat.S_IMODE((lock_dir / FILE).stat().st_mode) == 0o660
        locks.close()
    finally:
        os.umask(old)


# -- between processes ------------------------------------------------------------------------


def hold(lock_dir: Path, locked: Pipe, release: Pipe, mode: int = EX, key: bytes = KEY) -> Callable[[], int]:
    """A child body: take the lock in a fresh OsLocks, say so, keep it until told (or killed)."""

    def body() -> int:
        locks = OsLocks(lock_dir)
        g = locks.lock(owner(), INODE, DEVICE, key, mode)
        if not isinstance(g, Grant):
            return 3
        locked.send()
        release.recv(timeout=60)
        locks.unlock(g.handle)
        locks.close()
        return 0

    return body


def test_another_process_is_refused_and_told_the_holders_pid(
        locks: OsLocks, lock_dir: Path, children: Children, pipes: Callable[[], Pipe]) -> None:
    locked, release = pipes(), pipes()
    pid = children.fork(hold(lock_dir, locked, release, EX))
    locked.recv()
    assert locks.lock(owner(), INODE, DEVICE, KEY, PR) == Conflict(foreign(pid, EX))
    assert locks.status(owner(), INODE, DEVICE, KEY) == (2, foreign(pid, EX))
    # Another key of the same file, and the same key of another file, are free.
    g = locks.lock(owner(), INODE, DEVICE, b"ORDERS*1002", EX)
    assert isinstance(g, Grant)
    assert isinstance(locks.lock(owner(), INODE, 5, KEY, EX), Grant)
    release.send()
    assert children.wait(pid) == 0
    assert isinstance(locks.lock(owner(), INODE, DEVICE, KEY, EX), Grant)


def test_readers_in_two_processes_share_and_a_writer_is_refused_by_either(
        locks: OsLocks, lock_dir: Path, children: Children, pipes: Callable[[], Pipe]) -> None:
    locked, release = pipes(), pipes()
    pid = children.fork(hold(lock_dir, locked, release, PR))
    locked.recv()
    mine = locks.lock(owner(), INODE, DEVICE, KEY, PR)
    assert isinstance(mine, Grant)
    # Converting up is refused because of the other reader; my read lock stays.
    assert locks.lock(owner(), INODE, DEVICE, KEY, EX) == Conflict(foreign(pid, PR))
    assert locks.status(owner(), INODE, DEVICE, KEY)[0] == 1
    release.send()
    assert children.wait(pid) == 0

    def writer() -> int:
        other = OsLocks(lock_dir)
        result = other.lock(owner(), INODE, DEVICE, KEY, EX)
        return 0 if result == Conflict(foreign(os.getppid(), PR)) else 4

    assert children.wait(children.fork(writer)) == 0, "my read lock did not survive the refused conversion"
    assert locks.lock(owner(), INODE, DEVICE, KEY, EX) == Grant(mine.handle, EX, mine.value)


def test_a_waiter_polled_until_its_deadline_is_still_queued_then_cancelled(
        locks: OsLocks, lock_dir: Path, children: Children, pipes: Callable[[], Pipe]) -> None:
    locked, release = pipes(), pipes()
    pid = children.fork(hold(lock_dir, locked, release, EX))
    locked.recv()
    q = locks.lock(owner(), INODE, DEVICE, KEY, EX, wait_token=1)
    assert q == Queued(q.handle, foreign(pid, EX))  # type: ignore[union-attr]
    deadline = time.monotonic() + 0.3
    pause, looks = locks.retry_first, 0
    while time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 2, locks.retry_max)
        assert locks.retry(q.handle) == q
        looks += 1
    assert 2 <= looks <= 6
    assert locks.cancel(q.handle)
    release.send()
    assert children.wait(pid) == 0


def test_a_waiter_gets_the_lock_soon_after_the_other_process_releases(
        locks: OsLocks, lock_dir: Path, children: Children, pipes: Callable[[], Pipe]) -> None:
    locked, release = pipes(), pipes()
    pid = children.fork(hold(lock_dir, locked, release, EX))
    locked.recv()
    q = locks.lock(owner(), INODE, DEVICE, KEY, EX, wait_token=1)
    assert isinstance(q, Queued)
    release.send()
    assert children.wait(pid) == 0
    assert isinstance(locks.retry(q.handle), Grant)


def test_the_kernel_frees_the_locks_of_a_process_killed_with_sigkill(
        locks: OsLocks, lock_dir: Path, children: Children, pipes: Callable[[], Pipe]) -> None:
    locked, release = pipes(), pipes()
    pid = children.fork(hold(lock_dir, locked, release, EX))
    locked.recv()
    q = locks.lock(owner(), INODE, DEVICE, KEY, EX, wait_token=1)
    assert isinstance(q, Queued) and q.holder.pid == pid
    assert children.kill(pid) == -signal.SIGKILL
    assert isinstance(locks.retry(q.handle), Grant), "the lock of a killed process was not freed"
    assert [p.name for p in lock_dir.iterdir()] == [FILE]


def test_the_lock_of_a_process_excludes_every_other_process_not_its_own_threads_only(
        lock_dir: Path, children: Children, pipes: Callable[[], Pipe]) -> None:
    """Two children each take the lock in turn with two threads' worth of owners: never both at once."""
    locked, release = pipes(), pipes()
    first = children.fork(hold(lock_dir, locked, release, EX))
    locked.recv()
    results = pipes()

    def rival() -> int:
        mine = OsLocks(lock_dir)
        outcome = [mine.lock(owner(t), INODE, DEVICE, KEY, mode) for t, mode in ((1, EX), (2, PR), (3, NL))]
        ok = (isinstance(outcome[0], Conflict) and outcome[0].holder.pid == first
              and isinstance(outcome[1], Conflict) and isinstance(outcome[2], Grant))
        results.send(b"y" if ok else b"n")
        return 0

    assert children.wait(children.fork(rival)) == 0
    assert results.recv() == b"y"
    release.send()
    assert children.wait(first) == 0


def test_a_forked_child_cannot_use_its_parents_os_locks(
        locks: OsLocks, children: Children, pipes: Callable[[], Pipe]) -> None:
    """fcntl locks are not inherited: a child must not believe it holds what its parent holds."""
    assert isinstance(locks.lock(owner(), INODE, DEVICE, KEY, EX), Grant)
    answer = pipes()

    def child() -> int:
        try:
            locks.lock(owner(), INODE, DEVICE, b"other", EX)
        except OsLockError as exc:
            answer.send(b"y" if "make a new OsLocks" in str(exc) else b"n")
            return 0
        answer.send(b"n")
        return 0

    assert children.wait(children.fork(child)) == 0
    assert answer.recv() == b"y"


# -- acquire: the table's waiting, polled ------------------------------------------------------


def test_acquire_with_no_timeout_to_speak_of_only_tries(locks: OsLocks) -> None:
    g = locks.acquire(owner(1), INODE, DEVICE, KEY, EX)
    assert isinstance(g, Grant)
    waits: list[Holder] = []
    assert locks.acquire(owner(2), INODE, DEVICE, KEY, PR, timeout=0, on_wait=waits.append) == Conflict(
        Holder(EX, os.getpid(), 0, 0, 1, LOCAL_IP))
    assert waits == [], "a try does not wait"
    assert locks.close() == 1, "a try leaves no request behind"


def test_acquire_times_out_and_cancels_its_request(locks: OsLocks) -> None:
    assert isinstance(locks.acquire(owner(1), INODE, DEVICE, KEY, EX), Grant)
    waits: list[Holder] = []
    start = time.monotonic()
    result = locks.acquire(owner(2), INODE, DEVICE, KEY, PR, timeout=0.3, on_wait=waits.append)
    elapsed = time.monotonic() - start
    holder = Holder(EX, os.getpid(), 0, 0, 1, LOCAL_IP)
    assert result == Conflict(holder)
    assert waits == [holder], "on_wait is called once, with the holder"
    assert 0.25 <= elapsed < 2.0
    assert locks.close() == 1, "the timed-out request was not cancelled"


def test_acquire_is_woken_at_once_by_a_release_in_another_thread(locks: OsLocks) -> None:
    locks.retry_first = locks.retry_max = 30.0  # polling would take 30 s: only the doorbell is quick enough
    g = locks.acquire(owner(1), INODE, DEVICE, KEY, EX)
    assert isinstance(g, Grant)
    releaser = threading.Timer(0.2, locks.unlock, (g.handle,))
    releaser.start()
    start = time.monotonic()
    try:
        result = locks.acquire(owner(2), INODE, DEVICE, KEY, EX, timeout=10)
    finally:
        releaser.join()
    assert isinstance(result, Grant) and result.mode == EX
    assert time.monotonic() - start < 5.0
    assert locks.status(owner(2), INODE, DEVICE, KEY)[0] == 1


def test_acquire_polls_for_a_lock_of_another_process(
        locks: OsLocks, lock_dir: Path, children: Children, pipes: Callable[[], Pipe]) -> None:
    locked, release = pipes(), pipes()
    pid = children.fork(hold(lock_dir, locked, release, EX))
    locked.recv()
    waits: list[Holder] = []
    releaser = threading.Timer(0.2, release.send)
    releaser.start()
    try:
        result = locks.acquire(owner(), INODE, DEVICE, KEY, EX, timeout=10, on_wait=waits.append)
    finally:
        releaser.join()
    assert isinstance(result, Grant)
    assert waits == [foreign(pid, EX)]
    assert children.wait(pid) == 0


def test_acquire_cancels_its_request_when_on_wait_raises(locks: OsLocks) -> None:
    assert isinstance(locks.acquire(owner(1), INODE, DEVICE, KEY, EX), Grant)

    def refuse(holder: Holder) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        locks.acquire(owner(2), INODE, DEVICE, KEY, EX, on_wait=refuse)
    assert locks.close() == 1, "the request was left queued"


def test_each_thread_and_a_forked_child_have_their_own_doorbell(
        locks: OsLocks, children: Children, pipes: Callable[[], Pipe]) -> None:
    mine = locks.doorbell()
    assert locks.doorbell() is mine
    other: list[Doorbell] = []
    thread = threading.Thread(target=lambda: other.append(locks.doorbell()))
    thread.start()
    thread.join()
    assert other[0].token != mine.token
    answer = pipes()

    def child() -> int:
        answer.send(b"y" if locks.doorbell().token != mine.token else b"n")
        return 0

    assert children.wait(children.fork(child)) == 0
    assert answer.recv() == b"y"


# -- one mechanism per instance: take, then look ------------------------------------------------

MakeTable = Callable[..., LockTable]


def mine(lock_dir: Path) -> list[OsLockHolder]:
    """The OS locks this process holds in ``lock_dir``."""
    return [h for h in oslock_holders(lock_dir) if h.pid == os.getpid()]


def test_table_serves_not_a_table_removed_between_its_lookup_and_the_attach(
        tmp_path: Path, make_table: MakeTable, monkeypatch: pytest.MonkeyPatch) -> None:
    """jdls -K between shmget and shmat: sysv_ipc says ValueError (EINVAL), which must not escape to a lock
    request (found racing a monitor's start against a local process's OS lock, 2026-12-01)."""
    table = make_table()
    try:
        def removed(*_args: object) -> None:
            raise ValueError("Invalid id, address, or flags")

        monkeypatch.setattr(sysv_ipc, "SharedMemory", removed)
        assert not table_serves(table.key)
    finally:
        monkeypatch.undo()
        table.remove()


def test_table_serves_once_the_table_exists_and_not_while_its_semaphore_alone_is_being_made(
        tmp_path: Path, make_table: MakeTable) -> None:
    key = free_key(tmp_path)
    assert not table_serves(key)
    # A monitor making a table makes its semaphore first: not yet a table, and its look comes after the memory.
    sem = sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, 0o600, 0)
    try:
        assert not table_serves(key)
    finally:
        sem.remove()
    table = make_table()
    assert table.key == key and table_serves(key)
    table.remove()
    assert not table_serves(key)


def test_without_a_table_os_locks_with_a_table_key_lock_as_before(lock_dir: Path, tmp_path: Path) -> None:
    locks = OsLocks(lock_dir, table_key=free_key(tmp_path))
    try:
        g = locks.lock(owner(), INODE, DEVICE, KEY, EX)
        assert isinstance(g, Grant)
        assert [h.path.name for h in mine(lock_dir)] == [FILE]
        assert locks.status(owner(), INODE, DEVICE, KEY)[0] == 1
        locks.unlock(g.handle)
        assert mine(lock_dir) == []
    finally:
        locks.close()


def test_once_a_table_serves_a_new_lock_is_dropped_again_and_refused(lock_dir: Path, make_table: MakeTable) -> None:
    table = make_table()
    locks = OsLocks(lock_dir, table_key=table.key)
    try:
        with pytest.raises(TableServes) as served:
            locks.lock(owner(), INODE, DEVICE, KEY, EX)
        assert isinstance(served.value, TableError) and served.value.key == table.key
        assert str(served.value) == (f"lock table 0x{table.key:08x} now serves this instance: no OS file lock is "
                                     f"taken in {lock_dir} any more (lock through the table)")
        assert mine(lock_dir) == [] and locks.held() == 0 and locks.waiting() == 0
        assert open_lock_files(lock_dir) == 0
        # A status from OS locks would not be the table's answer: refused too.
        with pytest.raises(TableServes):
            locks.status(owner(), INODE, DEVICE, KEY)
        # NL takes no OS lock: there is nothing to drop.
        assert isinstance(locks.lock(owner(), INODE, DEVICE, KEY, NL), Grant)
    finally:
        locks.close()


def test_without_a_table_key_os_locks_ignore_a_table(locks: OsLocks, make_table: MakeTable) -> None:
    """Binary locks, and OSLOCK locks beside a table: the client's own choice, outside the rule."""
    make_table()
    assert isinstance(locks.lock(owner(), INODE, DEVICE, KEY, EX), Grant)
    assert locks.status(owner(), INODE, DEVICE, KEY)[0] == 1


def test_a_conversion_up_under_a_table_is_refused_and_the_lock_held_stays_as_it_was(
        lock_dir: Path, tmp_path: Path, make_table: MakeTable, children: Children,
        pipes: Callable[[], Pipe]) -> None:
    locks = OsLocks(lock_dir, table_key=free_key(tmp_path))
    try:
        g = locks.lock(owner(), INODE, DEVICE, KEY, PR)
        assert isinstance(g, Grant)
        assert make_table().key == locks.table_key
        with pytest.raises(TableServes):
            locks.lock(owner(), INODE, DEVICE, KEY, EX)
        assert locks.held() == 1
        # The kernel still has the read lock: another process may read, not write.
        locked, release = pipes(), pipes()
        reader = children.fork(hold(lock_dir, locked, release, PR))
        locked.recv()
        release.send()
        assert children.wait(reader) == 0

        def writer() -> int:
            return 0 if isinstance(OsLocks(lock_dir).lock(owner(), INODE, DEVICE, KEY, EX), Conflict) else 4

        assert children.wait(children.fork(writer)) == 0
        locks.unlock(g.handle)
        assert mine(lock_dir) == []
    finally:
        locks.close()


def test_a_waiting_request_that_gets_its_lock_under_a_table_ends_with_the_error(
        lock_dir: Path, tmp_path: Path, make_table: MakeTable, children: Children,
        pipes: Callable[[], Pipe]) -> None:
    locked, release = pipes(), pipes()
    holder = children.fork(hold(lock_dir, locked, release))
    locked.recv()
    locks = OsLocks(lock_dir, table_key=free_key(tmp_path))
    try:
        queued = locks.lock(owner(), INODE, DEVICE, KEY, EX, wait_token=7)
        assert isinstance(queued, Queued) and queued.holder.pid == holder
        assert isinstance(locks.retry(queued.handle), Queued)
        assert make_table().key == locks.table_key
        release.send()
        assert children.wait(holder) == 0
        with pytest.raises(TableServes):
            locks.retry(queued.handle)
        assert locks.waiting() == 0 and mine(lock_dir) == []
        with pytest.raises(NotHeld):
            locks.retry(queued.handle)
        assert not locks.cancel(queued.handle)
        # acquire(), as a local process waits: the error comes out of the wait.
        with pytest.raises(TableServes):
            locks.acquire(owner(), INODE, DEVICE, KEY, EX, timeout=2)
    finally:
        locks.close()


# -- who holds OS locks in a lock directory (proc_locks) ------------------------------------------


def test_the_holders_of_a_lock_directory_are_found_by_pid_and_lock_file(
        lock_dir: Path, tmp_path: Path, children: Children, pipes: Callable[[], Pipe]) -> None:
    assert oslock_holders(lock_dir) == []  # no directory yet
    first_locked, first_release = pipes(), pipes()
    first = children.fork(hold(lock_dir, first_locked, first_release, EX))
    first_locked.recv()
    second_locked, second_release = pipes(), pipes()
    second = children.fork(hold(lock_dir, second_locked, second_release, PR, b"another key"))
    second_locked.recv()
    # Locks elsewhere do not count: another directory, a file of the directory that is not a lock file.
    elsewhere = OsLocks(tmp_path / "elsewhere")
    assert isinstance(elsewhere.lock(owner(), INODE, DEVICE, KEY, EX), Grant)
    stray = lock_dir / "not-a-lock-file"
    stray.touch()
    fd = os.open(stray, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert sorted(oslock_holders(lock_dir)) == sorted([OsLockHolder(first, lock_dir / FILE),
                                                           OsLockHolder(second, lock_dir / FILE)])
        first_release.send()
        second_release.send()
        assert children.wait(first) == 0 and children.wait(second) == 0
        assert oslock_holders(lock_dir) == []
    finally:
        os.close(fd)
        elsewhere.close()


def test_a_process_blocked_in_the_kernel_behind_a_holder_is_no_holder(
        lock_dir: Path, children: Children, pipes: Callable[[], Pipe]) -> None:
    locked, release = pipes(), pipes()
    holder = children.fork(hold(lock_dir, locked, release))
    locked.recv()

    def blocked() -> int:
        fd = os.open(lock_dir / FILE, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)  # another byte is free: take it, then block on the holder's
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, key_offset(KEY))
        return 0

    waiter = children.fork(blocked)
    try:
        wait_for(lambda: any(f" {waiter} " in line and "->" in line
                             for line in Path("/proc/locks").read_text().splitlines()),
                 5, "the waiter to block in the kernel")
        assert sorted(oslock_holders(lock_dir)) == sorted([OsLockHolder(holder, lock_dir / FILE),
                                                           OsLockHolder(waiter, lock_dir / FILE)])  # its byte 0
    finally:
        children.kill(waiter)
        release.send()
        assert children.wait(holder) == 0


def test_lines_of_proc_locks_are_matched_by_device_and_inode(tmp_path: Path, lock_dir: Path) -> None:
    lock_dir.mkdir()
    (lock_dir / FILE).touch()
    st = (lock_dir / FILE).stat()
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    other = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino + 1}"
    text = tmp_path / "locks"
    text.write_text(
        f"1: POSIX  ADVISORY  WRITE 4242 {where} 5 5\n"
        f"2: -> POSIX  ADVISORY  WRITE 4343 {where} 5 5\n"
        f"3: OFDLCK ADVISORY  READ -1 {where} 0 EOF\n"
        f"4: FLOCK  ADVISORY  WRITE 4444 {other} 0 EOF\n"
        f"6: OFDLCK ADVISORY  WRITE -1 {where} 0 EOF\n"  # a removal's whole-file lock: no record is held
        "5: POSIX  ADVISORY  WRITE 4545 <none>:0 0 EOF\n"
        "garbage\n"
    )
    assert oslock_holders(lock_dir, text) == [OsLockHolder(4242, lock_dir / FILE), OsLockHolder(-1, lock_dir / FILE)]
    with pytest.raises(OSError):
        oslock_holders(lock_dir, tmp_path / "no such file")

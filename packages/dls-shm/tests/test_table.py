"""The lock table in one process: lock, unlock, conflicts, queues, sweeps, attaching.

Distinct owners here are threads of this process (same pid, other thread ids), or this process's parent:
pids that are alive, so that the table never takes their locks for a dead owner's.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from itertools import count, product
from typing import Any

import dls_shm.table
import pytest
import sysv_ipc
from dls_shm import (
    KEY_MAX,
    Conflict,
    Doorbell,
    Grant,
    GroupFull,
    Holder,
    LockTable,
    NotHeld,
    Owner,
    Queued,
    SlotState,
    TableError,
    TableFlag,
    TableMissing,
    geometry_for,
    ipc_key_for,
    modes,
    pack_ip,
    resource_value,
    unpack_ip,
)
from dls_shm.layout import MAGIC, SLOT_SIZE, SlotFlag
from dls_shm.semaphores import Semaphores
from dls_shm.table import INDEX_BITS, stored_key

NL, CR, CW, PR, PW, EX = range(6)
INODE, DEVICE = 1234, 56

#: The DLM compatibility matrix, written out: requested mode -> the held modes it may join.
MAY_JOIN = {
    NL: {NL, CR, CW, PR, PW, EX},
    CR: {NL, CR, CW, PR, PW},
    CW: {NL, CR, CW},
    PR: {NL, CR, PR},
    PW: {NL, CR},
    EX: {NL},
}


def owner(thread: int, pid: int | None = None) -> Owner:
    """An owner with recognisable port, client pid and address."""
    return Owner(pid or os.getpid(), thread, 7000 + thread, 100 + thread, pack_ip(f"10.0.0.{thread}"))


def holder_of(o: Owner, mode: int) -> Holder:
    return Holder(mode, o.pid, o.port, o.client_pid, o.thread, o.ip)


A, B, C, D = owner(1), owner(2), owner(3), owner(4)


def lock(table: LockTable, o: Owner, key: bytes = b"REC1", mode: int = EX, **kw: Any) -> Any:
    return table.lock(o, INODE, DEVICE, key, mode, **kw)


def grant(table: LockTable, o: Owner, key: bytes = b"REC1", mode: int = EX) -> Grant:
    result = lock(table, o, key, mode)
    assert isinstance(result, Grant), result
    return result


def queue(table: LockTable, o: Owner, bell: Doorbell, key: bytes = b"REC1", mode: int = EX) -> Queued:
    result = lock(table, o, key, mode, wait_token=bell.token)
    assert isinstance(result, Queued), result
    return result


def entries(table: LockTable) -> list[Any]:
    return list(table.scan())


def rung(bell: Doorbell) -> bool:
    return bool(bell.wait(0.5))


def quiet(bell: Doorbell) -> bool:
    return not bell.wait(0.05)


@pytest.fixture
def bells() -> Any:
    made: list[Doorbell] = []

    def make() -> Doorbell:
        made.append(Doorbell())
        return made[-1]

    yield make
    for bell in made:
        bell.close()


MakeBell = Callable[[], Doorbell]


# -- lock and unlock ------------------------------------------------------------------------------------


def test_lock_then_unlock(table: LockTable) -> None:
    before = time.time()
    g = grant(table, A, b"CUST*1", EX)
    assert g.mode == EX
    assert g.value == resource_value(INODE, DEVICE, b"CUST*1")
    [entry] = entries(table)
    assert entry.index == g.handle & ((1 << INDEX_BITS) - 1)
    assert entry.group == g.value % table.geometry.ngroups
    assert entry.value == g.value
    s = entry.slot
    assert (s.state, s.mode, s.pid, s.thread, s.port, s.client_pid) == (SlotState.GRANTED, EX, A.pid, 1, 7001, 101)
    assert unpack_ip(s.ip) == "10.0.0.1"
    assert (s.inode, s.device, s.key[: s.key_len], s.flags, s.queued) == (INODE, DEVICE, b"CUST*1", 0, 0)
    assert s.ticket == g.handle >> INDEX_BITS
    assert before <= s.timestamp <= time.time()
    table.unlock(g.handle)
    assert entries(table) == []
    g2 = grant(table, B, b"CUST*1", EX)
    assert g2.handle != g.handle
    table.unlock(g2.handle)


def test_many_locks_and_handles_are_distinct(table: LockTable) -> None:
    handles = [grant(table, A, b"K%d" % i).handle for i in range(200)]
    assert len(set(handles)) == 200
    assert len(entries(table)) == 200
    for h in handles:
        table.unlock(h)
    assert entries(table) == []


def test_relock_by_the_same_owner_gives_the_same_handle(table: LockTable) -> None:
    g1 = grant(table, A, mode=EX)
    g2 = grant(table, A, mode=EX)
    assert g2 == g1
    assert len(entries(table)) == 1
    # a conversion keeps the handle too
    g3 = grant(table, A, mode=PR)
    assert (g3.handle, g3.mode) == (g1.handle, PR)
    [entry] = entries(table)
    assert entry.slot.mode == PR
    table.unlock(g1.handle)
    assert entries(table) == []
    with pytest.raises(NotHeld):
        table.unlock(g3.handle)


def test_another_thread_of_the_same_process_conflicts(table: LockTable) -> None:
    grant(table, A)
    other_thread = A._replace(thread=2)
    assert lock(table, other_thread) == Conflict(holder_of(A, EX))


def test_conflict_carries_the_holder(table: LockTable) -> None:
    grant(table, B, mode=PW)
    result = lock(table, C, mode=PR)
    assert isinstance(result, Conflict)
    assert result.holder == Holder(PW, B.pid, 7002, 102, 2, pack_ip("10.0.0.2"))
    assert len(entries(table)) == 1  # a refused request leaves nothing behind


@pytest.mark.parametrize(("held", "requested"), list(product(range(6), range(6))),
                         ids=lambda m: modes.NAMES[m])
def test_compatibility_matrix(table: LockTable, held: int, requested: int) -> None:
    assert modes.compatible(requested, held) == (held in MAY_JOIN[requested])
    grant(table, A, mode=held)
    result = lock(table, B, mode=requested)
    if held in MAY_JOIN[requested]:
        assert isinstance(result, Grant)
        assert len(entries(table)) == 2
    else:
        assert result == Conflict(holder_of(A, held))
        assert len(entries(table)) == 1


def test_matrix_is_symmetric() -> None:
    for a, b in product(range(6), repeat=2):
        assert modes.compatible(a, b) == modes.compatible(b, a)


def test_several_readers_then_a_writer(table: LockTable) -> None:
    readers = [grant(table, o, mode=PR) for o in (A, B, C)]
    assert isinstance(lock(table, D, mode=EX), Conflict)
    for g in readers[:2]:
        table.unlock(g.handle)
    assert lock(table, D, mode=EX) == Conflict(holder_of(C, PR))
    table.unlock(readers[2].handle)
    grant(table, D, mode=EX)


# -- bad handles ----------------------------------------------------------------------------------------


def test_unlock_of_a_bad_handle(table: LockTable) -> None:
    g = grant(table, A)
    index = g.handle & ((1 << INDEX_BITS) - 1)
    bad = [
        0,
        1,
        index,  # ticket 0
        (g.handle >> INDEX_BITS) + 1 << INDEX_BITS | index,  # the next ticket
        g.handle + 1,  # a free slot
        (1 << INDEX_BITS) - 1,  # past the table
        table.geometry.locks,
        1 << 60,
        -1,
    ]
    for handle in bad:
        with pytest.raises(NotHeld, match=f"{handle:#x}"):
            table.unlock(handle)
    assert len(entries(table)) == 1
    table.unlock(g.handle)


def test_double_unlock(table: LockTable) -> None:
    g = grant(table, A)
    table.unlock(g.handle)
    with pytest.raises(NotHeld, match="holds no lock"):
        table.unlock(g.handle)


def test_stale_handle_does_not_free_the_slot_s_new_lock(table: LockTable) -> None:
    old = grant(table, A)
    table.unlock(old.handle)
    new = grant(table, B)
    assert new.handle & 0xFFFFFF == old.handle & 0xFFFFFF  # the same slot, a new ticket
    with pytest.raises(NotHeld):
        table.unlock(old.handle)
    assert lock(table, C) == Conflict(holder_of(B, EX))


def test_unlock_of_a_queued_request_is_not_held(table: LockTable, bells: MakeBell) -> None:
    grant(table, A)
    q = queue(table, B, bells())
    with pytest.raises(NotHeld):
        table.unlock(q.handle)
    assert table.cancel(q.handle)


def test_cancel_and_retry_of_a_handle_past_the_table(table: LockTable) -> None:
    """A handle naming no slot of the table is not queued: cancel says False, retry says NotHeld."""
    past = 5 << INDEX_BITS | ((1 << INDEX_BITS) - 1)
    assert table.cancel(past) is False
    with pytest.raises(NotHeld):
        table.retry(past)


# -- keys, values and groups --------------------------------------------------------------------------------


def test_keys_shorter_than_key_max_are_kept_verbatim(table: LockTable) -> None:
    key = bytes(range(256))[: KEY_MAX - 1]
    grant(table, A, key)
    [entry] = entries(table)
    assert entry.slot.key[: entry.slot.key_len] == key
    assert entry.slot.flags == 0
    assert stored_key(key) == (key, 0)


def test_a_key_of_exactly_key_max_bytes_is_digested(table: LockTable) -> None:
    key = bytes(range(256))[:KEY_MAX]
    stored, flags = stored_key(key)
    assert flags and stored != key and len(stored) == KEY_MAX


def test_long_keys_with_the_same_prefix_are_different_resources(table: LockTable) -> None:
    prefix = b"P" * 200
    k1, k2 = prefix + b"1", prefix + b"2"
    g1 = grant(table, A, k1)
    g2 = grant(table, B, k2)
    assert lock(table, C, k1) == Conflict(holder_of(A, EX))
    assert lock(table, C, k2) == Conflict(holder_of(B, EX))
    assert isinstance(lock(table, C, prefix), Grant)  # the common prefix is a resource of its own
    long_entries = [e for e in entries(table) if e.slot.flags & SlotFlag.LONG_KEY]
    assert len(long_entries) == 3
    for e in long_entries:
        assert e.slot.key_len == KEY_MAX
        assert e.slot.key.startswith(b"P" * (KEY_MAX - 16))
    assert table.status(A, INODE, DEVICE, k1) == (1, holder_of(A, EX))
    assert table.status(A, INODE, DEVICE, k2) == (2, holder_of(B, EX))
    table.unlock(g1.handle)
    assert table.status(A, INODE, DEVICE, k1) == (0, None)
    assert isinstance(lock(table, C, k1), Grant)
    table.unlock(g2.handle)


def test_a_key_of_key_max_bytes_is_not_a_long_key(table: LockTable) -> None:
    """A 120-byte key that happens to equal the stored form of a longer key is another resource."""
    long_key = b"L" * 300
    as_stored, flags = stored_key(long_key)
    assert (len(as_stored), flags) == (KEY_MAX, SlotFlag.LONG_KEY)
    grant(table, A, long_key)
    assert isinstance(lock(table, B, as_stored), Grant)


def test_different_inode_or_device_same_key_are_different(table: LockTable) -> None:
    table.lock(A, 1, 1, b"K", EX)
    for inode, device in [(2, 1), (1, 2), (0, 1), (1, -1)]:
        assert isinstance(table.lock(B, inode, device, b"K", EX), Grant), (inode, device)
    assert table.lock(B, 1, 1, b"K", EX) == Conflict(holder_of(A, EX))
    assert len(entries(table)) == 5


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((0, 0x9E3779B1, b"K"), (1, 0, b"K")),  # the same seed from another inode and device
        ((1, 0, b"K"), (1, 1 << 32, b"K")),  # devices that differ above 32 bits
        ((1, 0, b"CUST*9cb621629f"), (1, 0, b"CUST*2031900fe")),  # a CRC-32 collision
    ],
    ids=["inode-device", "device-high-bits", "crc-collision"],
)
def test_same_value_different_resources_are_told_apart(
    table: LockTable, first: tuple[int, int, bytes], second: tuple[int, int, bytes]
) -> None:
    assert resource_value(*first) == resource_value(*second)
    g1 = table.lock(A, *first, EX)
    g2 = table.lock(B, *second, EX)
    assert isinstance(g1, Grant) and isinstance(g2, Grant)
    assert g1.value == g2.value
    assert table.lock(C, *first, EX) == Conflict(holder_of(A, EX))
    assert table.lock(C, *second, EX) == Conflict(holder_of(B, EX))
    assert table.status(C, *first) == (2, holder_of(A, EX))
    table.unlock(g1.handle)
    assert table.status(C, *first) == (0, None)
    assert table.status(C, *second) == (2, holder_of(B, EX))
    g3 = table.lock(C, *first, EX)
    assert isinstance(g3, Grant)
    assert table.lock(D, *second, EX) == Conflict(holder_of(B, EX))


def test_same_value_waiters_are_told_apart(table: LockTable, bells: MakeBell) -> None:
    first, second = (0, 0x9E3779B1, b"K"), (1, 0, b"K")
    g1 = table.lock(A, *first, EX)
    g2 = table.lock(B, *second, EX)
    assert isinstance(g1, Grant) and isinstance(g2, Grant)
    bell1, bell2 = bells(), bells()
    q1 = table.lock(C, *first, EX, wait_token=bell1.token)
    q2 = table.lock(D, *second, EX, wait_token=bell2.token)
    assert isinstance(q1, Queued) and isinstance(q2, Queued)
    queued = {e.slot.thread: e.slot.queued for e in entries(table) if e.slot.state == SlotState.GRANTED}
    assert queued == {1: 1, 2: 1}
    table.unlock(g2.handle)
    assert rung(bell2)
    assert quiet(bell1)
    assert isinstance(table.retry(q2.handle), Grant)
    assert isinstance(table.retry(q1.handle), Queued)
    table.unlock(g1.handle)
    assert rung(bell1)
    assert isinstance(table.retry(q1.handle), Grant)


def _keys_in_group(table: LockTable, group: int, n: int) -> list[bytes]:
    keys = []
    for i in count():
        key = b"G%d" % i
        if resource_value(INODE, DEVICE, key) % table.geometry.ngroups == group:
            keys.append(key)
            if len(keys) == n:
                return keys
    raise AssertionError


def test_group_full(make_table: Callable[..., LockTable], bells: MakeBell) -> None:
    table = make_table(geometry_for(4, 2))
    assert table.geometry.ngroups == 2 and table.geometry.per_group == 2
    k1, k2, k3 = _keys_in_group(table, 1, 3)
    g1 = grant(table, A, k1)
    grant(table, A, k2)
    with pytest.raises(GroupFull, match=r"lock group 1 is full \(2 locks\): start the table larger"):
        lock(table, A, k3)
    # a waiting request needs a slot as well
    with pytest.raises(GroupFull, match="lock group 1 is full"):
        lock(table, B, k1, wait_token=bells().token)
    # the other group is not affected
    [other] = _keys_in_group(table, 0, 1)
    grant(table, A, other)
    table.unlock(g1.handle)
    grant(table, A, k3)
    assert issubclass(GroupFull, TableError)


# -- queued requests ---------------------------------------------------------------------------------------


def test_queued_then_granted_after_unlock(table: LockTable, bells: MakeBell) -> None:
    g = grant(table, A)
    bell = bells()
    q = queue(table, B, bell)
    assert q.holder == holder_of(A, EX)
    assert table.retry(q.handle) == q
    assert quiet(bell)
    waiting = [e for e in entries(table) if e.slot.state == SlotState.WAITING]
    assert [(e.slot.pid, e.slot.thread, e.slot.doorbell) for e in waiting] == [(B.pid, 2, bell.token)]
    table.unlock(g.handle)
    assert rung(bell)
    granted = table.retry(q.handle)
    assert granted == Grant(q.handle, EX, g.value, granted.token)
    assert granted.token > g.token, "a hand-off's fencing token is greater than its resource's earlier ones"
    [entry] = entries(table)
    assert (entry.slot.state, entry.slot.thread, entry.slot.doorbell) == (SlotState.GRANTED, 2, 0)
    table.unlock(granted.handle)
    assert entries(table) == []


def test_lock_without_a_token_is_not_queued(table: LockTable) -> None:
    grant(table, A)
    assert isinstance(lock(table, B), Conflict)
    assert isinstance(table.acquire(B, INODE, DEVICE, b"REC1", EX, timeout=0), Conflict)
    assert len(entries(table)) == 1


def test_fifo_an_exclusive_waiter_is_not_overtaken(table: LockTable, bells: MakeBell) -> None:
    reader = grant(table, A, mode=PR)
    w_bell, r_bell = bells(), bells()
    writer_q = queue(table, B, w_bell, mode=EX)
    # PR would be compatible with the held PR, but the earlier EX waiter goes first
    assert lock(table, C, mode=PR) == Conflict(holder_of(B, EX))
    reader_q = queue(table, C, r_bell, mode=PR)
    assert reader_q.holder == holder_of(B, EX)
    table.unlock(reader.handle)
    assert rung(w_bell)
    assert quiet(r_bell)  # the writer, just ahead of it, is its new holder: nothing new to watch
    still = table.retry(reader_q.handle)
    assert isinstance(still, Queued) and still.holder == holder_of(B, EX)
    writer = table.retry(writer_q.handle)
    assert isinstance(writer, Grant)
    table.unlock(writer.handle)
    assert rung(r_bell)
    assert isinstance(table.retry(reader_q.handle), Grant)


def test_two_readers_waiting_are_both_granted(table: LockTable, bells: MakeBell) -> None:
    writer = grant(table, A, mode=EX)
    b1, b2 = bells(), bells()
    q1 = queue(table, B, b1, mode=PR)
    q2 = queue(table, C, b2, mode=PR)
    assert q2.holder == holder_of(A, EX)
    table.unlock(writer.handle)
    assert rung(b1) and rung(b2)
    # in either order
    assert isinstance(table.retry(q2.handle), Grant)
    assert isinstance(table.retry(q1.handle), Grant)
    assert sorted(e.slot.thread for e in entries(table)) == [2, 3]


def test_cancel(table: LockTable, bells: MakeBell) -> None:
    g = grant(table, A)
    q = queue(table, B, bells())
    assert table.cancel(q.handle) is True
    assert table.cancel(q.handle) is False
    with pytest.raises(NotHeld, match="not a queued request"):
        table.retry(q.handle)
    [entry] = entries(table)
    assert entry.slot.queued == 0
    table.unlock(g.handle)


def test_a_freed_lock_is_handed_to_its_first_waiter_and_a_waiter_that_gives_up_gives_it_back(
    table: LockTable, bells: MakeBell,
) -> None:
    """Hand-off: whoever frees a lock grants it to the first waiter that can have it (FIFO), under the
    semaphore, and rings it; the waiter finds its slot granted. A waiter that gives up before it looked
    (``cancel``: a timeout, its client gone) gives the lock on, to the next."""
    g = grant(table, A)
    b_bell, c_bell = bells(), bells()
    b = queue(table, B, b_bell)
    c = queue(table, C, c_bell)
    table.unlock(g.handle)
    assert rung(b_bell) and quiet(c_bell)  # C watches B, just ahead of it, since it queued
    assert [(e.slot.thread, e.slot.state) for e in entries(table)] == [
        (B.thread, SlotState.GRANTED), (C.thread, SlotState.WAITING)]
    assert table.cancel(b.handle) is True  # B gave up without looking: the lock goes on to C
    assert rung(c_bell)
    granted = table.retry(c.handle)
    assert isinstance(granted, Grant) and granted.handle == c.handle
    assert lock(table, D) == Conflict(holder_of(C, EX))
    assert table.cancel(b.handle) is False
    table.unlock(c.handle)
    assert entries(table) == []


def test_cancel_lets_later_waiters_in(table: LockTable, bells: MakeBell) -> None:
    grant(table, A, mode=PR)
    w_bell, r_bell = bells(), bells()
    writer_q = queue(table, B, w_bell, mode=EX)
    reader_q = queue(table, C, r_bell, mode=PR)
    assert table.cancel(writer_q.handle)
    assert rung(r_bell)
    assert isinstance(table.retry(reader_q.handle), Grant)


def test_queued_count_in_the_holder_s_slot(table: LockTable, bells: MakeBell) -> None:
    g = grant(table, A)

    def holder_queued() -> int:
        [slot] = [e.slot for e in entries(table) if e.slot.state == SlotState.GRANTED]
        return int(slot.queued)

    assert holder_queued() == 0
    handles = [queue(table, o, bells()).handle for o in (B, C, D)]
    assert holder_queued() == 3
    assert sum(e.slot.state == SlotState.WAITING for e in entries(table)) == 3
    table.cancel(handles[1])
    assert holder_queued() == 2
    table.unlock(g.handle)
    assert isinstance(table.retry(handles[0]), Grant)
    assert holder_queued() == 1


def test_conversion_down_lets_waiters_in(table: LockTable, bells: MakeBell) -> None:
    grant(table, A, mode=EX)
    bell = bells()
    q = queue(table, B, bell, mode=PR)
    g = grant(table, A, mode=PR)
    assert g.mode == PR
    assert rung(bell)
    assert isinstance(table.retry(q.handle), Grant)


def test_conversion_up_waits_for_the_other_holders(table: LockTable, bells: MakeBell) -> None:
    mine = grant(table, A, mode=PR)
    theirs = grant(table, B, mode=PR)
    assert lock(table, A, mode=EX) == Conflict(holder_of(B, PR))
    bell = bells()
    q = queue(table, A, bell, mode=EX)
    table.unlock(theirs.handle)
    assert rung(bell)
    converted = table.retry(q.handle)
    assert converted == Grant(mine.handle, EX, mine.value, converted.token)  # the held lock takes the new mode
    assert converted.token > max(mine.token, theirs.token), "a conversion up takes a new fencing token"
    [entry] = entries(table)
    assert entry.slot.mode == EX
    table.unlock(mine.handle)
    assert entries(table) == []


# -- sweeping ---------------------------------------------------------------------------------------------------


def test_release_owner(table: LockTable, bells: MakeBell) -> None:
    a2 = A._replace(thread=9)
    grant(table, A, b"K1")
    grant(table, A, b"K2")
    grant(table, a2, b"K3")
    grant(table, B, b"K4")
    bell = bells()
    q = queue(table, B, bell, b"K1")
    queue(table, A, bells(), b"K4")  # A also waits for K4
    assert table.release_owner(A.pid, thread=1) == 3  # K1, K2 and the waiting request
    assert rung(bell)
    assert isinstance(table.retry(q.handle), Grant)
    assert sorted((e.slot.thread, e.slot.key[: e.slot.key_len]) for e in entries(table)) == [
        (2, b"K1"), (2, b"K4"), (9, b"K3")]
    assert table.release_owner(A.pid) == 3  # this pid is also B's: everything
    assert entries(table) == []
    assert table.release_owner(A.pid) == 0


def test_tidy_frees_the_locks_of_gone_owners(table: LockTable, bells: MakeBell) -> None:
    parent = owner(5, pid=os.getppid())
    before = time.time()
    grant(table, parent, b"K1")
    grant(table, parent, b"K2")
    grant(table, A, b"K3")
    bell = bells()
    q = queue(table, A, bell, b"K1")
    asked: list[tuple[int, float]] = []

    def gone(pid: int, since: float) -> bool:
        asked.append((pid, since))
        return pid == parent.pid

    assert table.tidy(gone) == (2, 0)
    assert sorted(pid for pid, _ in asked) == sorted([parent.pid, parent.pid, A.pid, A.pid])
    assert all(before <= since <= time.time() for _, since in asked)
    assert rung(bell)
    assert isinstance(table.retry(q.handle), Grant)
    header = table.header()
    assert header.tidy_ops == 2
    assert before <= header.last_tidy <= time.time()
    assert table.tidy(lambda pid, since: False) == (0, 0)
    assert table.header().tidy_ops == 2
    assert len(entries(table)) == 2


def test_tidy_keeps_the_locks_of_live_owners(table: LockTable) -> None:
    grant(table, A)
    grant(table, owner(5, pid=os.getppid()), b"other")
    assert table.tidy() == (0, 0)
    assert len(entries(table)) == 2


# -- status ------------------------------------------------------------------------------------------------------


def test_status(table: LockTable, bells: MakeBell) -> None:
    assert table.status(A, INODE, DEVICE, b"REC1") == (0, None)
    g = grant(table, A, mode=PR)
    assert table.status(A, INODE, DEVICE, b"REC1") == (1, holder_of(A, PR))
    assert table.status(B, INODE, DEVICE, b"REC1") == (2, holder_of(A, PR))
    assert table.status(B, INODE, DEVICE, b"REC2") == (0, None)
    assert table.status(B, INODE + 1, DEVICE, b"REC1") == (0, None)
    grant(table, B, mode=PR)
    assert table.status(B, INODE, DEVICE, b"REC1") == (1, holder_of(B, PR))
    assert table.status(C, INODE, DEVICE, b"REC1")[0] == 2
    # a waiting request is not a holder
    queue(table, C, bells(), mode=EX)
    assert table.status(C, INODE, DEVICE, b"REC1")[0] == 2
    table.unlock(g.handle)
    assert table.status(A, INODE, DEVICE, b"REC1") == (2, holder_of(B, PR))


# -- creating and attaching --------------------------------------------------------------------------------------


def test_header_of_a_new_table(make_table: Callable[..., LockTable]) -> None:
    before = time.time()
    table = make_table(geometry_for(13000, 50), flags=TableFlag.TIMESTAMPS, tidy_period=60)
    h = table.header()
    assert h.magic == MAGIC
    assert (h.ngroups, h.per_group, h.slot_size, h.key_max) == (263, 50, SLOT_SIZE, KEY_MAX)
    assert h.total_size == geometry_for(13000, 50).total_size
    assert h.flags == TableFlag.TIMESTAMPS
    assert h.tidy_period == 60
    assert h.semid == table.semaphore_ids[0]
    assert before <= h.created <= time.time()
    assert (h.lock_retries, h.tidy_ops, h.monitor_pid, h.listener_pid) == (0, 0, 0, 0)
    assert 1 <= h.semaphores <= min(h.ngroups, 128)
    assert table.geometry == geometry_for(13000, 50)
    shm = sysv_ipc.SharedMemory(table.key)
    try:
        assert shm.size >= h.total_size
    finally:
        shm.detach()


def test_attached_counts_attachments_and_keeps_none(table: LockTable) -> None:
    """``attached`` says how many processes map the table; asking must not map it once more."""
    assert table.attached == 1
    assert table.attached == 1
    other = LockTable.attach(table.key)
    assert table.attached == 2
    other.close()
    assert table.attached == 1


def test_set_header(table: LockTable) -> None:
    table.set_header(monitor_pid=1234, listener_pid=5678, last_ran=12.5)
    h = table.header()
    assert (h.monitor_pid, h.listener_pid, h.last_ran) == (1234, 5678, 12.5)


def test_create_twice_attaches_the_first(table: LockTable) -> None:
    g = grant(table, A)
    again, created = LockTable.create(table.key, geometry_for(13000, 50))
    try:
        assert created is False
        assert again.geometry == table.geometry == geometry_for(1000, 10)
        assert again.shm_id == table.shm_id
        assert again.semaphore_ids == table.semaphore_ids
        assert lock(again, B) == Conflict(holder_of(A, EX))
        again.unlock(g.handle)
        assert entries(table) == []
    finally:
        again.close()


def test_attach(table: LockTable) -> None:
    grant(table, A)
    other = LockTable.attach(table.key)
    try:
        assert other.geometry == table.geometry
        assert [e.slot.thread for e in other.scan()] == [1]
        assert LockTable.exists(table.key)
    finally:
        other.close()


def test_attach_to_a_missing_key(tmp_path: Any) -> None:
    key = ipc_key_for(tmp_path / "nothing here")
    assert not LockTable.exists(key)
    with pytest.raises(TableMissing, match=f"no lock table with key 0x{key:08x}"):
        LockTable.attach(key)


def test_a_removed_table_is_missing(table: LockTable) -> None:
    other = LockTable.attach(table.key)
    try:
        table.remove()
        assert not LockTable.exists(table.key)
        with pytest.raises(TableMissing, match="was removed"):
            other.lock(A, INODE, DEVICE, b"K", EX)
    finally:
        other.close()


def test_a_table_removed_during_a_request_gives_no_grant_and_no_traceback(
    table: LockTable, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by the one-mechanism race: sysv_ipc's ExistentialError escaped LocalClient's release. A lock
    written into a table removed meanwhile must not be granted; an unlock there is TableMissing too."""
    held = grant(table, owner(1))
    semop = dls_shm.table._semop

    def removed_while_held(semid: int, address: int, count: int) -> int:
        if address in table._give_of:  # taken, then removed (jdls -K -o) before it is given back
            table._sem.remove()
        return int(semop(semid, address, count))

    monkeypatch.setattr(dls_shm.table, "_semop", removed_while_held)
    with pytest.raises(TableMissing, match="was removed"):
        table.lock(owner(2), 99, -1, b"OTHER", EX)
    with pytest.raises(TableMissing, match="was removed"):
        table.unlock(held.handle)


def test_an_exception_as_a_take_returns_gives_the_semaphore_back(
    table: LockTable, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C (an exception from a signal handler) as a semop that took a group's semaphore returns, before
    the caller knew it had: given back, or this process's next request would wait for it forever, and every
    other process until this one exits (audit of issue 13). Fast path and slow path."""
    group = resource_value(INODE, DEVICE, b"K") % table.geometry.ngroups
    member = table._sems.member_of(group)
    semop = dls_shm.table._semop

    def interrupted(semid: int, address: int, count: int) -> int:
        done = int(semop(semid, address, count))
        if address in table._take_of:
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(dls_shm.table, "_semop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        table.lock(A, INODE, DEVICE, b"K", EX)
    assert table._sems.value(1 + member) == 1
    monkeypatch.setattr(dls_shm.table, "_semop", semop)
    take = Semaphores.take

    def interrupted_slow(sems: Semaphores, address: int) -> None:
        take(sems, address)
        raise KeyboardInterrupt

    monkeypatch.setattr(Semaphores, "take", interrupted_slow)
    with pytest.raises(KeyboardInterrupt):
        table.status(A, INODE, DEVICE, b"K")
    assert table._sems.value(1 + member) == 1
    monkeypatch.setattr(Semaphores, "take", take)
    granted = grant(table, A, b"K")
    table.unlock(granted.handle)

"""Issue 15 (M3): whom a ring is for, among the queued requests of one doorbell (``LockTable.rung``), and a
grant is never read from a torn slot (``LockTable.retry``).

A lock server waits for all of its client's requests on one doorbell. It used to look at every one of them at
each ring, each look a scan of the resource's slots: N waiters of one record cost N scans of N slots a
hand-off. ``rung`` names those a ring may be for: the granted (or refused, or gone), the first waiting of
them in each resource's queue, and any that nothing blocks (free to convert a lock its owner holds), read
under the group's semaphore; the rest wait on as they were.

Owners are threads of this process, as in test_table.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import dls_shm.table
import pytest
from dls_shm import Doorbell, Grant, LockTable, NotHeld, Owner, Queued, SlotState, geometry_for, pack_ip
from dls_shm.table import INDEX_BITS

NL, CR, CW, PR, PW, EX = range(6)
INODE, DEVICE = 1234, 56


def owner(thread: int) -> Owner:
    return Owner(os.getpid(), thread, 7000 + thread, 100 + thread, pack_ip(f"10.0.{thread // 256}.{thread % 256}"))


def take(table: LockTable, thread: int, mode: int, bell: Doorbell | None = None, key: bytes = b"HOT") -> Any:
    return table.lock(owner(thread), INODE, DEVICE, key, mode, wait_token=bell.token if bell else 0)


@pytest.fixture
def table(make_table: Callable[..., LockTable]) -> LockTable:
    """One big group, as a busy record's: every lock of these tests in it."""
    return make_table(geometry_for(1000, 1000))


@pytest.fixture
def bell() -> Any:
    """The one doorbell of all the waiters (a lock server's)."""
    made = Doorbell()
    yield made
    made.close()


def queued(table: LockTable, thread: int, mode: int, bell: Doorbell, key: bytes = b"HOT") -> int:
    result = take(table, thread, mode, bell, key)
    assert isinstance(result, Queued), result
    return result.handle


def test_of_many_waiters_of_one_record_only_the_first_is_looked_at(table: LockTable, bell: Doorbell) -> None:
    held = take(table, 1000, EX)
    assert isinstance(held, Grant)
    waiters = [queued(table, thread, EX, bell) for thread in range(1, 301)]
    assert table.rung(waiters) == {waiters[0]}
    table.unlock(held.handle)  # handed to the first: it, and the new first waiting, are looked at
    assert isinstance(table.retry(waiters[0]), Grant)
    assert table.rung(waiters) == {waiters[0], waiters[1]}
    assert table.rung(waiters[1:]) == {waiters[1]}


def test_each_record_has_its_first(table: LockTable, bell: Doorbell) -> None:
    for key in (b"ONE", b"TWO"):
        take(table, 1000, EX, key=key)
    one = [queued(table, thread, EX, bell, b"ONE") for thread in range(1, 5)]
    two = [queued(table, thread, EX, bell, b"TWO") for thread in range(5, 9)]
    assert table.rung(one + two) == {one[0], two[0]}


def test_a_later_waiter_granted_past_a_blocked_one_is_looked_at(table: LockTable, bell: Doorbell) -> None:
    held = take(table, 1000, EX)
    blocked = queued(table, 1, PW, bell)
    later = queued(table, 2, CR, bell)
    after = queued(table, 3, EX, bell)
    converted = table.convert(held.handle, PR)  # down: CR goes with PR and with the PW waiting, PW does not
    assert isinstance(converted, Grant)
    assert table.rung([blocked, later, after]) == {blocked, later}
    assert isinstance(table.retry(later), Grant)
    assert isinstance(table.retry(blocked), Queued)


def test_a_request_free_to_convert_behind_a_blocked_one_is_looked_at(table: LockTable, bell: Doorbell) -> None:
    """An owner with two requests queued for one record: when the first is granted, the second converts
    that lock (rung, left WAITING), though a waiter ahead of both stays blocked: it is looked at."""
    take(table, 1000, PR)
    first = queued(table, 3, EX, bell)  # ahead of every other: when it goes, the rest move
    blocked = queued(table, 1, CW, bell)  # CW does not go with the PR held
    mine = queued(table, 2, CR, bell)  # CR goes with PR and CW: behind the EX only
    again = queued(table, 2, CR, bell)  # the same owner's second request
    assert table.cancel(first)
    assert table.rung([blocked, mine, again]) == {blocked, mine, again}
    assert isinstance(table.retry(mine), Grant)
    assert isinstance(table.retry(again), Grant)  # the conversion: the lock it holds, in CR
    assert isinstance(table.retry(blocked), Queued)


def test_requests_gone_or_refused_are_looked_at(table: LockTable, bell: Doorbell) -> None:
    take(table, 1000, EX)
    waiters = [queued(table, thread, EX, bell) for thread in range(1, 4)]
    table.release_owner(os.getpid(), 3)  # the last one's request freed under it
    assert table.rung(waiters) == {waiters[0], waiters[2]}
    with pytest.raises(NotHeld):
        table.retry(waiters[2])


def test_a_torn_read_of_a_freed_slot_is_never_a_grant(table: LockTable, bell: Doorbell,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiting slot freed under its waiter (another thread's release_all) and taken at once by another
    lock: read without the semaphore while that lock is being written, its head can show the old ticket
    (bytes not yet rewritten) with the new GRANTED state. That must not read as this request's grant."""
    take(table, 1000, EX)
    waiter = queued(table, 1, EX, bell)
    table.release_owner(os.getpid(), 1)
    reused = take(table, 2, EX, key=b"OTHER")  # the freed slot, first free in the group, taken again
    assert isinstance(reused, Grant) and reused.handle & ~(-1 << INDEX_BITS) == waiter & ~(-1 << INDEX_BITS)
    torn = (waiter >> INDEX_BITS, SlotState.GRANTED, EX, 0, 5, 0)  # the old ticket, the new state
    real = dls_shm.table.SLOT_HEAD
    monkeypatch.setattr(dls_shm.table, "SLOT_HEAD", types.SimpleNamespace(
        size=real.size, unpack_from=lambda buffer, offset=0: torn))
    with pytest.raises(NotHeld):
        table.retry(waiter)

"""Deadlocks in the lock table: cycles of waiting processes, across resources and through conversions,
refused one request each (``LockTable.break_deadlocks``: the request that joined the cycle last), while the
rest of the cycle goes on. Forked processes on a real table; the graph's search alone on made-up slots.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from dls_shm import LOCAL_IP, Deadlock, Grant, LockTable, Owner, Slot, SlotFlag, SlotState, deadlocks
from dls_testkit import wait_for

NL, CR, CW, PR, PW, EX = range(6)
INODE, DEVICE = 91, 4


def me() -> Owner:
    return Owner(os.getpid(), 1, 0, os.getpid(), LOCAL_IP)


def waiting_slots(table: LockTable) -> list[Any]:
    return [e for e in table.scan() if e.slot.state == SlotState.WAITING]


def cycle_member(table: LockTable, first: bytes, second: bytes, pipes: tuple[Any, Any, Any], mode: int = EX) -> int:
    """Child body: hold ``first``, say so (``ready``), wait for the word (``go``), then ask for ``second`` and
    wait for it. Exit 0 when granted (releasing both), 7 when refused as a deadlock's victim (releasing
    ``first``); ``done`` says which."""
    ready, go, done = pipes
    held = table.lock(me(), INODE, DEVICE, first, mode)
    assert isinstance(held, Grant)
    ready.send()
    go.recv(timeout=30)
    try:
        got = table.acquire(me(), INODE, DEVICE, second, mode, timeout=30)
    except Deadlock:
        done.send(b"D")
        table.unlock(held.handle)
        return 7
    assert isinstance(got, Grant)
    done.send(b"G")
    table.unlock(got.handle)
    table.unlock(held.handle)
    return 0


@pytest.mark.parametrize("size", [2, 3])
def test_a_cycle_across_processes_and_resources_refuses_one_the_newest(
    table: LockTable, children: Any, pipes: Any, size: int,
) -> None:
    keys = [f"DEADLOCK*{n}".encode() for n in range(size)]
    members = []
    for n in range(size):
        ready, go, done = pipes(), pipes(), pipes()
        pid = children.fork(lambda n=n, p=(ready, go, done): cycle_member(table, keys[n], keys[(n + 1) % size], p))
        ready.recv(timeout=10)
        members.append((pid, go, done))
    for n, (_, go, _) in enumerate(members):  # they join the cycle in order: the last one closes it
        go.send()
        wait_for(lambda n=n: len(waiting_slots(table)) == n + 1, 10, f"{n + 1} requests waiting")
        time.sleep(0.01)  # queued at distinct moments
    refused = table.break_deadlocks()
    assert [e.slot.pid for e in refused] == [members[-1][0]]
    outcomes = [done.recv(timeout=10) for _, _, done in members]
    assert outcomes == [b"G"] * (size - 1) + [b"D"], "one victim, the request that closed the cycle"
    assert [children.wait(pid) for pid, _, _ in members] == [0] * (size - 1) + [7]
    assert table.break_deadlocks() == []
    assert list(table.scan()) == []


def test_two_readers_converting_up_refuse_the_later_conversion_which_keeps_its_lock(
    table: LockTable, children: Any, pipes: Any,
) -> None:
    key = b"CONVERT*1"

    def reader(ready: Any, go: Any, done: Any) -> int:
        held = table.lock(me(), INODE, DEVICE, key, PR)
        assert isinstance(held, Grant)
        ready.send()
        go.recv(timeout=30)
        try:
            up = table.change(held.handle, EX, timeout=30)
        except Deadlock:
            mode = next(e.slot.mode for e in table.scan() if e.slot.pid == os.getpid())
            done.send(b"D" + bytes([mode]))  # still held, in its old mode
            go.recv(timeout=30)
            table.unlock(held.handle)
            return 7
        assert isinstance(up, Grant) and up.handle == held.handle and up.token > held.token
        done.send(b"G" + bytes([up.mode]))
        table.unlock(held.handle)
        return 0

    (a_ready, a_go, a_done), (b_ready, b_go, b_done) = (pipes(), pipes(), pipes()), (pipes(), pipes(), pipes())
    a = children.fork(lambda: reader(a_ready, a_go, a_done))
    a_ready.recv(timeout=10)
    b = children.fork(lambda: reader(b_ready, b_go, b_done))
    b_ready.recv(timeout=10)
    a_go.send()
    wait_for(lambda: len(waiting_slots(table)) == 1, 10, "the first conversion to wait")
    time.sleep(0.01)
    b_go.send()
    wait_for(lambda: len(waiting_slots(table)) == 2, 10, "the second conversion to wait")
    assert all(e.slot.flags & SlotFlag.CONVERTING for e in waiting_slots(table))
    refused = table.break_deadlocks()
    assert [e.slot.pid for e in refused] == [b]
    assert b_done.recv(2, timeout=10) == b"D" + bytes([PR])
    assert [e.slot.pid for e in waiting_slots(table)] == [a], "the first conversion waits for the victim's PR"
    b_go.send()  # the victim lets its PR go: the other conversion is granted
    assert a_done.recv(2, timeout=10) == b"G" + bytes([EX])
    assert (children.wait(a), children.wait(b)) == (0, 7)


def test_no_cycle_no_victim(table: LockTable, children: Any, pipes: Any) -> None:
    """A long chain of waiters (each behind the next one's lock), but no cycle: nothing is refused."""
    held = table.lock(me(), INODE, DEVICE, b"CHAIN*0", EX)
    assert isinstance(held, Grant)
    members = []
    for n in range(3):
        ready, go, done = pipes(), pipes(), pipes()
        pid = children.fork(lambda n=n, p=(ready, go, done): cycle_member(
            table, f"CHAIN*{n + 1}".encode(), f"CHAIN*{n}".encode(), p))
        ready.recv(timeout=10)
        go.send()
        members.append((pid, done))
    wait_for(lambda: len(waiting_slots(table)) == 3, 10, "three requests waiting")
    assert table.break_deadlocks() == []
    table.unlock(held.handle)
    assert [done.recv(timeout=10) for _, done in members] == [b"G"] * 3
    assert [children.wait(pid) for pid, _ in members] == [0] * 3


def slot(pid: int, state: int, mode: int, ticket: int, key: bytes, *, flags: int = 0, at: float = 0.0) -> Slot:
    return Slot(ticket, state, mode, flags, len(key), 0, pid, 0, pid, LOCAL_IP, 1, INODE, DEVICE, at, 0,
                key.ljust(120, b"\0"), 0, 0, bytes(64))


def owner_of(s: Slot) -> tuple[int, int]:
    return s.pid, s.thread


def test_the_search_finds_each_cycle_once_and_the_victim_is_the_newest() -> None:
    g, w = SlotState.GRANTED, SlotState.WAITING
    entries = [
        # Two separate cycles: 1 <-> 2 on A/B, and 3 -> 4 -> 5 -> 3 on C/D/E; 6 waits behind 1 (no cycle).
        (0, 0, 10, slot(1, g, EX, 1, b"A")), (1, 0, 10, slot(2, w, EX, 5, b"A", at=5)),
        (2, 0, 11, slot(2, g, EX, 2, b"B")), (3, 0, 11, slot(1, w, EX, 6, b"B", at=6)),
        (4, 0, 11, slot(6, w, PR, 7, b"B", at=7)),
        (5, 1, 20, slot(3, g, PW, 1, b"C")), (6, 1, 20, slot(5, w, PR, 9, b"C", at=9)),
        (7, 1, 21, slot(4, g, EX, 2, b"D")), (8, 1, 21, slot(3, w, CW, 8, b"D", at=8)),
        (9, 1, 22, slot(5, g, CR, 3, b"E")), (10, 1, 22, slot(4, w, EX, 4, b"E", at=4)),
    ]
    found = deadlocks.cycles(deadlocks.wait_for(entries, owner_of))
    assert sorted(sorted(w.slot.pid for w in c.waiters) for c in found) == [[1, 2], [3, 4, 5]]
    assert sorted(c.victim.slot.pid for c in found) == [1, 5]  # queued at 6 and at 9: the newest of each


def test_the_search_on_a_conversion_deadlock_and_compatible_waiters() -> None:
    g, w = SlotState.GRANTED, SlotState.WAITING
    conv = int(SlotFlag.CONVERTING)
    entries = [
        (0, 0, 10, slot(1, g, PR, 1, b"A")), (1, 0, 10, slot(2, g, PR, 2, b"A")),
        (2, 0, 10, slot(1, w, EX, 3, b"A", flags=conv, at=3)), (3, 0, 10, slot(2, w, EX, 4, b"A", flags=conv, at=4)),
        (4, 0, 10, slot(7, w, CR, 5, b"A", at=5)),  # CR goes with both PR locks: behind nobody it cannot go with
    ]
    found = deadlocks.cycles(deadlocks.wait_for(entries, owner_of))
    assert [c.victim.slot.pid for c in found] == [2]
    readers = [(0, 0, 10, slot(1, g, PR, 1, b"A")), (1, 0, 10, slot(2, w, PR, 2, b"A"))]
    assert deadlocks.cycles(deadlocks.wait_for(readers, owner_of)) == []


def test_the_detector_copies_nothing_until_a_wait_begins_or_a_lock_converts_up(
    table: LockTable, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A look copies the groups only when the header's ``waits_begun`` moved since the last look that confirmed
    what it found: a table of a million locks is not copied four times a second for nothing."""
    copies: list[int] = []
    real = table._copies

    def counted() -> Any:
        copies.append(1)
        return real()

    monkeypatch.setattr(table, "_copies", counted)
    assert table.break_deadlocks() == [] and len(copies) == 1  # the first look
    held = table.lock(me(), INODE, DEVICE, b"EPOCH", PR)
    assert isinstance(held, Grant)
    assert table.break_deadlocks() == [] and len(copies) == 1, "a lock granted at once waits for nobody"
    begun = table.header().waits_begun
    table.convert(held.handle, CR)  # down: nobody newly in its way
    assert table.header().waits_begun == begun
    table.convert(held.handle, EX)  # up: it may now be in the way of requests that wait
    assert table.header().waits_begun == begun + 1
    assert table.break_deadlocks() == [] and len(copies) == 2
    assert table.break_deadlocks(always=True) == [] and len(copies) == 3
    table.unlock(held.handle)


def test_a_request_of_a_client_that_does_not_know_deadlock_is_refused_only_when_all_are() -> None:
    g, w = SlotState.GRANTED, SlotState.WAITING
    legacy = int(SlotFlag.LEGACY)

    def cycle(newest_flags: int, older_flags: int) -> int:
        entries = [
            (0, 0, 10, slot(1, g, EX, 1, b"A")), (1, 0, 10, slot(2, w, EX, 5, b"A", at=5, flags=newest_flags)),
            (2, 0, 11, slot(2, g, EX, 2, b"B")), (3, 0, 11, slot(1, w, EX, 4, b"B", at=4, flags=older_flags)),
        ]
        found = deadlocks.cycles(deadlocks.wait_for(entries, owner_of))
        assert len(found) == 1
        return found[0].victim.slot.pid

    assert cycle(0, 0) == 2  # the newest
    assert cycle(legacy, 0) == 1  # the newest does not know DEADLOCK: the other is refused
    assert cycle(legacy, legacy) == 2  # none does: the newest all the same (a cycle never ends by itself)


def test_the_wait_for_graph_and_the_tickets_issued_as_the_status_page_reads_them(
    table: LockTable, children: Any, pipes: Any,
) -> None:
    """Issue 15: ``wait_for`` draws a chain of waiters from ``waiting_entries`` (only the groups with a waiter)
    by the detector's own rule, and ``tickets_issued`` less ``waits_begun`` counts each grant once: one granted
    at once, and one granted after a wait."""
    assert table.tickets_issued() == 0 and table.wait_for(table.waiting_entries()) == []
    held = table.lock(me(), INODE, DEVICE, b"CHAIN*0", EX)
    assert isinstance(held, Grant)
    ready, go, done = pipes(), pipes(), pipes()
    pid = children.fork(lambda: cycle_member(table, b"CHAIN*1", b"CHAIN*0", (ready, go, done)))
    ready.recv(timeout=10)
    go.send()
    wait_for(lambda: len(waiting_slots(table)) == 1, 10, "the child's request waiting")
    entries = table.waiting_entries()
    assert {e.slot.key.rstrip(b"\0") for e in entries} >= {b"CHAIN*0"}
    [(waiter, owners)] = table.wait_for(entries)
    assert waiter.owner == (pid, 1) and owners == {table.owner_of(held_slot(table, b"CHAIN*0"))}
    assert table.tickets_issued() - table.header().waits_begun == 2  # my lock and the child's first
    table.unlock(held.handle)
    assert done.recv(timeout=10) == b"G"
    assert children.wait(pid) == 0
    assert table.tickets_issued() - table.header().waits_begun == 3  # and the child's grant after its wait


def held_slot(table: LockTable, key: bytes) -> Slot:
    return next(e.slot for e in table.scan() if e.slot.key.rstrip(b"\0") == key and e.slot.state == SlotState.GRANTED)


def test_the_tickets_issued_never_go_backwards_while_a_group_counts(table: LockTable, children: Any) -> None:
    """A writer moves group 0's counter (under its semaphore, as a grant does) by steps that change all of its
    bytes at once; ``tickets_issued`` read meanwhile never goes backwards (a reader without the semaphore could see
    a word half written: /metrics' counter would seem reset)."""
    from dls_shm import table as table_module

    step, rounds = 0x0101010101010101 >> 8, 20_000
    offset = table_module.HEADER_SIZE

    def writer() -> int:
        for n in range(1, rounds + 1):
            with table._groups_held(range(1)):
                table_module._TICKET.pack_into(table._mv, offset, n * step)
        return 0

    pid = children.fork(writer)
    last, deadline = 0, time.monotonic() + 20
    while last < rounds * step and time.monotonic() < deadline:
        now = table.tickets_issued()
        assert now >= last, f"{now:#x} after {last:#x}"
        last = now
    assert children.wait(pid) == 0
    assert table.tickets_issued() == rounds * step

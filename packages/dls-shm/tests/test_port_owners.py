"""Port-based owners (``jdls -P``): with TableFlag.PORT_OWNERS a lock belongs to (port, thread).

Without the flag two processes are two owners even on one port; with it, requests of one port and thread
are one owner whatever process sends them (a client's new lock server after a reconnection, say), and two
ports are two owners even in one process. The pids used are this process and its parent: alive, so the
table never takes their locks for a dead owner's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dls_shm import Conflict, Doorbell, Grant, LockTable, Owner, Queued, SlotState, TableFlag, pack_ip

NL, CR, CW, PR, PW, EX = range(6)
INODE, DEVICE = 4321, 9
ME, PARENT = os.getpid(), os.getppid()


def owner(pid: int, port: int, thread: int = 1) -> Owner:
    return Owner(pid, thread, port, 500 + port, pack_ip("10.1.1.1"))


def lock(table: LockTable, o: Owner, mode: int = EX, key: bytes = b"REC", **kw: Any) -> Any:
    return table.lock(o, INODE, DEVICE, key, mode, **kw)


@pytest.fixture
def port_table(make_table: Callable[..., LockTable]) -> LockTable:
    return make_table(flags=int(TableFlag.PORT_OWNERS))


@pytest.fixture
def bell() -> Iterator[Doorbell]:
    made = Doorbell()
    yield made
    made.close()


def test_the_flag_is_read_from_the_header(port_table: LockTable, table: LockTable) -> None:
    assert port_table.port_owners and not table.port_owners
    again = LockTable.attach(port_table.key)
    try:
        assert again.port_owners
    finally:
        again.close()


def test_without_the_flag_one_port_in_two_processes_is_two_owners(table: LockTable) -> None:
    first = lock(table, owner(ME, 4))
    assert isinstance(first, Grant)
    refused = lock(table, owner(PARENT, 4))
    assert isinstance(refused, Conflict) and refused.holder.pid == ME
    assert table.status(owner(PARENT, 4), INODE, DEVICE, b"REC")[0] == 2


def test_with_the_flag_one_port_in_two_processes_is_one_owner(port_table: LockTable) -> None:
    first = lock(port_table, owner(ME, 4))
    assert isinstance(first, Grant)
    again = lock(port_table, owner(PARENT, 4), PR)  # re-entrant: a conversion down, the same slot
    assert isinstance(again, Grant) and again.handle == first.handle and again.mode == PR
    [entry] = port_table.scan()
    assert (entry.slot.pid, entry.slot.port, entry.slot.mode) == (ME, 4, PR)
    assert port_table.status(owner(PARENT, 4), INODE, DEVICE, b"REC")[0] == 1
    port_table.unlock(again.handle)
    assert list(port_table.scan()) == []


def test_with_the_flag_two_ports_in_one_process_are_two_owners(port_table: LockTable) -> None:
    assert isinstance(lock(port_table, owner(ME, 4)), Grant)
    refused = lock(port_table, owner(ME, 5))
    assert isinstance(refused, Conflict) and refused.holder.port == 4
    assert port_table.status(owner(ME, 5), INODE, DEVICE, b"REC")[0] == 2


def test_with_the_flag_the_thread_still_counts(port_table: LockTable) -> None:
    assert isinstance(lock(port_table, owner(ME, 4, thread=1)), Grant)
    refused = lock(port_table, owner(PARENT, 4, thread=2))
    assert isinstance(refused, Conflict) and refused.holder.thread == 1


def test_with_the_flag_compatible_modes_of_two_ports_share(port_table: LockTable) -> None:
    assert isinstance(lock(port_table, owner(ME, 4), PR), Grant)
    assert isinstance(lock(port_table, owner(ME, 5), PR), Grant)
    assert len(list(port_table.scan())) == 2


def test_with_the_flag_a_queued_request_joins_its_port_s_lock(port_table: LockTable, bell: Doorbell) -> None:
    """The retry path: a request of port 8 queued behind port 7 becomes a conversion of the lock that port 8
    already holds through another process, once port 7 lets go."""
    other = lock(port_table, owner(ME, 7), PR)
    mine = lock(port_table, owner(PARENT, 8), PR)
    assert isinstance(other, Grant) and isinstance(mine, Grant)
    queued = lock(port_table, owner(ME, 8), EX, wait_token=bell.token)
    assert isinstance(queued, Queued) and queued.holder.port == 7
    assert port_table.retry(queued.handle) == queued
    port_table.unlock(other.handle)
    assert bell.wait(1.0)
    granted = port_table.retry(queued.handle)
    assert granted == Grant(mine.handle, EX, mine.value, granted.token)  # the held lock took the new mode
    [entry] = port_table.scan()
    assert (entry.slot.state, entry.slot.mode, entry.slot.pid, entry.slot.port) == (SlotState.GRANTED, EX, PARENT, 8)


def test_without_the_flag_that_request_waits_on_its_own_port(table: LockTable, bell: Doorbell) -> None:
    other = lock(table, owner(ME, 7), PR)
    assert isinstance(lock(table, owner(PARENT, 8), PR), Grant)
    queued = lock(table, owner(ME, 8), EX, wait_token=bell.token)
    assert isinstance(queued, Queued)
    table.unlock(other.handle)
    still = table.retry(queued.handle)
    assert isinstance(still, Queued) and (still.holder.pid, still.holder.port) == (PARENT, 8)
    table.cancel(queued.handle)


def test_release_and_tidy_stay_by_process(port_table: LockTable) -> None:
    """Freeing what a process leaves behind is by pid, also with port owners."""
    assert isinstance(lock(port_table, owner(ME, 4), key=b"A"), Grant)
    assert isinstance(lock(port_table, owner(PARENT, 4), key=b"B"), Grant)
    assert port_table.release_owner(PARENT) == 1
    assert [e.slot.pid for e in port_table.scan()] == [ME]
    assert port_table.release_owner(ME) == 1

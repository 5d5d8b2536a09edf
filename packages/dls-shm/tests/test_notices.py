"""Blocking notices in the lock table: a holder that asked (``lock(notify=)``) is told, on a doorbell of its
own, when its lock blocks a request, with the mode wanted: once, until nobody waits for the resource or the
lock converts. Forked processes wait; the holder is this process.
"""

from __future__ import annotations

import os
import time
from typing import Any

from dls_shm import LOCAL_IP, Doorbell, Grant, LockTable, Owner, SlotFlag, SlotState, readable

PR, PW, EX = 3, 4, 5
INODE, DEVICE, KEY = 93, 5, b"NOTICE*1"
#: How soon a notice must reach its holder (the issue: within 100 ms).
WITHIN = 0.1


def me(thread: int = 1) -> Owner:
    return Owner(os.getpid(), thread, 0, os.getpid(), LOCAL_IP)


def waiter(table: LockTable, mode: int, ready: Any) -> int:
    """Child body: ask for the lock in ``mode`` and wait for it (say when queued); 0 once granted."""
    bell = table.doorbell()
    queued = table.lock(me(), INODE, DEVICE, KEY, mode, wait_token=bell.token)
    ready.send()
    got = table.acquire(me(), INODE, DEVICE, KEY, mode, timeout=30) if isinstance(queued, Grant) else None
    if got is None:
        while not isinstance(got := table.retry(queued.handle), Grant):  # type: ignore[union-attr]
            bell.wait(0.5)
    table.unlock(got.handle)
    return 0


def notices_within(bell: Doorbell, seconds: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if readable([bell.fileno()], deadline - time.monotonic()):  # not bell.wait: it drains what came
            got = bell.notices()
            if got:
                return got
    return []


def test_a_holder_is_told_once_that_its_lock_blocks_and_again_after_the_queue_empties(
    table: LockTable, children: Any, pipes: Any,
) -> None:
    notices = Doorbell()
    try:
        held = table.lock(me(), INODE, DEVICE, KEY, PW, notify=notices.token)
        assert isinstance(held, Grant)
        ready = pipes()
        first = children.fork(lambda: waiter(table, EX, ready))
        ready.recv(timeout=10)
        queued = time.monotonic()  # the notice is sent as the request queues, before the child says so
        assert notices_within(notices, 5) == [(held.handle, EX)]
        assert time.monotonic() - queued < WITHIN
        assert [e.slot.flags & SlotFlag.NOTIFIED for e in table.scan() if e.slot.state == SlotState.GRANTED] \
            == [SlotFlag.NOTIFIED]
        ready2 = pipes()
        second = children.fork(lambda: waiter(table, PR, ready2))
        ready2.recv(timeout=10)
        assert notices_within(notices, 0.3) == [], "told once until the situation changes"
        # A conversion down to PR changes the situation: the EX waiter is still blocked, and is told of again.
        table.convert(held.handle, PR)
        assert notices_within(notices, 5) == [(held.handle, EX)]
        table.unlock(held.handle)
        assert (children.wait(first), children.wait(second)) == (0, 0)
        # Nobody waits now: a new lock's next blocked request is told of again.
        again = table.lock(me(), INODE, DEVICE, KEY, EX, notify=notices.token)
        assert isinstance(again, Grant)
        ready3 = pipes()
        third = children.fork(lambda: waiter(table, PR, ready3))
        ready3.recv(timeout=10)
        assert notices_within(notices, 5) == [(again.handle, PR)]
        table.unlock(again.handle)
        assert children.wait(third) == 0
    finally:
        notices.close()


def test_a_holder_that_did_not_ask_is_not_told_and_a_compatible_request_tells_nobody(
    table: LockTable, children: Any, pipes: Any,
) -> None:
    notices = Doorbell()
    try:
        held = table.lock(me(), INODE, DEVICE, KEY, PR, notify=notices.token)
        quiet = table.lock(me(2), INODE, DEVICE, KEY, PR)
        assert isinstance(held, Grant) and isinstance(quiet, Grant)
        reader = table.lock(Owner(os.getpid(), 3, 0, os.getpid(), LOCAL_IP), INODE, DEVICE, KEY, PR)
        assert isinstance(reader, Grant)
        assert notices_within(notices, 0.2) == []
        table.unlock(held.handle)
        table.unlock(reader.handle)
        table.unlock(quiet.handle)
    finally:
        notices.close()

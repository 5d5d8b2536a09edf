"""Issue 15 (M3): hundreds of requests of one connection waiting for one record are handed it quickly, in turn.

A lock server waits for all of its client's requests on one doorbell. It used to look at every waiting request
at each ring, and each look scanned the record's slots: N waiters of one record on one connection cost N scans
of N slots for each hand-off. The asyncio client makes that normal: 250 tasks on one key took 21 s, 500 took
minutes. Now a ring is followed by a look at the requests it may be for (``LockTable.rung``): those granted,
and the first waiting of each record.

Real processes: a real service, an AsyncClient (one connection, one owner a task) and a threaded Client.
Liveness stays: a waiter granted past one of the same connection still blocked is told at once, well within
the lock server's safety-net look (RECHECK_INTERVAL), which a missed ring would wait for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dls_client.aio import AsyncClient, AsyncHeldLock
from dls_proto import Mode
from dls_shm import SlotState
from dls_shm.table import RECHECK_INTERVAL
from dls_testkit import Service, client_for, data_file, make_service
from dls_testkit.clients import attached
from dls_testkit.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="function")]

#: Tasks of one connection waiting for one record.
WAITERS = 400
#: How long they may take to pass the record on, all of them: generous (a loaded machine), and far below what
#: they took before (100 tasks 2.3 s, 250 tasks 21 s, 500 tasks 4 minutes on a 2-core machine).
ALL_THROUGH = 30.0


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service whose groups hold a thousand locks: room for hundreds of waiters of one record."""
    svc = make_service(tmp_path_factory.mktemp("big"), start_options=("-ibs4000,1000", "--max-locks", "1000"))
    try:
        svc.start()
        yield svc
    finally:
        svc.stop_and_check()


def waiting(service: Service, key: bytes) -> int:
    """How many requests wait for record ``key``."""
    with attached(service) as table:
        return sum(1 for e in table.scan() if e.slot.state == SlotState.WAITING and e.slot.key[:e.slot.key_len] == key)


async def until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """``wait_for`` in a worker thread: the loop goes on meanwhile."""
    await asyncio.to_thread(wait_for, condition, timeout, what)


async def test_hundreds_of_tasks_of_one_connection_take_one_record_in_turn_quickly(big: Service,
                                                                                   tmp_path: Path) -> None:
    data = data_file(tmp_path)
    client = AsyncClient(big.config(timeout=30))
    try:
        first = await client.lock(data, "HOT", Mode.EX)
        order: list[int] = []

        async def one(i: int) -> None:
            held = await client.lock(data, "HOT", Mode.EX)
            order.append(i)
            await held.release()

        tasks = [asyncio.create_task(one(i)) for i in range(WAITERS)]  # queued in this order: one connection
        await until(lambda: waiting(big, b"HOT") == WAITERS, f"{WAITERS} requests waiting")
        started = time.monotonic()
        await first.release()
        try:
            async with asyncio.timeout(ALL_THROUGH):
                await asyncio.gather(*tasks)
        finally:
            took = time.monotonic() - started
            print(f"{WAITERS} waiters of one connection: {len(order)} through in {took:.2f} s")
        assert order == list(range(WAITERS))  # FIFO
    finally:
        await client.close()


async def test_a_waiter_granted_past_a_blocked_one_of_its_connection_is_told_at_once(big: Service,
                                                                                      tmp_path: Path) -> None:
    """The holder converts EX to PR: the CR waiting behind a PW of the same connection goes (CR goes with PR and
    PW), the PW stays; the CR's grant comes with the ring, not at a later look."""
    data = data_file(tmp_path)
    holder = client_for(big)
    client = AsyncClient(big.config(timeout=30))

    async def take(mode: int) -> AsyncHeldLock:
        return await client.lock(data, "MIX", mode)

    try:
        held = holder.lock(data, "MIX", Mode.EX)
        blocked = asyncio.create_task(take(Mode.PW))
        await until(lambda: waiting(big, b"MIX") == 1, "the PW waiting")
        later = asyncio.create_task(take(Mode.CR))
        behind = asyncio.create_task(take(Mode.EX))
        await until(lambda: waiting(big, b"MIX") == 3, "the CR and the EX waiting behind it")
        started = time.monotonic()
        await asyncio.to_thread(held.convert, Mode.PR)
        async with asyncio.timeout(RECHECK_INTERVAL * 5):
            granted = await later
        took = time.monotonic() - started
        assert took < RECHECK_INTERVAL / 2, f"the CR was granted after {took:.2f} s"
        assert not blocked.done() and not behind.done()
        await granted.release()
        await asyncio.to_thread(held.release)
        async with asyncio.timeout(5):
            await (await blocked).release()
            await (await behind).release()
    finally:
        await client.close()
        holder.close()

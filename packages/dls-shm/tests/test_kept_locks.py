"""Kept locks in the table: a lock server's keepable locks kept when it ends, in everyone's way until their
client reclaims them or the lock-delay passes, and freed then.

Owners are this process (a live pid) or a child forked and reaped at once (a dead pid); a keepable owner
stands for a lock server's remote client (``Owner.keep``), the others for local processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dls_shm import (
    KEY_MAX,
    Conflict,
    Doorbell,
    Grant,
    Holder,
    LockTable,
    NotHeld,
    OsLocks,
    Owner,
    Queued,
    SlotFlag,
    SlotState,
    modes,
    pack_ip,
    report,
)
from dls_shm.info import entry_json
from dls_shm.layout import LAYOUT_VERSION
from dls_testkit import Children

PR, EX = modes.PR, modes.EX
INODE, DEVICE, KEY = 4321, -1, b"USD163170001"
DELAY = 15.0


def owner(pid: int, thread: int = 1, *, keep: bool = True, port: int = 5001, client_pid: int = 9001,
          ip: str = "10.0.0.7") -> Owner:
    return Owner(pid, thread, port, client_pid, pack_ip(ip), keep)


ME = os.getpid()
#: The client's lock server (this process), the same client through a new lock server (also this process:
#: a live pid; only port, client pid, thread and address must be the same), a local process, another client.
SERVER = owner(ME)
LOCAL = owner(ME, 7, keep=False, port=ME, client_pid=ME, ip="0.0.0.0")
OTHER = owner(ME, 2, port=5002, client_pid=9002, ip="10.0.0.8")


@pytest.fixture
def table(make_table: Callable[..., LockTable]) -> LockTable:
    """A table with the default lock-delay of the service."""
    t = make_table()
    t.set_header(lock_delay=DELAY)
    return t


@pytest.fixture
def dead_pid(children: Children) -> int:
    """The pid of a process that has ended (forked, exited, reaped)."""
    pid = children.fork(lambda: 0)
    assert children.wait(pid) == 0
    return pid


@pytest.fixture
def bell() -> Any:
    b = Doorbell()
    yield b
    b.close()


def lock(table: LockTable, o: Owner, mode: int = EX, key: bytes = KEY, **kw: Any) -> Grant | Conflict | Queued:
    return table.lock(o, INODE, DEVICE, key, mode, **kw)


def grant(table: LockTable, o: Owner, mode: int = EX, key: bytes = KEY) -> Grant:
    result = lock(table, o, mode, key)
    assert isinstance(result, Grant), result
    return result


def slots(table: LockTable) -> list[Any]:
    return [e.slot for e in table.scan()]


def states(table: LockTable) -> list[tuple[bytes, int]]:
    return sorted((s.key[: s.key_len], s.state) for s in slots(table))


def reclaim(table: LockTable, handle: int, o: Owner, mode: int = EX, key: bytes = KEY, inode: int = INODE,
            device: int = DEVICE) -> Grant:
    return table.reclaim(handle, o, inode, device, key, mode)


def test_layout_version_4_has_a_kept_state_a_keep_flag_and_a_lock_delay(table: LockTable) -> None:
    header = table.header()
    assert header.layout_version == LAYOUT_VERSION == 4
    assert (header.lock_delay, header.next_expiry) == (DELAY, 0.0)
    assert table.lock_delay == DELAY
    assert (SlotState.KEPT, SlotFlag.KEEP) == (3, 2)


def test_a_keepable_owner_marks_its_slot_and_a_local_one_does_not(table: LockTable) -> None:
    grant(table, SERVER, key=b"remote")
    grant(table, LOCAL, key=b"local")
    long_key = b"L" * (KEY_MAX + 10)
    grant(table, SERVER, key=long_key)
    flags = {s.key[: s.key_len][:6]: s.flags for s in slots(table)}
    assert flags[b"remote"] == SlotFlag.KEEP
    assert flags[b"local"] == 0
    assert flags[b"LLLLLL"] == SlotFlag.KEEP | SlotFlag.LONG_KEY


# -- keep_owner -------------------------------------------------------------------------------------------------


def test_keep_owner_keeps_keepable_locks_and_frees_the_rest(table: LockTable, bell: Doorbell) -> None:
    ending = os.getppid()  # a live process, so that its locks block until it is said to end
    server = owner(ending)
    local_of_it = owner(ending, 3, keep=False)
    grant(table, server, key=b"A")
    grant(table, server, PR, key=b"B")
    grant(table, local_of_it, key=b"C")
    grant(table, OTHER, key=b"D")
    queued = lock(table, server, key=b"D", wait_token=1)  # its request behind OTHER's lock
    assert isinstance(queued, Queued)
    behind = lock(table, OTHER._replace(thread=5), PR, key=b"C", wait_token=bell.token)
    assert isinstance(behind, Queued)
    before = time.time()
    assert table.keep_owner(ending) == 2
    # C is handed at once to the request behind the freed lock
    assert states(table) == [(b"A", SlotState.KEPT), (b"B", SlotState.KEPT), (b"C", SlotState.GRANTED),
                             (b"D", SlotState.GRANTED)]
    kept = [s for s in slots(table) if s.state == SlotState.KEPT]
    assert all(before <= s.timestamp <= time.time() for s in kept)
    assert before + DELAY <= table.header().next_expiry <= time.time() + DELAY
    assert bell.wait(1.0), "the waiter behind the freed lock was not rung"
    assert isinstance(table.retry(behind.handle), Grant)
    assert table.keep_owner(ending) == 0  # kept locks are nobody's: nothing more to keep


def test_a_table_without_lock_delay_keeps_nothing(table: LockTable, dead_pid: int) -> None:
    table.set_header(lock_delay=0.0)
    grant(table, owner(dead_pid), key=b"A")
    assert table.keep_owner(dead_pid) == 0
    assert slots(table) == []
    # and a blocked request frees a dead lock server's lock at once, as for a local process
    grant(table, owner(dead_pid), key=b"B")
    assert isinstance(lock(table, OTHER, key=b"B"), Grant)


# -- a kept lock is in everyone's way ---------------------------------------------------------------------------


def test_a_kept_lock_conflicts_like_a_granted_one_even_with_its_own_client(table: LockTable, dead_pid: int,
                                                                           bell: Doorbell) -> None:
    g = grant(table, owner(dead_pid))
    table.keep_owner(dead_pid)
    [kept] = slots(table)
    expires = kept.timestamp + DELAY
    refused = lock(table, OTHER)
    assert isinstance(refused, Conflict)
    assert refused.holder == Holder(EX, dead_pid, SERVER.port, SERVER.client_pid, 1, SERVER.ip)
    # Its own client, even under the same pid and thread (a reused pid), takes it back only by reclaim.
    assert isinstance(lock(table, owner(dead_pid)), Conflict)
    assert isinstance(lock(table, SERVER), Conflict)
    queued = lock(table, OTHER, wait_token=bell.token)
    assert isinstance(queued, Queued)
    assert queued.expires == pytest.approx(expires)
    again = table.retry(queued.handle)
    assert isinstance(again, Queued) and again.expires == pytest.approx(expires)
    assert table.status(OTHER, INODE, DEVICE, KEY) == (2, refused.holder)
    assert table.status(owner(dead_pid), INODE, DEVICE, KEY)[0] == 2  # OTHER, never MINE
    with pytest.raises(NotHeld):
        table.unlock(g.handle)
    assert table.cancel(queued.handle)


def test_a_kept_shared_lock_lets_a_compatible_request_in(table: LockTable, dead_pid: int) -> None:
    grant(table, owner(dead_pid), PR)
    table.keep_owner(dead_pid)
    g = grant(table, OTHER, PR)
    assert isinstance(lock(table, OTHER._replace(thread=3), EX), Conflict)
    table.unlock(g.handle)


def test_release_owner_leaves_kept_locks_alone(table: LockTable, dead_pid: int) -> None:
    grant(table, owner(dead_pid), key=b"A")
    table.keep_owner(dead_pid)
    grant(table, owner(dead_pid), key=b"B")  # a new process with the reused pid
    assert table.release_owner(dead_pid) == 1
    assert states(table) == [(b"A", SlotState.KEPT)]


# -- expiry ------------------------------------------------------------------------------------------------------


def test_a_waiter_is_granted_when_the_delay_ends_not_a_recheck_later(table: LockTable, dead_pid: int) -> None:
    table.set_header(lock_delay=0.4)
    grant(table, owner(dead_pid))
    table.keep_owner(dead_pid)
    [kept] = slots(table)
    result = table.acquire(OTHER, INODE, DEVICE, KEY, EX, timeout=5)
    late = time.time() - (kept.timestamp + 0.4)
    assert isinstance(result, Grant)
    assert 0 <= late < 0.3, f"granted {late:.3f} s after the kept lock expired"
    assert [(s.state, s.port) for s in slots(table)] == [(SlotState.GRANTED, OTHER.port)]
    assert table.header().tidy_ops == 1


def test_a_blocked_request_keeps_a_dead_lock_servers_lock_and_frees_a_dead_local_process(
        table: LockTable, dead_pid: int) -> None:
    grant(table, owner(dead_pid), key=b"remote")
    grant(table, owner(dead_pid, 3, keep=False), key=b"local")
    assert isinstance(lock(table, OTHER, key=b"local"), Grant)  # freed at once, as always
    before = time.time()
    refused = lock(table, OTHER, key=b"remote", wait_token=1)
    assert isinstance(refused, Queued), refused
    assert before + DELAY <= refused.expires <= time.time() + DELAY
    kept = next(s for s in slots(table) if s.key.startswith(b"remote") and s.state != SlotState.WAITING)
    assert kept.state == SlotState.KEPT and before <= kept.timestamp
    assert table.header().next_expiry == pytest.approx(refused.expires)
    assert table.cancel(refused.handle)


def test_tidy_keeps_expires_and_frees(table: LockTable, dead_pid: int) -> None:
    table.set_header(lock_delay=0.3)
    grant(table, owner(dead_pid), key=b"keepable")
    grant(table, owner(dead_pid, 3, keep=False), key=b"local")
    grant(table, SERVER, key=b"alive")
    gone = lambda pid, since: pid == dead_pid  # noqa: E731
    assert table.tidy(gone) == (1, 1)
    assert states(table) == [(b"alive", SlotState.GRANTED), (b"keepable", SlotState.KEPT)]
    due = table.header().next_expiry
    assert due > time.time()
    assert table.tidy(gone) == (0, 0)  # not yet due: a tidy (the one on start, say) leaves it
    assert table.header().next_expiry == pytest.approx(due)
    time.sleep(max(0.0, due - time.time()) + 0.01)
    assert table.tidy(gone) == (1, 0)
    assert states(table) == [(b"alive", SlotState.GRANTED)]
    assert table.header().next_expiry == 0.0
    assert table.header().tidy_ops == 3


# -- reclaim -----------------------------------------------------------------------------------------------------


def test_reclaim_gives_the_kept_lock_back_under_the_same_handle(table: LockTable, dead_pid: int) -> None:
    g = grant(table, owner(dead_pid, 4))
    table.keep_owner(dead_pid)
    new_server = owner(ME, 4)
    before = time.time()
    back = reclaim(table, g.handle, new_server)
    assert back == g
    [s] = slots(table)
    assert (s.state, s.pid, s.thread, s.port, s.client_pid, s.ip, s.mode, s.flags) == (
        SlotState.GRANTED, ME, 4, SERVER.port, SERVER.client_pid, new_server.ip, EX, SlotFlag.KEEP)
    assert before <= s.timestamp <= time.time()
    assert reclaim(table, g.handle, new_server) == g  # asked again by its lock server: still its own
    assert isinstance(lock(table, OTHER), Conflict)
    assert isinstance(lock(table, new_server, PR), Grant)  # its own now: a conversion
    table.unlock(g.handle)
    assert slots(table) == []


def test_reclaim_from_another_address_is_refused(table: LockTable, dead_pid: int) -> None:
    """Port, client pid and thread are told to anyone the lock is in the way of (Refused, Waiting): the
    address the client connects from is the part of its identity another host cannot borrow."""
    g = grant(table, owner(dead_pid, 4))
    table.keep_owner(dead_pid)
    with pytest.raises(NotHeld, match="no lock of this client"):
        reclaim(table, g.handle, owner(ME, 4, ip="10.0.0.99"))
    assert reclaim(table, g.handle, owner(ME, 4)) == g


def test_reclaim_of_a_dead_lock_servers_lock_not_yet_kept(table: LockTable, dead_pid: int) -> None:
    g = grant(table, owner(dead_pid))
    assert reclaim(table, g.handle, SERVER) == g
    assert [(s.state, s.pid) for s in slots(table)] == [(SlotState.GRANTED, ME)]


def test_reclaim_with_a_long_key(table: LockTable, dead_pid: int) -> None:
    key = b"K" * 300
    g = grant(table, owner(dead_pid), key=key)
    table.keep_owner(dead_pid)
    with pytest.raises(NotHeld):
        reclaim(table, g.handle, SERVER, key=key[:-1] + b"X")
    assert reclaim(table, g.handle, SERVER, key=key) == g


@pytest.mark.parametrize("wrong", ["ticket", "index", "port", "client_pid", "thread", "inode", "device", "key",
                                   "mode"])
def test_reclaim_refuses_what_is_not_the_kept_lock(table: LockTable, dead_pid: int, wrong: str) -> None:
    g = grant(table, owner(dead_pid))
    table.keep_owner(dead_pid)
    handle, who, args = g.handle, SERVER, {"mode": EX, "key": KEY, "inode": INODE, "device": DEVICE}
    if wrong == "ticket":
        handle += 1 << 24
    elif wrong == "index":
        handle += 1
    elif wrong in ("port", "client_pid", "thread"):
        who = who._replace(**{wrong: getattr(who, wrong) + 1})
    elif wrong == "key":
        args["key"] = b"USD163170002"
    elif wrong == "mode":
        args["mode"] = PR
    else:
        args[wrong] += 1
    with pytest.raises(NotHeld) as refused:
        reclaim(table, handle, who, **args)
    assert str(refused.value) == f"no lock of this client, file, key and mode is kept under handle {handle:#x}"
    assert [s.state for s in slots(table)] == [SlotState.KEPT]
    assert reclaim(table, g.handle, SERVER) == g


def test_reclaim_refuses_a_lock_whose_lock_server_lives(table: LockTable) -> None:
    parent = owner(os.getppid())
    g = grant(table, parent)
    with pytest.raises(NotHeld, match=rf"still held by the lock server that took it \(pid {os.getppid()}\)"):
        reclaim(table, g.handle, SERVER)
    assert [(s.state, s.pid) for s in slots(table)] == [(SlotState.GRANTED, os.getppid())]


def test_reclaim_refuses_a_local_processs_lock(table: LockTable, dead_pid: int) -> None:
    local = owner(dead_pid, keep=False)
    g = grant(table, local)
    with pytest.raises(NotHeld):
        reclaim(table, g.handle, local._replace(pid=ME))


def test_a_late_reclaim_is_refused_and_frees_the_lock(table: LockTable, dead_pid: int, bell: Doorbell) -> None:
    table.set_header(lock_delay=0.2)
    g = grant(table, owner(dead_pid))
    table.keep_owner(dead_pid)
    waiter = lock(table, OTHER, wait_token=bell.token)
    assert isinstance(waiter, Queued)
    time.sleep(0.25)
    with pytest.raises(NotHeld, match=r"was kept 0\.2 s for its client to reclaim, and has been freed"):
        reclaim(table, g.handle, SERVER)
    assert bell.wait(1.0), "the waiter was not rung when the expired lock was freed"
    assert isinstance(table.retry(waiter.handle), Grant)


def test_a_reclaimed_lock_of_a_table_without_delay_is_no_longer_keepable(table: LockTable, dead_pid: int) -> None:
    g = grant(table, owner(dead_pid))
    table.keep_owner(dead_pid)
    assert reclaim(table, g.handle, SERVER._replace(keep=False)) == g
    assert [s.flags for s in slots(table)] == [0]


# -- what the tools show -----------------------------------------------------------------------------------------


def test_report_and_json_show_a_kept_lock(table: LockTable, dead_pid: int) -> None:
    grant(table, owner(dead_pid), key=b"A")
    grant(table, SERVER, key=b"B")
    table.keep_owner(dead_pid)
    lock(table, OTHER, key=b"A", wait_token=1)
    snap = report.Snapshot.read(table)
    assert (snap.granted, snap.kept, snap.waiting) == (1, 1, 1)
    rows = {r.split("\t")[9]: r.split("\t") for r in report.lock_rows(snap)[1:] if "waiting" not in r}
    assert rows["A"][7] == "kept, 15 s left, 1 queued"
    assert rows["B"][7] == "None"
    summary = report.summary_lines(snap)
    assert summary[2].strip() == "2 locks currently in use"
    assert summary[-2].strip() == "1 locks kept for their clients to reclaim (lock-delay 15 s)"
    assert summary[-1].strip() == "1 requests waiting"
    kept = next(e for e in snap.entries if e.slot.state == SlotState.KEPT)
    doc = entry_json(kept, DELAY)
    assert doc["state"] == "kept" and doc["expires"] == kept.slot.timestamp + DELAY
    assert "expires" not in entry_json(next(e for e in snap.entries if e.slot.state == SlotState.GRANTED), DELAY)


@pytest.mark.parametrize(("left", "shown"), [(12.2, "kept, 13 s left"), (0.01, "kept, 1 s left"),
                                             (0.0, "kept, expired"), (-5.0, "kept, expired")])
def test_kept_for(left: float, shown: str) -> None:
    assert report.kept_for(1000.0 + left, 1000.0) == shown


# -- OS file locks keep nothing --------------------------------------------------------------------------------


def test_os_locks_keep_nothing_and_refuse_every_reclaim(tmp_path: Path) -> None:
    locks = OsLocks(tmp_path)
    try:
        g = locks.lock(SERVER, INODE, DEVICE, KEY, EX)
        assert isinstance(g, Grant)
        with pytest.raises(NotHeld, match="OS file locks cannot be kept"):
            locks.reclaim(g.handle, SERVER, INODE, DEVICE, KEY, EX)
        assert locks.keep_owner(SERVER.pid) == 0
        assert locks.held() == 0
        with pytest.raises(NotHeld):
            locks.unlock(g.handle)
    finally:
        locks.close()


def test_a_lock_handed_to_a_lock_server_that_ends_before_sealing_it_is_freed_not_kept(
    table: LockTable, bell: Any,
) -> None:
    """A hand-off grants the lock before the waiting lock server has seen it, let alone told its client: if
    that lock server ends then (killed, or jdls -k), nobody could reclaim the lock, and keeping it would make
    every waiter wait out the lock-delay (audit of issue 13). Once sealed (the lock server saw the grant and
    tells its client) it is kept as any other."""
    ending = os.getppid()  # a live process, so that its locks block until it is said to end
    server = owner(ending)
    for key, sealed in ((b"UNSEEN", False), (b"SEALED", True)):
        held = grant(table, OTHER, key=key)
        queued = lock(table, server, key=key, wait_token=bell.token)
        assert isinstance(queued, Queued)
        table.unlock(held.handle)  # handed to the lock server's request
        assert bell.wait(1.0)
        if sealed:
            assert isinstance(table.retry(queued.handle), Grant)
            table.seal(queued.handle, 0x5EA1)
    assert table.keep_owner(ending) == 1
    assert states(table) == [(b"SEALED", SlotState.KEPT)]

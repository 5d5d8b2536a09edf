"""Deadlocks through a running service (issue 14, item 3): the monitor finds a cycle of waiters within a
second of its forming and refuses one request of it, the one that closed it; the rest of the cycle goes on.

Real processes: a real ``jdls -ib``; local owners are forked processes on the service's table, remote ones
raw protocol connections through their lock servers.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest
from dls_client.locks import REMOTE_DEVICE
from dls_proto import (
    WAIT_FOREVER,
    Acquired,
    Connection,
    Echo,
    EchoReply,
    Granted,
    Lock,
    Mode,
    Refused,
    RefuseReason,
    Unlock,
)
from dls_shm import LOCAL_IP, Deadlock, Grant, LockTable, Owner, SlotState
from dls_testkit import Service, wait_for
from dls_testkit.wire import greet, receive, receive_final

INODE = 4242
#: How soon after a cycle forms one of its requests must be refused (the issue: within a second).
WITHIN = 1.0


def me() -> Owner:
    return Owner(os.getpid(), 1, 0, os.getpid(), LOCAL_IP)


def waiting(table: LockTable) -> int:
    return sum(1 for e in table.scan() if e.slot.state == SlotState.WAITING)


def local_member(key: str, first: bytes, second: bytes, pipes: tuple[Any, Any, Any]) -> int:
    """Child body on the service's table: hold ``first``, say so, on the word wait for ``second``; report
    G (granted) or D and the seconds from the word to the refusal."""
    ready, go, done = pipes
    table = LockTable.attach(int(key, 16))
    held = table.lock(me(), INODE, REMOTE_DEVICE, first, Mode.EX)
    assert isinstance(held, Grant)
    ready.send()
    go.recv(timeout=30)
    try:
        got = table.acquire(me(), INODE, REMOTE_DEVICE, second, Mode.EX, timeout=30)
    except Deadlock:
        done.send(b"D")
        table.unlock(held.handle)
        return 7
    assert isinstance(got, Grant)
    done.send(b"G")
    table.unlock(got.handle)
    table.unlock(held.handle)
    return 0


def _lock(rid: int, key: bytes) -> Lock:
    return Lock(rid, Mode.EX, 0, WAIT_FOREVER, 1, INODE, REMOTE_DEVICE, key, "deadlock.dat")


@pytest.mark.parametrize("locals_", [2, 3])
def test_a_cycle_of_local_processes_loses_its_newest_request_within_a_second(
    service: Service, children: Any, pipes: Any, locals_: int,
) -> None:
    table = LockTable.attach(service.instance.key)
    try:
        keys = [f"CYCLE*{n}".encode() for n in range(locals_)]
        members = []
        for n in range(locals_):
            p = (pipes(), pipes(), pipes())
            pid = children.fork(lambda n=n, p=p: local_member(f"{service.instance.key:x}", keys[n],
                                                              keys[(n + 1) % locals_], p))
            p[0].recv(timeout=10)
            members.append((pid, p))
        for n, (_, p) in enumerate(members):
            p[1].send()
            wait_for(lambda n=n: waiting(table) == n + 1, 10, f"{n + 1} requests waiting")
            time.sleep(0.01)
        closed = time.monotonic()
        refused = members[-1][1][2].recv(timeout=5)
        took = time.monotonic() - closed
        assert refused == b"D" and took < WITHIN, (refused, took)
        assert [p[2].recv(timeout=10) for _, p in members[:-1]] == [b"G"] * (locals_ - 1)
        assert [children.wait(pid) for pid, _ in members] == [0] * (locals_ - 1) + [7]
        service.wait_for_log(r"deadlock: refused the EX request of pid \d+ thread 1 for key 'CYCLE\*")
    finally:
        table.close()


def test_a_cycle_of_a_local_process_and_a_remote_client_refuses_the_remote_request(
    service: Service, children: Any, pipes: Any,
) -> None:
    table = LockTable.attach(service.instance.key)
    remote = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    try:
        p = (pipes(), pipes(), pipes())
        local = children.fork(lambda: local_member(f"{service.instance.key:x}", b"MIXED*L", b"MIXED*R", p))
        p[0].recv(timeout=10)
        conn: Connection
        conn, _ = greet(remote, 4401)
        remote.sendall(conn.send(_lock(2, b"MIXED*R")))
        mine = receive(remote, conn, Acquired)
        p[1].send()  # the local process waits for the remote client's lock
        wait_for(lambda: waiting(table) == 1, 10, "the local request to wait")
        time.sleep(0.01)
        remote.sendall(conn.send(_lock(3, b"MIXED*L")) + conn.send(Echo(4, b"")))
        receive(remote, conn, EchoReply)  # queued: the cycle is closed
        closed = time.monotonic()
        answer = receive_final(remote, conn, Refused)
        took = time.monotonic() - closed
        assert (answer.request_id, answer.reason) == (3, RefuseReason.DEADLOCK) and took < WITHIN, (answer, took)
        remote.sendall(conn.send(Unlock(5, mine.handle)))  # the victim lets go: the local process goes on
        assert p[2].recv(timeout=10) == b"G"
        assert children.wait(local) == 0
    finally:
        remote.close()
        table.close()


def test_a_three_way_cycle_of_a_local_process_and_two_remote_clients_refuses_only_the_newest(
    service: Service, children: Any, pipes: Any,
) -> None:
    """L (local) holds A and waits for B; R1 (remote) holds B and waits for C; R2 (remote) holds C and closes
    the cycle asking for A: only R2's request is refused, within a second; once R2 lets C go, R1 and then L go on."""
    table = LockTable.attach(service.instance.key)
    r1 = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    r2 = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    try:
        p = (pipes(), pipes(), pipes())
        local = children.fork(lambda: local_member(f"{service.instance.key:x}", b"THREE*A", b"THREE*B", p))
        p[0].recv(timeout=10)
        c1: Connection
        c2: Connection
        c1, _ = greet(r1, 4501)
        c2, _ = greet(r2, 4502)
        r1.sendall(c1.send(_lock(2, b"THREE*B")))
        b = receive(r1, c1, Acquired)
        r2.sendall(c2.send(_lock(2, b"THREE*C")))
        c = receive(r2, c2, Acquired)
        p[1].send()  # L waits for B
        wait_for(lambda: waiting(table) == 1, 10, "L's request to wait")
        r1.sendall(c1.send(_lock(3, b"THREE*C")) + c1.send(Echo(4, b"")))  # R1 waits for C
        receive(r1, c1, EchoReply)
        time.sleep(0.01)
        r2.sendall(c2.send(_lock(3, b"THREE*A")) + c2.send(Echo(4, b"")))  # R2 waits for A: the cycle is closed
        receive(r2, c2, EchoReply)
        closed = time.monotonic()
        answer = receive_final(r2, c2, Refused)
        took = time.monotonic() - closed
        assert (answer.request_id, answer.reason) == (3, RefuseReason.DEADLOCK) and took < WITHIN, (answer, took)
        r2.sendall(c2.send(Unlock(5, c.handle)))  # the victim lets C go: R1 gets it, then lets B go for L
        got = receive_final(r1, c1, Acquired)
        assert got.request_id == 3
        r1.sendall(c1.send(Unlock(5, got.handle)) + c1.send(Unlock(6, b.handle)))
        assert p[2].recv(timeout=10) == b"G"
        assert children.wait(local) == 0
        assert waiting(table) == 0
    finally:
        r1.close()
        r2.close()
        table.close()


def test_a_cycle_closed_by_a_client_of_protocol_3_refuses_the_other_member(
    service: Service, children: Any, pipes: Any,
) -> None:
    """A client of version 3 does not know DEADLOCK (it was promised "exactly as before"): when its request
    closes a cycle, the local process's request, older, is refused instead; the old client then gets its lock."""
    table = LockTable.attach(service.instance.key)
    old = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    try:
        p = (pipes(), pipes(), pipes())
        local = children.fork(lambda: local_member(f"{service.instance.key:x}", b"OLD*L", b"OLD*R", p))
        p[0].recv(timeout=10)
        conn: Connection
        conn, welcome = greet(old, 4601, max_version=3)
        assert welcome.version == 3
        old.sendall(conn.send(_lock(2, b"OLD*R")))
        mine = receive(old, conn, Granted)
        p[1].send()  # the local process waits for the old client's lock
        wait_for(lambda: waiting(table) == 1, 10, "the local request to wait")
        time.sleep(0.01)
        old.sendall(conn.send(_lock(3, b"OLD*L")))  # the old client closes the cycle
        closed = time.monotonic()
        assert p[2].recv(timeout=5) == b"D", "the local (protocol 4) member is refused"
        assert time.monotonic() - closed < WITHIN
        got = receive_final(old, conn, Granted)
        assert got.request_id == 3  # the local process let its lock go when refused
        assert children.wait(local) == 7
        old.sendall(conn.send(Unlock(4, got.handle)) + conn.send(Unlock(5, mine.handle)))
    finally:
        old.close()
        table.close()

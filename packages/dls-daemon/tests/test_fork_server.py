"""The fork server (dls_daemon.forkserver), with real processes: it forks the lock servers, not the listener;
when it dies or hangs the listener notices, replaces it, and its lock servers go on serving, are reaped (no
zombie), and release their client's locks when the client goes; it never outlives its listener.

Every test gets its own instance from the ``service`` fixture (conftest.py), whose teardown fails the test if
a process or IPC resource is left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
from dls_daemon import forkserver
from dls_proto import Granted, Lock, Mode, Refused
from dls_testkit import gone, greet, receive, wait_for


def _start(service) -> tuple[int, int]:
    """``jdls -ib``: the listener's pid and its fork server's (its only child)."""
    result = service.jdls("-ib")
    assert result.returncode == 0, result.stderr
    listener = service.pid("listener")
    assert listener
    (forker,) = psutil.Process(listener).children()
    return listener, forker.pid


def _lock(sock: socket.socket, conn, rid: int, key: bytes, kind=Granted):
    sock.sendall(conn.send(Lock(rid, Mode.EX, 0, 0, 1, 4242, 0, key, "FBNK.ACCOUNT")))
    return receive(sock, conn, kind)


def _reaped(pid: int) -> bool:
    """Gone and collected by its parent (a zombie still has its pid)."""
    return not psutil.pid_exists(pid)


def test_lock_servers_are_the_fork_servers_children(service):
    listener, forker = _start(service)
    with socket.create_connection(("127.0.0.1", service.port)) as client:
        _, welcome = greet(client)
        assert psutil.Process(welcome.server_pid).ppid() == forker
        assert [c.pid for c in psutil.Process(listener).children()] == [forker]
    wait_for(lambda: _reaped(welcome.server_pid) and not service.server_pids(), what="the lock server reaped")


def test_a_killed_fork_server_is_replaced_and_its_lock_servers_go_on(service):
    listener, forker = _start(service)
    with socket.create_connection(("127.0.0.1", service.port)) as first:
        conn, welcome = greet(first, port=5001)
        server = welcome.server_pid
        _lock(first, conn, 2, b"REC1")
        os.kill(forker, signal.SIGKILL)
        wait_for(lambda: _reaped(forker), what="the dead fork server reaped by the listener")
        service.wait_for_log(rf"fork server \(pid {forker}\) ended")
        # Its lock server goes on serving its client, now the listener's child (the subreaper).
        assert psutil.Process(server).ppid() == listener
        _lock(first, conn, 3, b"REC2")
        with socket.create_connection(("127.0.0.1", service.port)) as second:
            conn2, welcome2 = greet(second, port=5002)
            (new_forker,) = [c.pid for c in psutil.Process(listener).children() if c.pid != server]
            assert new_forker != forker and psutil.Process(welcome2.server_pid).ppid() == new_forker
            refused = _lock(second, conn2, 2, b"REC1", Refused)  # the first client's lock still holds
            assert refused.request_id == 2
            first.close()  # its client gone, the orphaned lock server frees its locks, ends and is reaped
            wait_for(lambda: _reaped(server), what="the orphaned lock server reaped by the listener")
            assert server not in service.server_pids()
            _lock(second, conn2, 3, b"REC1")
    assert not gone(listener)


def test_a_hung_fork_server_is_killed_and_replaced(service):
    _, forker = _start(service)
    os.kill(forker, signal.SIGSTOP)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", service.port)) as lost:
        lost.settimeout(forkserver.ANSWER_TIMEOUT + 20)
        assert lost.recv(100) == b"", "the connection handed to the hung fork server is closed, not left hanging"
    assert time.monotonic() - started < forkserver.ANSWER_TIMEOUT + 15
    wait_for(lambda: _reaped(forker), what="the hung fork server killed and reaped")
    service.wait_for_log(rf"fork server \(pid {forker}\) did not answer within")
    with socket.create_connection(("127.0.0.1", service.port)) as client:
        conn, _ = greet(client)
        _lock(client, conn, 2, b"REC1")


def test_the_fork_server_ends_with_its_listener_and_lock_servers_stay(service):
    listener, forker = _start(service)
    with socket.create_connection(("127.0.0.1", service.port)) as client:
        conn, welcome = greet(client)
        assert service.jdls("-kD").returncode == 0  # the listener only
        assert gone(listener) and gone(forker)
        _lock(client, conn, 2, b"REC1")  # its lock server still serving
        assert service.jdls("-ibD").returncode == 0  # a new listener, with a fork server of its own
        listener2 = service.pid("listener")
        assert listener2 and len(psutil.Process(listener2).children()) == 1
        with socket.create_connection(("127.0.0.1", service.port)) as other:
            conn2, _ = greet(other)
            _lock(other, conn2, 2, b"REC1", Refused)
    wait_for(lambda: gone(welcome.server_pid), what="the first lock server to end with its client")

"""The monitor's HTTP server (issue 15): ``jdls -i --http ADDR:PORT``, who may load it, what it refuses, and
that no HTTP client, slow, hostile or many, stalls the monitor's loop.

Real processes: a real ``jdls -ib --http``; clients are raw sockets and http.client.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
from pathlib import Path
from typing import Any

from dls_client.locks import REMOTE_DEVICE
from dls_proto import Mode
from dls_shm import MONITOR, Grant, LockTable
from dls_testkit import Service, free_port, make_service, wait_for
from test_deadlocks_service import INODE, local_member, me, waiting


def http_port() -> int:
    """A free port for the HTTP server (below the ephemeral range: no outgoing connection takes it meanwhile)."""
    return free_port()


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of ``method path`` on 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, reply.getheader("Content-Type") or "", reply.read().decode()
    finally:
        conn.close()


def started_with_http(tmp_path: Path, *options: str) -> tuple[Service, int]:
    svc = make_service(tmp_path)
    port = http_port()
    svc.start("--http", f"127.0.0.1:{port}", *options)
    return svc, port


def test_the_status_page_placeholder_and_refusals(tmp_path: Path) -> None:
    svc, port = started_with_http(tmp_path)
    with svc.checked():
        assert f"HTTP on 127.0.0.1:{port}" in " ".join(svc.started)
        status, kind, body = get(port, "/")
        assert (status, kind) == (200, "text/html; charset=utf-8") and "<html" in body
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        policy = conn.getresponse().getheader("Content-Security-Policy") or ""
        conn.close()
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy, policy
        status, _, body = get(port, "/nowhere")
        assert status == 404 and "Traceback" not in body
        for method in ("POST", "PUT", "DELETE", "BREW"):
            status, kind, body = get(port, "/", method)
            assert status == 405, (method, status, body)
            assert kind.startswith("text/plain") and len(body) < 200


def test_an_address_outside_admin_allow_gets_403_and_is_logged(tmp_path: Path) -> None:
    svc, port = started_with_http(tmp_path, "--admin-allow", "10.9.9.0/24")
    with svc.checked():
        for path in ("/", "/metrics", "/nowhere"):
            status, _, body = get(port, path)
            assert status == 403 and "forbidden" in body and len(body) < 200, (path, status, body)
        svc.wait_for_log(r"http: 127\.0\.0\.1 refused: not in --admin-allow")


def test_bad_http_values_are_usage_errors(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    for value in ("9102", "localhost:9102", "127.0.0.1:0", "127.0.0.1:70000", "::1:9102", "127.0.0.1:", "[::1]"):
        result = svc.jdls("-ib", "--http", value)
        assert result.returncode == 2, (value, result)
        assert "invalid HTTP address" in result.stderr and value in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    result = svc.jdls("-ibD", "--http", "127.0.0.1:9102")
    assert result.returncode == 2 and "--http" in result.stderr and "-D" in result.stderr, result.stderr
    assert svc.processes() == []


def test_an_http_port_in_use_fails_the_start_clearly(tmp_path: Path) -> None:
    port = http_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with make_service(tmp_path).checked() as svc:
            result = svc.jdls("-ib", "--http", f"127.0.0.1:{port}", "--port", str(svc.port))
            assert result.returncode == 1, result
            assert f"cannot serve HTTP on 127.0.0.1:{port} (--http): Address already in use" in result.stderr
            assert "Traceback" not in result.stderr
            assert svc.processes() == []


def cycle_refused(svc: Service, table: LockTable, children: Any, pipes: Any, name: str) -> tuple[list[int], float]:
    """Two local processes close a cycle of waiters on records ``name``*0 and *1: their statuses (sorted: 0
    granted, 7 refused as a deadlock) and the seconds from the cycle's closing to both ending."""
    members = []
    for n in range(2):
        p = (pipes(), pipes(), pipes())
        keys = (f"{name}*{n}".encode(), f"{name}*{1 - n}".encode())
        members.append((children.fork(lambda k=keys, p=p: local_member(f"{svc.key:x}", *k, p)), p))
        p[0].recv(timeout=10)
    members[0][1][1].send()
    wait_for(lambda: waiting(table) == 1, 10, "the first request to wait")
    members[1][1][1].send()
    closed = time.monotonic()
    statuses = sorted(children.wait(pid) for pid, _ in members)
    return statuses, time.monotonic() - closed


def test_idle_half_and_garbage_http_connections_do_not_stall_the_monitor(
    tmp_path: Path, children: Any, pipes: Any,
) -> None:
    svc, port = started_with_http(tmp_path)
    with svc.checked():
        monitor = svc.pid(MONITOR)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
        half = socket.create_connection(("127.0.0.1", port), timeout=10)
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        garbage = socket.create_connection(("127.0.0.1", port), timeout=10)
        garbage.sendall(os.urandom(4096) + b"\r\n\r\n")
        try:
            table = LockTable.attach(svc.key)
            try:
                statuses, took = cycle_refused(svc, table, children, pipes, "HTTPCYCLE")
                assert statuses == [0, 7] and took < 1.5, (statuses, took)
            finally:
                table.close()
            # The garbage was answered 400 (HTTP/0.9's way, a body alone: it had no version) and closed, without
            # a traceback and without the garbage echoed.
            answer = garbage.recv(4096)
            assert answer == b"400 Bad Request\n", answer
            # Served still, while 50 idle connections are open.
            status, _, _ = get(port, "/")
            assert status == 200
            # The half request is cut off within the request timeout.
            half.settimeout(15)
            assert half.recv(4096) == b""
        finally:
            for s in (*idle, half, garbage):
                s.close()
        assert svc.pid(MONITOR) == monitor
        header = svc.header()
        assert time.time() - header.last_ran < 3


def test_more_connections_than_served_are_closed_and_the_server_recovers(tmp_path: Path) -> None:
    """300 connections at once, beyond MAX_CONNECTIONS (64): the rest are closed unanswered (logged, rate-limited),
    the monitor goes on tidying, and once they go the server serves again."""
    svc, port = started_with_http(tmp_path)
    with svc.checked():
        monitor = svc.pid(MONITOR)
        crowd = []
        try:
            for _ in range(300):
                crowd.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            svc.wait_for_log(r"http: 64 connections open already: one from 127\.0\.0\.1 closed unanswered")
            ran = svc.header().last_ran
            wait_for(lambda: svc.header().last_ran > ran, 5, "the monitor's tick while the crowd is there")
        finally:
            for s in crowd:
                s.close()
        def served() -> bool:
            try:
                return get(port, "/")[0] == 200
            except OSError:  # closed unanswered while the crowd's threads end
                return False

        wait_for(served, 15, "the page served again once the crowd went")
        assert svc.pid(MONITOR) == monitor
        assert "Traceback" not in svc.log()


def stranger_connection(port: int, source: str = "127.0.0.2") -> socket.socket:
    """A connection to 127.0.0.1:port from another loopback address (outside --admin-allow 127.0.0.1/32)."""
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def test_strangers_never_take_the_operators_connections(tmp_path: Path) -> None:
    """100 connections of an address outside --admin-allow, each a request begun and never finished, take none
    of the 64 connections served to the allowed: the operator's scrapes are answered meanwhile; what a stranger
    sends, any method, is answered 403."""
    svc, port = started_with_http(tmp_path, "--admin-allow", "127.0.0.1/32")
    with svc.checked():
        poster = stranger_connection(port)
        poster.sendall(b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        assert poster.recv(4096).startswith(b"HTTP/1.0 403 ")
        poster.close()
        crowd = []
        try:
            for _ in range(100):
                try:
                    s = stranger_connection(port)
                    s.sendall(b"GET /metrics HTTP/1.1\r\n")
                    crowd.append(s)
                except OSError:  # closed at once: strangers' connections beyond their own bound
                    pass
            svc.wait_for_log(r"http: 127\.0\.0\.2 refused: not in --admin-allow \(closed")
            for _ in range(5):
                status, _, body = get(port, "/metrics")
                assert status == 200 and "dls_" in body, (status, body[:200])
        finally:
            for s in crowd:
                s.close()
        assert "Traceback" not in svc.log()


def test_a_crowd_of_status_page_loads_leaves_the_monitor_its_deadlock_detection(
    tmp_path: Path, children: Any, pipes: Any,
) -> None:
    """32 clients loading /api/locks and /metrics in a loop on a table of 6000 locks: each answer is computed
    once and shared while fresh, so the monitor still refuses a deadlock within a second and a half."""
    import threading

    svc, port = started_with_http(tmp_path, "-s", "20000,400")
    with svc.checked():
        table = LockTable.attach(svc.key)
        try:
            owner = me()
            for n in range(6000):
                assert isinstance(table.lock(owner, INODE, REMOTE_DEVICE, f"MANY*{n}".encode(), Mode.PR), Grant)
            stop = threading.Event()
            served: list[int] = []

            def load(path: str) -> None:
                while not stop.is_set():
                    try:
                        served.append(get(port, path)[0])
                    except OSError:
                        pass

            crowd = [threading.Thread(target=load, args=("/api/locks" if n % 2 else "/metrics",)) for n in range(32)]
            for t in crowd:
                t.start()
            try:
                time.sleep(1)
                statuses, took = cycle_refused(svc, table, children, pipes, "CROWDCYCLE")
            finally:
                stop.set()
                for t in crowd:
                    t.join(30)
            assert statuses == [0, 7] and took < 1.5, (statuses, took)
            assert served.count(200) > 32, served[:50]
            table.release_owner(owner.pid)
        finally:
            table.close()

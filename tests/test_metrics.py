"""``/metrics`` of a running service (issue 15, item 1), parsed by prometheus_client's own parser while a
contended load runs: real ``dls-lock`` clients on one record (one holds, two wait, one refused at once), a
raw protocol client that waits and cancels and sends a bad request, and a local process locking in the table.
The figures move as they should: waiting by mode while they wait, grants and the histograms once they are
granted, refusals and errors by code, lock servers alive as connections are open, occupancy, table size.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from dls_client.locks import REMOTE_DEVICE
from dls_daemon.meter import short_address
from dls_proto import WAIT_FOREVER, Cancel, Lock, Mode, Refused, RefuseReason, Unlock
from dls_proto import Error as ErrorMessage
from dls_shm import Grant, LockTable
from dls_testkit import wait_for
from dls_testkit.wire import greet, receive, receive_final
from prometheus_client.parser import text_string_to_metric_families
from test_deadlocks_service import INODE, me
from test_http_server import get, started_with_http

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of /metrics, by name and labels, as prometheus_client's parser reads it."""
    status, kind, body = get(port, "/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4"), (status, kind)
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        assert family.documentation, f"{family.name} has no HELP"
        assert family.name.startswith("dls_"), family.name
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def local_holder(key: int, record: bytes, pipes: tuple[Any, Any]) -> int:
    """A local process: hold ``record`` in CR in the table until told."""
    ready, go = pipes
    table = LockTable.attach(key)
    held = table.lock(me(), INODE, REMOTE_DEVICE, record, Mode.CR)
    assert isinstance(held, Grant)
    ready.send()
    go.recv(timeout=60)
    table.unlock(held.handle)
    return 0


def test_metrics_follow_a_contended_load(tmp_path: Path, children: Any, pipes: Any) -> None:
    svc, port = started_with_http(tmp_path)
    with svc.checked():
        first = scrape(port)
        assert value(first, "dls_table_slots") == 1010 and value(first, "dls_table_groups") == 101
        assert value(first, "dls_lock_servers") == 0
        data = tmp_path / "data.dat"
        data.write_text("records")
        holder = svc.dls_lock_popen("-x", str(data), "HOT", "sleep", "30")
        waiters: list[subprocess.Popen[bytes]] = []
        raw = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
        local_pipes = (pipes(), pipes())
        local = children.fork(lambda: local_holder(svc.key, b"LOCAL*1", local_pipes))
        try:
            local_pipes[0].recv(timeout=10)
            wait_for(lambda: value(scrape(port), "dls_locks_held", mode="EX") == 1, 10, "the holder's EX lock")
            waiters = [svc.dls_lock_popen("-x", str(data), "HOT", "true"),
                       svc.dls_lock_popen("-s", str(data), "HOT", "true")]
            refused = svc.dls_lock("-n", str(data), "HOT", "true")
            assert refused.returncode == 1, refused
            conn: Any
            conn, _ = greet(raw, 4701)
            raw.sendall(conn.send(Lock(2, Mode.EX, 0, WAIT_FOREVER, 1, INODE, REMOTE_DEVICE, b"LOCAL*1", "t")))

            def contended() -> bool:
                s = scrape(port)
                return (value(s, "dls_requests_waiting", mode="EX") == 2
                        and value(s, "dls_requests_waiting", mode="PR") == 1)

            wait_for(contended, 15, "two EX requests and one PR waiting")
            during = scrape(port)
            assert value(during, "dls_locks_held", mode="EX") == 1
            assert value(during, "dls_locks_held", mode="CR") == 1  # the local process's
            assert value(during, "dls_table_fullest_group_slots") >= 3
            assert value(during, "dls_table_fullest_group_ratio") == value(during, "dls_table_fullest_group_slots") / 10
            assert value(during, "dls_table_slots_used") == 5
            # One lock server per open connection: the holder's, two waiters', the raw client's (the refused one
            # has ended).
            wait_for(lambda: value(scrape(port), "dls_lock_servers") == 4 == len(svc.server_pids()), 10,
                     "four lock servers")
            # The refusal (BUSY) reaches the monitor within a second of its lock server's end.
            wait_for(lambda: value(scrape(port), "dls_refusals_total", reason="BUSY") == 1, 5, "the BUSY refusal")
            # The raw client cancels its waiting request, and unlocks what it does not hold (Error NOT_HELD).
            raw.sendall(conn.send(Cancel(3, 2)))
            answer = receive_final(raw, conn, Refused)
            assert answer.reason == RefuseReason.CANCELLED
            raw.sendall(conn.send(Unlock(4, 12345)))
            receive(raw, conn, ErrorMessage)

            def counted() -> bool:
                s = scrape(port)
                return (value(s, "dls_cancels_total") == 1 and value(s, "dls_refusals_total", reason="CANCELLED") == 1
                        and value(s, "dls_errors_total", code="NOT_HELD") == 1)

            wait_for(counted, 5, "the cancel and the error counted (within a second, the raw client still there)")
            holder.terminate()  # its sleep ends: the lock goes to the waiters
            holder.wait(30)
            for w in waiters:
                assert w.wait(30) == 0
            local_pipes[1].send()
            assert children.wait(local) == 0
            local = 0

            def granted() -> bool:
                s = scrape(port)
                return (value(s, "dls_grants_total", mode="EX") == 2 and value(s, "dls_grants_total", mode="PR") == 1
                        and value(s, "dls_wait_seconds_count") == 2)

            wait_for(granted, 5, "three grants, two after a wait")
            after = scrape(port)
            assert value(after, "dls_handoff_seconds_count") >= 1
            assert 0 < value(after, "dls_handoff_seconds_sum") < value(after, "dls_wait_seconds_sum")
            assert value(after, "dls_wait_seconds_bucket", le="+Inf") == 2
            assert value(after, "dls_requests_waiting", mode="EX") == 0
            # Every grant took a ticket, the local process's too (and each queued request one).
            assert value(after, "dls_table_tickets_total") >= 4
            assert value(after, "dls_metrics_bad_datagrams_total") == 0
        finally:
            raw.close()
            if local:  # the test failed before the local process let go: it must not keep the table attached
                os.kill(local, signal.SIGKILL)
                children.wait(local)
            for p in (holder, *waiters):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        wait_for(lambda: value(scrape(port), "dls_lock_servers") == 0, 10, "the lock servers gone")
        assert value(scrape(port), "dls_tidies_total") >= 0


def test_a_bad_datagram_is_ignored_and_logged(tmp_path: Path) -> None:
    svc, port = started_with_http(tmp_path)
    with svc.checked():
        path = svc.instance.run_dir / "metrics.sock"
        assert path.stat().st_mode & 0o777 == 0o600
        address, fd = short_address(str(path))
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                for junk in (b"\xff\x00garbage", b'{"v":1,"grants":[1,2]}', b'{"v":1,"refusals":{"99":1}}',
                             b'{"v":1,"cancels":-5}'):
                    s.sendto(junk, address)
        finally:
            if fd is not None:
                os.close(fd)
        wait_for(lambda: value(scrape(port), "dls_metrics_bad_datagrams_total") == 4, 5, "four bad datagrams")
        s2 = scrape(port)
        assert value(s2, "dls_cancels_total") == 0 and value(s2, "dls_grants_total", mode="NL") == 0
        svc.wait_for_log(r"metrics: a datagram of \d+ bytes on .* ignored")

"""SERVER2 without a split, with two real lock services, their processes killed with SIGKILL.

Every test runs a primary and a secondary service, each with its own instance
and port. What is checked:

- a lock is taken on the primary and then on the secondary, released on both;
  a refusal by the secondary releases the primary's grant and is the caller's;
- the old split: one client's secondary lock server and another's primary lock
  server killed; each connects again to the service it lost, and the second
  client is refused the first one's lock on both services;
- the primary's whole service killed under load: every client carries on with
  the secondary alone, no lock is ever granted to two owners (a counter
  incremented under the lock is exact), and the error trace says so;
- a service killed and started again is given every lock the client holds;
- with no service left requests fail, locks are lost (the holder told), and the
  next request once a service is back works;
- a lock taken again is one lock; an unreachable secondary at start is said;
- a lock lost where it is taken again (someone else got it there while that
  service was away) stays held on the other service until its holder, told,
  releases it: nobody is let in before.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dls_client import Client, Config, HeldLock, LockLost, LockRefused, Mode, Server, ServiceUnavailable
from dls_testkit import (
    KEY,
    Service,
    alive,
    assert_exact,
    client_for,
    crew,
    data_file,
    free_port,
    holder_of,
    make_service,
    read_counter,
    slots_of,
    wait_for,
)


@pytest.fixture(autouse=True)
def _own_error_trace(instance_of_the_test: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's clients write their error trace into the primary's instance, not /var/tmp/dls."""
    monkeypatch.setenv("JBCRELEASEDIR", str(tmp_path / "primary" / "release"))


@contextlib.contextmanager
def pair(tmp_path: Path, *options: str) -> Iterator[tuple[Service, Service]]:
    """A primary and a secondary service (``jdls -ib`` with ``options``); clients started with the primary's
    env use both."""
    primary = make_service(tmp_path / "primary")
    secondary = make_service(tmp_path / "secondary")
    assert os.environ["JBCRELEASEDIR"] == str(primary.root)
    try:
        primary.start(*options)
        secondary.start(*options)
        primary.env["JDLS"] = f"SERVER=127.0.0.1,{primary.port},SERVER2=127.0.0.1,{secondary.port}"
        yield primary, secondary
    finally:
        try:
            primary.stop_and_check()
        finally:
            secondary.stop_and_check()


def resilient(primary: Service, secondary: Service, timeout: float = 10.0) -> Client:
    return Client(Config(server=Server("127.0.0.1", primary.port), server2=Server("127.0.0.1", secondary.port),
                         timeout=timeout))


def kill_group(service: Service) -> None:
    """SIGKILL the process groups of the service (the monitor's and the listener's, with its lock
    servers), and wait until none of their processes is left but zombies."""
    groups = {os.getpgid(pid) for pid in (service.pid("monitor"), service.pid("listener")) if pid is not None}
    assert groups and os.getpgrp() not in groups, "the service runs in the tests' own process group"
    for group in groups:
        os.killpg(group, signal.SIGKILL)

    def ended(p: psutil.Process) -> bool:
        try:
            return bool(p.status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:  # reaped between the listing and the look (seen in a fresh-clone run)
            return True

    def gone() -> bool:
        return all(ended(p) for p in psutil.process_iter() if _pgid(p.pid) in groups)
    wait_for(gone, 5, f"the processes of the service on port {service.port} to end")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def error_trace(service: Service) -> str:
    path = service.root / "tmp" / "jbase_error_trace"
    return path.read_text() if path.exists() else ""


def lock_server_of(client: Client, service: Service) -> int:
    """The pid of the lock server serving ``client`` on ``service`` now."""
    (channel,) = [c for c in client._route.channels() if c.server.port == service.port]
    return channel.welcome.server_pid


def held_there(client: Client, service: Service, *keys: str) -> bool:
    """Whether ``client``'s lock server on ``service`` holds exactly ``keys`` (read in the table: a
    witness's try_lock could take a lock the client is about to take again, and make it lose it)."""
    channels = [c for c in client._route.channels() if c.server.port == service.port]
    return bool(channels) and sorted(k for k, _ in slots_of(service, channels[0].welcome.server_pid)) == sorted(keys)


def kill_lock_server(client: Client, service: Service) -> None:
    pid = lock_server_of(client, service)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), 5, f"lock server {pid} to die")


def assert_free(client: Client, data: Path, key: str = KEY) -> None:
    """``key`` becomes free for ``client`` within a second (an unlock travels without an answer)."""
    def free() -> bool:
        try:
            client.try_lock(data, key).release()
            return True
        except LockRefused:
            return False
    wait_for(free, 2, f"{key} to be free on {client.config.server}")


def test_a_lock_is_held_on_both_servers_and_released_on_both(tmp_path: Path) -> None:
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary) as client, \
            client_for(primary) as on_primary, client_for(secondary) as on_secondary:
        held = client.lock(data, KEY)
        for witness in (on_primary, on_secondary):
            holder = holder_of(witness, data, KEY)
            assert holder.client_pid == os.getpid(), holder
        held.release()
        assert_free(on_primary, data)
        assert_free(on_secondary, data)
        # and release_all on both
        client.lock(data, KEY)
        assert client.release_all() == 1
        assert_free(on_primary, data)
        assert_free(on_secondary, data)
    assert error_trace(primary) == "", "resilient mode with both servers answering logged an error"


def test_a_refusal_by_the_secondary_releases_the_primary_grant(tmp_path: Path) -> None:
    """A lock held on the secondary alone (by a client of that service only): the primary grants, the
    secondary refuses; the caller is refused and the primary's grant released, at once (no TIMEOUT stall)."""
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary) as client, \
            client_for(secondary) as on_secondary, client_for(primary) as on_primary:
        stray = on_secondary.lock(data, KEY)
        with pytest.raises(LockRefused, match=f"secondary lock service 127.0.0.1,{secondary.port}"):
            client.try_lock(data, KEY)
        assert_free(on_primary, data)
        start = time.monotonic()
        with pytest.raises(LockRefused):
            client.lock(data, KEY, timeout=1.0)
        assert time.monotonic() - start < 3.0
        assert_free(on_primary, data)
        stray.release()
        client.lock(data, KEY).release()


def test_the_lock_servers_of_two_clients_killed_on_opposite_services_cannot_split_them(tmp_path: Path) -> None:
    """The old split: A's secondary lock server and B's primary lock server are killed. Each connects again
    to the service it lost (A holds its lock there again), and B is refused A's lock on both services."""
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary) as a, \
            resilient(primary, secondary) as b, client_for(primary) as on_primary:
        told: list[HeldLock] = []
        held = a.lock(data, KEY, on_lost=told.append)
        b.lock(data, "warm-up").release()
        kill_lock_server(a, secondary)
        kill_lock_server(b, primary)
        wait_for(lambda: held_there(a, secondary, KEY), 5, "A to hold its lock on the secondary again")
        for _ in range(5):
            with pytest.raises(LockRefused):
                b.try_lock(data, KEY)
            time.sleep(0.1)
        with pytest.raises(LockRefused):
            b.lock(data, KEY, timeout=0.5)
        assert holder_of(on_primary, data, KEY).pid == lock_server_of(a, primary)
        assert not held.lost and not told
        held.release()
        b.lock(data, KEY).release()


def test_primary_process_group_killed_under_load(tmp_path: Path) -> None:
    """Four resilient clients hammer one counter; the primary's whole process group is killed.
    Every client carries on with the secondary alone, and the counter is exact."""
    with pair(tmp_path) as (primary, secondary), \
            crew(primary, tmp_path, seconds=4.0) as team, client_for(secondary) as witness:
        team.ready()
        team.go()
        time.sleep(1.2)
        before = read_counter(witness, team.counter)
        assert before > 0, "the clients made no progress before the kill"
        kill_group(primary)
        killed = time.monotonic()
        wait_for(lambda: read_counter(witness, team.counter) > before + 4, 3,
                 "the clients to carry on with the secondary")
        resumed = time.monotonic() - killed
        reports = team.finish()
        after = read_counter(witness, team.counter)
    assert all(r["error"] is None for r in reports), reports
    assert after > before
    assert_exact(reports, team.value())
    trace = error_trace(primary)
    for pid in (r["pid"] for r in reports):
        assert f"pid {pid}: Client: primary lock service 127.0.0.1,{primary.port} cannot be reached" in trace, trace
    assert f"going on with the secondary lock service 127.0.0.1,{secondary.port} alone" in trace, trace
    assert resumed < 2.0, f"the clients resumed {resumed:.2f} s after the kill"


def test_a_service_started_again_is_given_every_lock_the_client_holds(tmp_path: Path) -> None:
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary) as client, \
            client_for(primary) as on_primary:
        before = client.lock(data, "before")
        kill_group(secondary)
        during = client.lock(data, KEY)  # the secondary cannot be reached: on the primary alone
        assert holder_of(on_primary, data, KEY).client_pid == os.getpid()
        secondary.start()
        # The table shows the grants a moment before the client has read them and said so in its trace.
        wait_for(lambda: held_there(client, secondary, "before", KEY)
                 and f"taken again on secondary lock service 127.0.0.1,{secondary.port}" in error_trace(primary),
                 5, "both locks held on the secondary again, and the client's trace saying so")
        assert not before.lost and not during.lost
        before.release()
        during.release()
        assert_free(on_primary, data, KEY)
    trace = error_trace(primary)
    assert f"secondary lock service 127.0.0.1,{secondary.port} cannot be reached" in trace, trace
    # The service killed kept the lock it held (its table outlived it): reclaimed, not taken anew.
    assert f"1 lock(s) reclaimed on secondary lock service 127.0.0.1,{secondary.port}" in trace, trace
    assert f"1 lock(s) taken again on secondary lock service 127.0.0.1,{secondary.port}" in trace, trace


def test_no_service_left_loses_the_locks_and_the_next_request_after_a_restart_works(tmp_path: Path) -> None:
    data = data_file(tmp_path)
    with pair(tmp_path, "--lock-delay", "6") as (primary, secondary), resilient(primary, secondary) as client:
        lost = threading.Event()
        held = client.lock(data, KEY, on_lost=lambda _: lost.set())
        delays = [c.lock_delay for c in client._route.channels()]
        kill_group(secondary)
        kill_group(primary)
        with pytest.raises(ServiceUnavailable, match="no lock service can be reached"):
            client.lock(data, "other")
        assert lost.wait(max(delays) + 2), "the holder was not told"
        with pytest.raises(LockLost):
            held.release()
        primary.start()
        secondary.start()
        client.lock(data, "other").release()  # no close() needed


def test_a_lock_taken_again_is_one_lock_on_both_servers(tmp_path: Path) -> None:
    """Locking a record this client holds converts it on each server (which answers with the handle it
    gave before): the client keeps one lock, and one release frees it on both."""
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary) as client, \
            client_for(primary) as on_primary, client_for(secondary) as on_secondary:
        first = client.lock(data, KEY, Mode.PR)
        again = client.lock(data, KEY, Mode.EX)
        assert again.handle == first.handle
        assert [e["key"] for e in client.info.document()["locks"]] == [KEY]
        again.release()
        assert_free(on_primary, data)
        assert_free(on_secondary, data)
    assert error_trace(primary) == ""


def test_an_unreachable_secondary_at_start_leaves_the_primary_alone(tmp_path: Path) -> None:
    data = data_file(tmp_path)
    closed = free_port()
    with pair(tmp_path) as (primary, _secondary), \
            Client(Config(server=Server("127.0.0.1", primary.port), server2=Server("127.0.0.1", closed))) as client:
        client.lock(data, KEY).release()
    trace = error_trace(primary)
    assert f"secondary lock service 127.0.0.1,{closed} cannot be reached" in trace, trace


def test_a_lock_lost_where_it_is_taken_again_lets_nobody_in_before_its_holder_releases_it(tmp_path: Path) -> None:
    """One fault: client A cannot reach the primary for a while and takes KEY on the secondary alone. B,
    first on the primary once it is back, is granted KEY there and waits on the secondary. A's watcher is
    refused KEY on the primary: A's lock is lost, A is told; but B is granted only once A releases it."""
    data = data_file(tmp_path)
    primary_for_a = threading.Event()
    with pair(tmp_path) as (primary, secondary):

        def connect_a(server: Server, timeout: float) -> socket.socket:
            if server.port == primary.port and not primary_for_a.is_set():
                raise ConnectionRefusedError("the primary cannot be reached (the test's fault)")
            return socket.create_connection((server.host, server.port), timeout=timeout)

        a = Client(Config(server=Server("127.0.0.1", primary.port), server2=Server("127.0.0.1", secondary.port),
                          timeout=10), connect=connect_a)
        with a, resilient(primary, secondary, timeout=30) as b:
            lost = threading.Event()
            held = a.lock(data, KEY, on_lost=lambda _: lost.set())
            granted: list[HeldLock] = []
            waiter = threading.Thread(target=lambda: granted.append(b.lock(data, KEY, timeout=20)), daemon=True)
            waiter.start()
            wait_for(lambda: held_there(b, primary, KEY), 5, "B granted KEY on the primary, waiting on the secondary")
            primary_for_a.set()
            assert lost.wait(5), "A was not told"
            waiter.join(1.0)
            assert not granted, "B was let in while A, just told, may still be inside its critical section"
            assert held_there(a, secondary, KEY)
            with pytest.raises(LockLost, match="refused to take it again"):
                held.release()
            waiter.join(10)
            assert granted and not granted[0].lost, "B was not granted once A released"
            assert held_there(b, secondary, KEY)
            granted[0].release()

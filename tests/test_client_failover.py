"""Client resilience (JDLS SERVER2) with two real lock services, as the guide's rules have it.

Every test runs a primary and a secondary service, each with its own instance
and port, and kills one or both with SIGKILL of their whole process group
(monitor, listener and lock servers), as a failed lock server host would.
What is checked:

- a lock is taken on the primary and then on the secondary, released on both;
- the primary killed under load: every client carries on against the promoted
  secondary, no lock is ever granted to two owners (a counter incremented under
  the lock is exact), the error trace names the failure and the promotion, and
  the failover costs a lock request well under a second;
- the secondary killed: the process goes on with the primary alone;
- a failed server restarted on its port is never contacted again;
- with no server left the process is told (ServiceLost), on every request;
- a difference between the two answers is logged;
- a secondary that cannot be reached at start: the primary alone, logged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dls_client import Client, Config, LockRefused, Mode, Server, ServiceLost
from dls_testkit import (
    KEY,
    Service,
    assert_exact,
    client_for,
    crew,
    data_file,
    free_port,
    holder_of,
    make_service,
    read_counter,
    wait_for,
)


@pytest.fixture(autouse=True)
def _own_error_trace(instance_of_the_test: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's clients write their error trace into the primary's instance, not /var/tmp/dls."""
    monkeypatch.setenv("JBCRELEASEDIR", str(tmp_path / "primary" / "release"))


@contextlib.contextmanager
def pair(tmp_path: Path) -> Iterator[tuple[Service, Service]]:
    """A primary and a secondary service; clients started with the primary's env use both."""
    primary = make_service(tmp_path / "primary")
    secondary = make_service(tmp_path / "secondary")
    assert os.environ["JBCRELEASEDIR"] == str(primary.root)
    try:
        primary.start()
        secondary.start()
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

    def gone() -> bool:
        return all(p.status() == psutil.STATUS_ZOMBIE for p in psutil.process_iter() if _pgid(p.pid) in groups)
    wait_for(gone, 5, f"the processes of the service on port {service.port} to end")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def error_trace(service: Service) -> str:
    path = service.root / "tmp" / "jbase_error_trace"
    return path.read_text() if path.exists() else ""


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


def test_primary_process_group_killed_under_load(tmp_path: Path) -> None:
    """Four resilient clients hammer one counter; the primary's whole process group is killed.
    Every client carries on against the secondary, and the counter is exact."""
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
                 "the clients to carry on against the secondary")
        resumed = time.monotonic() - killed
        reports = team.finish()
        after = read_counter(witness, team.counter)
    assert all(r["error"] is None for r in reports), reports
    assert after > before
    assert_exact(reports, team.value())
    trace = error_trace(primary)
    for pid in (r["pid"] for r in reports):
        assert f"pid {pid}: Client: primary lock service 127.0.0.1,{primary.port} lost" in trace, trace
        assert f"pid {pid}: Client: secondary 127.0.0.1,{secondary.port} promoted to primary" not in trace
    assert f"secondary 127.0.0.1,{secondary.port} promoted to primary, no longer resilient" in trace, trace
    assert resumed < 2.0, f"the clients resumed {resumed:.2f} s after the kill"


def test_failover_costs_a_request_well_under_a_second(tmp_path: Path) -> None:
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary) as client, \
            client_for(secondary) as on_secondary:
        held = client.lock(data, "before")
        kill_group(primary)
        start = time.monotonic()
        after = client.lock(data, KEY)  # the primary's death is found here: promotion, then the secondary
        cost = time.monotonic() - start
        assert cost < 1.0, f"the first lock request after the primary died took {cost:.3f} s"
        for key in ("before", KEY):  # both locks are held on the promoted secondary
            assert holder_of(on_secondary, data, key).client_pid == os.getpid()
        held.release()
        after.release()
        assert_free(on_secondary, data, "before")
        assert_free(on_secondary, data, KEY)
        # A restarted primary is never contacted again: this client's next lock is not there.
        primary.start()
        with client_for(primary) as on_restarted:
            again = client.lock(data, KEY)
            on_restarted.try_lock(data, KEY).release()
            again.release()
    assert "promoted to primary" in error_trace(primary)


def test_secondary_lost_the_process_goes_on_with_the_primary(tmp_path: Path) -> None:
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary) as client, \
            client_for(primary) as on_primary:
        held = client.lock(data, "before")
        kill_group(secondary)
        client.lock(data, KEY).release()  # the secondary's death is found here, after the primary granted
        held.release()
        assert_free(on_primary, data, "before")
        secondary.start()  # restarted on its port: never contacted again
        with client_for(secondary) as on_restarted:
            held = client.lock(data, KEY)
            assert holder_of(on_primary, data, KEY).client_pid == os.getpid()
            on_restarted.try_lock(data, KEY).release()
            held.release()
    trace = error_trace(primary)
    assert f"secondary lock service 127.0.0.1,{secondary.port} lost" in trace, trace
    assert "no longer resilient" in trace


def test_no_server_left_the_process_is_told_to_wrap_up(tmp_path: Path) -> None:
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary) as client:
        client.lock(data, KEY)
        kill_group(secondary)
        kill_group(primary)
        with pytest.raises(ServiceLost, match="no lock service left") as lost:
            client.lock(data, "other")
        assert f"127.0.0.1,{primary.port}" in str(lost.value) and f"127.0.0.1,{secondary.port}" in str(lost.value)
        with pytest.raises(ServiceLost):
            client.lock(data, "again")
        with pytest.raises(ServiceLost):
            client.status(data, KEY)
        client.close()
    assert "this process must wrap up" in error_trace(primary)


def test_a_different_answer_from_the_secondary_is_logged(tmp_path: Path) -> None:
    """A lock held on the secondary alone (by a client of that server only): the primary grants, the
    secondary does not within TIMEOUT; the difference is logged and the primary's answer stands."""
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary, timeout=1.0) as client, \
            client_for(secondary) as on_secondary, client_for(primary) as on_primary:
        stray = on_secondary.lock(data, KEY)
        held = client.lock(data, KEY)
        assert holder_of(on_primary, data, KEY).client_pid == os.getpid()
        held.release()
        stray.release()
    trace = error_trace(primary)
    assert "lock responses differ" in trace and f"primary 127.0.0.1,{primary.port} granted" in trace, trace


def test_an_unreachable_secondary_at_start_leaves_the_primary_alone(tmp_path: Path) -> None:
    data = data_file(tmp_path)
    closed = free_port()
    with pair(tmp_path) as (primary, _secondary), \
            Client(Config(server=Server("127.0.0.1", primary.port), server2=Server("127.0.0.1", closed))) as client:
        client.lock(data, KEY).release()
    trace = error_trace(primary)
    assert f"secondary lock service 127.0.0.1,{closed} cannot be reached" in trace, trace


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


def test_a_secondary_found_dead_while_publishing_is_dropped(tmp_path: Path) -> None:
    """A dead secondary found by publish_info is dropped and logged, not reported to the application."""
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary) as client:
        kept = client.lock(data, "kept")
        kill_group(secondary)
        for _ in range(2):  # the first send to the dead peer is taken by the kernel; its reset fails the next
            client.info.changed = True
            assert client.publish_info()  # to the primary; the secondary's failure is only logged
            time.sleep(0.2)
        assert f"secondary lock service 127.0.0.1,{secondary.port} lost" in error_trace(primary)
        kept.release()


def test_a_primary_found_dead_by_an_unlock_is_replaced_at_once(tmp_path: Path) -> None:
    """A dead primary found by an unlock promotes the secondary, which is then told what the client holds
    (proc/info), and the next request goes straight to it."""
    data = data_file(tmp_path)
    with pair(tmp_path) as (primary, secondary), resilient(primary, secondary) as client:
        kept, gone = client.lock(data, "kept"), client.lock(data, "gone")
        kill_group(primary)
        time.sleep(0.2)  # the connection's end reaches this side
        gone.release()  # sends on the dead primary: found here or by the next request
        start = time.monotonic()
        assert client.status(data, "kept")[0] == 1  # answered by the promoted secondary
        assert time.monotonic() - start < 1.0
        document = secondary.root / "proc" / "info" / str(client.port)
        wait_for(lambda: document.exists() and "kept" in document.read_text(), 5,
                 "the promoted secondary to have the client's lock information")
        kept.release()


def test_servers_unreachable_at_start_are_not_named_again_once_they_answer(tmp_path: Path) -> None:
    """Servers that cannot be reached when the client connects: each request tries them again and its
    ServiceLost names each server once (not once per attempt so far); once they answer and are later
    lost, the wrap-up names what failed then, not the refused connections of before."""
    data = data_file(tmp_path)
    primary = make_service(tmp_path / "primary")
    secondary = make_service(tmp_path / "secondary")
    with primary.checked(), secondary.checked():
        client = resilient(primary, secondary)
        for _ in range(3):
            with pytest.raises(ServiceLost, match="no lock service can be reached") as unreachable:
                client.lock(data, KEY)
            assert str(unreachable.value).count("Connection refused") == 2, unreachable.value
        ports = primary.port, secondary.port
        primary.start()
        secondary.start()
        if (primary.port, secondary.port) != ports:
            pytest.skip("a port the client was given was taken meanwhile")
        client.lock(data, KEY)
        kill_group(primary)
        kill_group(secondary)
        with pytest.raises(ServiceLost, match="no lock service left") as lost:
            client.lock(data, "other")
        assert "Connection refused" not in str(lost.value), lost.value
        client.close()

"""Resilience with real processes: clients, hosts and daemons that die or vanish while locks are in use.

- A client host cut off without a word (a network namespace whose link goes
  down, its client frozen) is given up within the dead-client bound: its lock
  server ends, keeping the client's locks for the lock-delay (the client may
  live and come back to reclaim them), and they are freed after it.
- A lock server, the listener or the monitor killed with SIGKILL while four
  clients hammer one record lock: the others carry on, no lock is ever granted
  to two owners at once (a counter incremented under the lock is exact), and no
  lock is left to a dead owner beyond the lock-delay.
- A lock server whose client process ends (normally or by SIGKILL) releases
  the client's locks and exits at once.

Every test has its own instance and port; its teardown (the harness's ``Service.stop_and_check``,
from conftest.py) fails it if a process or IPC resource of the instance is left,
and a namespace made here is deleted (and checked gone) whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netns
import psutil
import pytest
from dls_client import ServiceUnavailable
from dls_shm import SlotState
from dls_testkit import (
    KEY,
    Service,
    alive,
    assert_exact,
    attached,
    client_for,
    crew,
    data_file,
    header_line,
    holder_of,
    read_counter,
    running,
    running_service,
    slots_of,
    wait_for,
    wait_free,
)

#: The daemon's default dead-client bound (seconds).
DEFAULT_DEAD_CLIENT_BOUND = 15.0
#: What the bound may be exceeded by (the last exchange before the cut, polling, a loaded machine).
SLACK = 5.0
#: The lock-delay of these tests (seconds): how long the locks of a lock server that ended while its client
#: may live are kept before anyone else gets them.
LOCK_DELAY = 2.0
#: How late after its lock-delay a kept lock may be freed (the monitor looks every second; a busy machine).
LATE = 1.5


# -- a service of the test's own, with a short tidy period --------------------------------------


@pytest.fixture
def tidy_service(tmp_path: Path) -> Iterator[Service]:
    """Like ``service``, with the monitor tidying every second (``--tidy-seconds 1``) and a short lock-delay."""
    with running_service(tmp_path / "release", "--tidy-seconds", "1", "--lock-delay", f"{LOCK_DELAY:g}") as svc:
        yield svc


def dead_client_setting() -> tuple[tuple[str, ...], float, float]:
    """jdls options for the dead-client bound, the bound, and the slack allowed over it:
    ``--dead-client 6`` once jdls has the option, else its default of 15 s."""
    shown = subprocess.run([sys.executable, "-m", "dls_daemon", "-h"], capture_output=True, text=True, timeout=30)
    if "--dead-client" in shown.stdout:
        return ("--dead-client", "6"), 6.0, 4.0
    return (), DEFAULT_DEAD_CLIENT_BOUND, SLACK


@pytest.fixture
def remote_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Service, float, float]]:
    """A service listening on every address (the default); with the parameter True, with the shortest
    dead-client bound of these tests, if jdls has the option. (The service, the bound, the slack.)"""
    options, bound, slack = dead_client_setting() if request.param else ((), DEFAULT_DEAD_CLIENT_BOUND, SLACK)
    with running_service(tmp_path / "release", *options, "--lock-delay", f"{LOCK_DELAY:g}") as svc:
        yield svc, bound, slack


# -- 1. a client host cut off without a FIN -----------------------------------------------------

REMOTE = textwrap.dedent("""
    import os, sys, time
    from dls_client import Client, LockRefused

    path, key, marker, wanted = sys.argv[1:5]
    client = Client()
    client.lock(path, key)
    welcome = client.connect().welcome
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {welcome.server_pid} {welcome.peer}")
    os.replace(tmp, marker)
    if wanted != "-":
        client.lock(path, wanted)  # held by another: waits (the server sends interim messages meanwhile)
    time.sleep(600)
""")


@contextlib.contextmanager
def remote_client(service: Service, link: Any, data: Path, marker: Path,
                  wanted: str = "-") -> Iterator[tuple[subprocess.Popen[bytes], int, int, str]]:
    """A client process in the namespace holding KEY (and waiting for ``wanted``):
    (the process, its pid as it reported it, its lock server's pid, its address as the server saw it)."""
    env = dict(service.env, JDLS=f"SERVER={link.host_ip},{service.port}")
    proc = subprocess.Popen(link.command(sys.executable, "-c", REMOTE, str(data), KEY, str(marker), wanted),
                            env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with running(proc):
        wait_for(lambda: marker.exists() or proc.poll() is not None, 15, "the client in the namespace to lock")
        if proc.poll() is not None:
            assert proc.stderr is not None
            raise AssertionError(f"the client in namespace {link.name} ended ({proc.returncode}) before it held "
                                 f"its lock: {proc.stderr.read().decode(errors='replace')}")
        pid, server, peer = marker.read_text().split()
        assert int(pid) == proc.pid, "ip netns exec did not exec the client (the pid to freeze is not its own)"
        yield proc, int(pid), int(server), peer


def tcp_state(port: int, peer: str) -> str:
    """What ``ss`` says of the daemon's connections on ``port`` with ``peer`` (for failure messages)."""
    shown = subprocess.run(["ss", "-tnoi", "state", "all", f"( sport = :{port} and dst {peer} )"],
                           capture_output=True, text=True)
    return " ".join(shown.stdout.split()) or shown.stderr


def unacknowledged(port: int, peer: str) -> int | None:
    """Bytes the daemon sent on its connection with ``peer`` that are not acknowledged yet (Send-Q)."""
    shown = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} and dst {peer} )"],
                           capture_output=True, text=True)
    lines = [line.split() for line in shown.stdout.splitlines() if line.strip()]
    return int(lines[0][1]) if len(lines) == 1 else None


def _cut_off(service: Service, link: Any, proc: subprocess.Popen[bytes]) -> tuple[float, str]:
    """Freeze the client (it cannot react), wait until the daemon's side of its connection has
    nothing unacknowledged, then pull the cable; the time of the cut, and ``ss``'s view just before."""
    os.kill(proc.pid, signal.SIGSTOP)
    wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED, 5, "the client to stop")
    wait_for(lambda: unacknowledged(service.port, link.ns_ip) == 0, 5,
             f"the connection to be quiet: {tcp_state(service.port, link.ns_ip)}")
    before = tcp_state(service.port, link.ns_ip)
    link.cut()
    return time.monotonic(), before


@pytest.mark.parametrize(("remote_service", "state"), [(False, "idle"), (True, "idle"), (True, "waiting")],
                         indirect=["remote_service"], ids=["idle-default-bound", "idle-dead-client-6",
                                                           "waiting-dead-client-6"])
def test_client_host_cut_off_without_fin_is_given_up_within_the_bound_and_its_locks_kept_for_the_delay(
        remote_service: tuple[Service, float, float], tmp_path: Path, state: str) -> None:
    """A client in a namespace holds a lock, and (``waiting``) waits for one held here, so that its lock
    server sends it interim messages; it is frozen and its link goes down: no FIN, no RST, nothing.
    Its lock server must notice within the bound (the default, or ``--dead-client 6``), drop its
    requests, keep its locks (the client may be alive: it could come back and reclaim them), and end;
    nobody else gets them before the lock-delay has passed, and they are freed soon after."""
    service, bound, slack = remote_service
    data = data_file(tmp_path)
    made: list[Any] = []
    try:
        with netns.link() as link, client_for(service) as local:
            made.append(link)
            wanted = local.lock(data, "wanted") if state == "waiting" else None
            marker = tmp_path / "remote-held"
            with remote_client(service, link, data, marker, "wanted" if wanted else "-") as (proc, pid, server, peer):
                assert peer == link.ns_ip, f"the server saw the client at {peer}, not {link.ns_ip}"
                assert server in service.server_pids()
                holder = holder_of(local, data, KEY)
                assert (holder.ip, holder.client_pid, holder.pid) == (link.ns_ip, pid, server), holder
                expected = [(KEY, SlotState.GRANTED)] + ([("wanted", SlotState.WAITING)] if wanted else [])
                wait_for(lambda: sorted(slots_of(service, server)) == sorted(expected), 5,
                         f"{expected} of the client in the namespace in the table", poll=0.05)

                cut, before = _cut_off(service, link, proc)
                while (alive(server) or server in service.server_pids()) and time.monotonic() - cut <= bound + slack:
                    time.sleep(0.1)
                detected = time.monotonic() - cut
                after, in_flight = tcp_state(service.port, link.ns_ip), unacknowledged(service.port, link.ns_ip)
                why = (f"{in_flight} bytes it sent after the cut are unacknowledged: the kernel retransmits them "
                       "(for many minutes), and keepalive does not probe while data is in flight; "
                       if in_flight else "")
                assert not alive(server), (
                    f"the lock server {server} of a client host cut off {detected:.1f} s ago still runs "
                    f"(bound {bound:g} s + {slack:g} s slack), and has {slots_of(service, server)} in the table; "
                    f"{why}its connection before the cut: {before}; now: {after}")
                # Kept by its lock server, which noticed and ended; its request is gone.
                assert slots_of(service, server) == [(KEY, SlotState.KEPT)]
                line = service.wait_for_log(r" server INFO kept 1 lock\(s\) of " + re.escape(f"{link.ns_ip}:")
                                            + r"\d+ " + re.escape(f"(port {pid}, pid {pid}) for {LOCK_DELAY:g} s"))
                assert line
                with attached(service) as table:
                    [kept] = [e.slot.timestamp for e in table.scan() if e.slot.state == SlotState.KEPT]
                elapsed = wait_free(local, data, KEY, LOCK_DELAY + slack, poll=0.05)
                freed = time.time()
                assert freed >= kept + LOCK_DELAY, f"freed {kept + LOCK_DELAY - freed:.2f} s before the lock-delay"
                assert freed <= kept + LOCK_DELAY + LATE, (
                    f"still held {freed - kept:.1f} s after it was kept ({elapsed:.1f} s after its lock server "
                    f"ended), lock-delay {LOCK_DELAY:g} s")
            if wanted is not None:
                wanted.release()
        ended = [line for line in service.log().splitlines() if " server " in line and f" {link.ns_ip}:" in line
                 and any(word in line for word in ("closed", "lost", "closing"))]
        assert ended and not any("no Hello" in line for line in ended), (
            f"the locks were kept in time ({detected:.1f} s), but the lock server logged the end of a client "
            f"that had said Hello long before as a handshake timeout: {ended}")
    finally:
        left = [link for link in made if link.exists()]
        assert not left, f"network namespace or veth left behind: {left}"
    assert not any(name.startswith(f"{netns.PREFIX}-{os.getpid()}-") for name in netns.namespaces()), \
        netns.namespaces()


# -- 2. SIGKILL of a lock server under load -----------------------------------------------------


def test_sigkill_of_a_lock_server_under_load(tidy_service: Service, tmp_path: Path) -> None:
    service = tidy_service
    d = tmp_path / "crew"
    victim_files = {"hold": "victim-held", "pause": str(d / "pause"), "paused": str(d / "paused"),
                    "resume": str(d / "resume")}
    with crew(service, tmp_path, extra={0: victim_files}) as team, client_for(service) as witness:
        first = team.ready()
        servers = [r["server"] for r in first]
        listed = service.server_pids()
        assert set(servers) <= listed, f"lock servers {servers} not all in run/servers ({listed})"
        victim_server = servers[0]
        assert holder_of(witness, team.counter, "victim-held").pid == victim_server

        team.go()
        time.sleep(0.8)
        Path(victim_files["pause"]).touch()
        wait_for(lambda: os.path.exists(victim_files["paused"]), 5, "the victim to pause between cycles")
        before = read_counter(witness, team.counter)
        os.kill(victim_server, signal.SIGKILL)
        killed = time.monotonic()
        Path(victim_files["resume"]).touch()

        # The listener keeps what the dead lock server held when it reaps it (its client may live), and the
        # monitor frees it when the lock-delay has passed; nobody else asks for it meanwhile.
        wait_for(lambda: slots_of(service, victim_server) == [("victim-held", SlotState.KEPT)], 2,
                 "the killed lock server's lock to be kept", poll=0.05)
        holder_of(witness, team.counter, "victim-held")
        wait_for(lambda: not slots_of(service, victim_server), LOCK_DELAY + 5,
                 "the killed lock server's locks to be freed", poll=0.05)
        freed = time.monotonic() - killed
        assert LOCK_DELAY <= freed < LOCK_DELAY + LATE, f"the killed lock server's locks were freed after {freed:.1f} s"
        witness.try_lock(team.counter, "victim-held").release()
        service.wait_for_log(r" monitor INFO tidy \([^)]*\): freed \d+ orphaned lock\(s\)")
        assert read_counter(witness, team.counter) > before, "the other clients stopped when one lock server died"

        reports = team.finish()
        shown = service.jdls("-dvL")
        assert shown.returncode == 0, shown.stderr
    # The victim's next request connected again by itself (a new lock server), and it carried on.
    assert all(r["error"] is None and r["cycles"] > 0 for r in reports), reports
    assert_exact(reports, team.value())
    assert int(header_line(shown.stdout, "Tidy-up operations")) >= 1, shown.stdout
    assert header_line(shown.stdout, "Time last tidied up") != "never", shown.stdout
    assert f"\t{victim_server}\t" not in shown.stdout, shown.stdout
    wait_for(lambda: victim_server not in service.server_pids(), 2, "the killed lock server's pid file to go")


# -- 3. SIGKILL of the listener under load ------------------------------------------------------


def test_sigkill_of_the_listener_under_load(service: Service, tmp_path: Path) -> None:
    listener = service.pid("listener")
    assert listener is not None
    with crew(service, tmp_path) as team, client_for(service) as witness:
        servers = [r["server"] for r in team.ready()]
        assert witness.echo(b"connected before the kill")[0]
        team.go()
        time.sleep(0.5)
        os.kill(listener, signal.SIGKILL)
        wait_for(lambda: not alive(listener), 5, "the listener to die")
        at_kill = read_counter(witness, team.counter)

        with pytest.raises(ServiceUnavailable), client_for(service, timeout=2) as newcomer:
            newcomer.echo(b"no listener")
        shown = service.jdls("-d")
        assert header_line(shown.stdout, "Lock listener at pid").endswith("Inactive"), shown.stdout
        time.sleep(0.5)
        assert read_counter(witness, team.counter) > at_kill, "connected clients stopped with the listener"
        assert all(alive(pid) for pid in servers), "a lock server died with the listener"

        restart = service.jdls("-ibD", "--port", str(service.port))
        assert restart.returncode == 0, restart.stderr + restart.stdout
        new_listener = service.pid("listener")
        assert new_listener not in (None, listener) and alive(new_listener)
        shown = service.jdls("-d")
        assert header_line(shown.stdout, "Lock listener at pid") == f"{new_listener} - Active", shown.stdout
        with client_for(service) as newcomer:
            assert newcomer.echo(b"listener back")[0] == b"listener back"
            newcomer.lock(team.counter, "newcomer").release()
        reports = team.finish()
    assert all(r["error"] is None and r["cycles"] > 0 for r in reports), reports
    assert [r["server"] for r in reports] == servers
    assert_exact(reports, team.value())


# -- 4. SIGKILL of the monitor under load -------------------------------------------------------


def test_sigkill_of_the_monitor_under_load(service: Service, tmp_path: Path) -> None:
    monitor = service.pid("monitor")
    assert monitor is not None
    with attached(service) as table:
        geometry, shm_id = table.geometry, table.shm_id
    with crew(service, tmp_path) as team, client_for(service) as witness, client_for(service) as keeper:
        servers = [r["server"] for r in team.ready()]
        kept = keeper.lock(team.counter, "kept")
        assert witness.echo(b"connected before the kill")[0]
        team.go()
        time.sleep(0.5)
        os.kill(monitor, signal.SIGKILL)
        wait_for(lambda: not alive(monitor), 5, "the monitor to die")
        at_kill = read_counter(witness, team.counter)
        time.sleep(0.5)
        assert read_counter(witness, team.counter) > at_kill, "connected clients stopped with the monitor"
        shown = service.jdls("-dv")
        assert header_line(shown.stdout, "Lock monitor at pid").endswith("Inactive"), shown.stdout

        restart = service.jdls("-ibA")
        assert restart.returncode == 0, restart.stderr + restart.stdout
        assert "attached" in restart.stdout and "created" not in restart.stdout, restart.stdout
        assert "warning" not in restart.stderr, restart.stderr
        new_monitor = service.pid("monitor")
        assert new_monitor not in (None, monitor) and alive(new_monitor)
        shown = service.jdls("-d")
        assert header_line(shown.stdout, "Lock monitor at pid") == f"{new_monitor} - Active", shown.stdout
        with attached(service) as table:
            assert (table.geometry, table.shm_id) == (geometry, shm_id), "the restarted monitor made a new table"
        # Its tidy on start left the locks of live owners alone.
        assert holder_of(witness, team.counter, "kept").client_pid == os.getpid()
        with client_for(service) as newcomer:
            newcomer.lock(team.counter, "newcomer").release()
        reports = team.finish()
        kept.release()
    assert all(r["error"] is None and r["cycles"] > 0 for r in reports), reports
    assert [r["server"] for r in reports] == servers
    assert_exact(reports, team.value())


# -- 5. a lock server whose client process ends ---------------------------------------------------

LEAVER = textwrap.dedent("""
    import os, sys, time
    from dls_client import Client

    path, marker, how = sys.argv[1:4]
    client = Client()
    for key in ("one", "two", "three"):
        client.lock(path, key)
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(client.connect().welcome.server_pid))
    os.replace(tmp, marker)
    if how == "exit":
        while not os.path.exists(marker + ".go"):
            time.sleep(0.005)
        sys.exit(0)  # without releasing or closing anything
    time.sleep(600)
""")


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_lock_server_of_an_ended_client_releases_and_exits(service: Service, tmp_path: Path, how: str) -> None:
    data = data_file(tmp_path)
    marker = tmp_path / "leaver"
    proc = subprocess.Popen([sys.executable, "-c", LEAVER, str(data), str(marker), how], env=service.env,
                            stdin=subprocess.DEVNULL)
    with running(proc):
        wait_for(lambda: marker.exists() or proc.poll() is not None, 15, "the client to take its locks")
        assert proc.poll() is None, f"the client ended early ({proc.returncode})"
        server = int(marker.read_text())
        assert server in service.server_pids()
        assert sorted(slots_of(service, server)) == sorted((k, SlotState.GRANTED) for k in ("one", "two", "three"))
        if how == "exit":
            Path(str(marker) + ".go").touch()
            assert proc.wait(timeout=5) == 0
        else:
            proc.kill()
            proc.wait(timeout=5)
        ended = time.monotonic()
    wait_for(lambda: server not in service.server_pids() and not alive(server), 1.0,
             f"the lock server {server} to exit within 1 s of its client ({how})")
    took = time.monotonic() - ended
    assert slots_of(service, server) == [], "the lock server exited leaving its client's locks"
    with client_for(service) as other:
        for key in ("one", "two", "three"):
            other.try_lock(data, key).release()
    service.wait_for_log(r" server INFO released 3 lock\(s\) of 127\.0\.0\.1:\d+ " + re.escape(f"(port {proc.pid}"))
    assert took < 1.0

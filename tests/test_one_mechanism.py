"""One mechanism per instance, end to end: ``jdls -ibD``, ``-ibA``, ``-kA``, ``-kD`` and ``-ib`` as real
programs, in the orders an operator might run them, with a local process (a LocalClient) and a remote
client (a Client through the listener) holding the same record.

The rule (docs/DESIGN.md, "One mechanism per instance"): a monitor makes no table while OS file locks
serve the instance (a listener started without a table, lock servers that run without one, an OS lock
held in the lock directory), and says which and what to do; a local process that holds no OS lock
follows a table made later; a remote client's lock server without a table refuses once one exists.
After every step the two holders are checked: whoever holds the record, the other is refused.

Clients are "agents": processes of their own that obey one command per line (lock, release, wait) and
answer one line each, so that a test can interleave them with jdls commands. Every agent is ended
before the service is stopped and checked (``Service.stop_and_check``: no process, no IPC left).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dls_shm import Grant, LockTable, Owner, command_line, geometry_for
from dls_testkit import KEY, Service, ipc_left, make_service, wait_for

#: A client process obeying one command per line: ``lock K``, ``release K``, ``wait K``, ``quit``.
AGENT = textwrap.dedent("""\
    import sys
    from dls_client import Client, DlsError, LocalClient, LockRefused
    kind, path = sys.argv[1], sys.argv[2]
    client = LocalClient(lock_dir=sys.argv[3]) if kind == "local" and len(sys.argv) > 3 else \\
        LocalClient() if kind == "local" else Client()
    held = {}
    def mechanism():
        return client.mechanism if kind == "local" else "remote"
    print("ready", mechanism(), flush=True)
    for line in sys.stdin:
        command, _, key = line.strip().partition(" ")
        try:
            if command == "lock":
                held[key] = client.try_lock(path, key)
                out = "held " + mechanism()
            elif command == "wait":
                held[key] = client.lock(path, key, timeout=20)
                out = "held " + mechanism()
            elif command == "release":
                held.pop(key).release()
                client.status(path, key)  # the release has been done by the time this answers
                out = "released"
            else:
                break
        except LockRefused as exc:
            out = f"refused {exc.holder.client_pid or exc.holder.pid}"
        except DlsError as exc:
            out = f"error {type(exc).__name__}: {exc}"
        print(out, flush=True)
""")

#: A local process taking and releasing one record in a loop until a line comes on stdin, marking each
#: critical section with a file made O_EXCL; then it prints what it counted (JSON).
LOOPER = textwrap.dedent("""\
    import json, os, select, sys, time
    from dls_client import DlsError, LocalClient, LockRefused
    path, key, marker = sys.argv[1:4]
    client = LocalClient()
    counts = {"oslocks": 0, "table": 0, "overlaps": 0, "errors": []}
    print("looping", flush=True)
    while not select.select([sys.stdin], [], [], 0)[0]:
        try:
            held = client.try_lock(path, key)
        except LockRefused:
            time.sleep(0.0005)
            continue
        except DlsError as exc:  # its table removed under it while it held nothing there: a new client
            counts["errors"].append(str(exc))
            client = LocalClient()
            continue
        counts[client.mechanism] += 1
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            counts["overlaps"] += 1
        else:
            time.sleep(0.004)  # held most of the time, so that a monitor starting sees it often enough
            os.unlink(marker)
        try:
            held.release()
        except DlsError as exc:
            counts["errors"].append(str(exc))
            client = LocalClient()
        time.sleep(0.002)
    print(json.dumps(counts), flush=True)
""")

#: How long an agent's answer may take.
ANSWER = 30.0
#: Rounds of a real monitor starting while a local process takes OS locks: until it has both refused and
#: started (twice), at most this many.
RACE_ROUNDS = 20


class Agent:
    """A client process of the test (see AGENT); ``ask`` sends a command and returns its one-line answer."""

    def __init__(self, svc: Service, kind: str, data: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        env = dict(svc.env) if env is None else env
        self.proc = subprocess.Popen([sys.executable, "-c", AGENT, kind, str(data), *extra], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.proc.pid
        self.started = self.answer()

    def answer(self, timeout: float = ANSWER) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.end()
            raise AssertionError(f"agent {self.pid} said nothing: {self.proc.communicate(timeout=10)[1]}")
        return line.strip()

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def ask(self, command: str) -> str:
        self.send(command)
        return self.answer()

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    """A service of the test's own, not started; clients (agents) find it through JDLS in its environment."""
    with make_service(tmp_path, start_options=()).checked() as service:
        yield service


@pytest.fixture
def agents(svc: Service, tmp_path: Path) -> Iterator[list[Agent]]:
    """Started with ``agent(kind)``; every one is ended before the service is stopped and checked."""
    made: list[Agent] = []
    yield made
    for agent in made:
        agent.end()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "FBNK.ACCOUNT"
    path.touch()
    return path


def agent(made: list[Agent], svc: Service, kind: str, data: Path, *extra: str,
          env: dict[str, str] | None = None) -> Agent:
    made.append(Agent(svc, kind, data, *extra, env=env))
    return made[-1]


def jdls(svc: Service, *args: str) -> subprocess.CompletedProcess[str]:
    """``jdls ARGS`` (with the service's port for a listener); a failure must be told without a traceback."""
    port = ("--port", str(svc.port)) if args[0].startswith("-i") and "A" not in args[0] else ()
    result = svc.jdls(*args, *port)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def started(svc: Service, *args: str) -> str:
    result = jdls(svc, *args)
    assert result.returncode == 0, f"jdls {' '.join(args)}: {result.stderr}"
    return result.stdout


def refused(svc: Service, *args: str) -> str:
    """``jdls ARGS`` must fail (exit 1) and leave no table; what it said."""
    result = jdls(svc, *args)
    assert result.returncode == 1, f"jdls {' '.join(args)} did not refuse: {result.stdout}"
    assert ipc_left(svc.key) == [], f"jdls {' '.join(args)} refused but left a table"
    return result.stderr.strip()


def exclusive(holder: Agent, other: Agent, who: int) -> None:
    """``holder`` holds KEY; ``other`` is refused, told the holder ``who`` (a pid)."""
    assert other.ask(f"lock {KEY}") == f"refused {who}"


def listener_pid(svc: Service) -> int:
    pid = svc.pid("listener")
    assert pid is not None
    return pid


def os_locks_held(svc: Service, pid: int) -> str:
    """The start of the refusal naming ``pid`` as the holder of OS locks."""
    return f"jdls: OS file locks in {svc.lock_dir} are held by pid {pid} ("


AFTER_HOLDERS = ("1 lock): they serve the instance without a table, and a table now would grant their records "
                 "again: have them released (or stop those processes), then start the monitor again")


# -- the orders ---------------------------------------------------------------------------------


def test_a_listener_without_a_table_refuses_a_monitor_started_after_it(
        svc: Service, agents: list[Agent], data: Path) -> None:
    """-ibD, local holder, remote client; -ibA and -ib refused; -kA changes nothing."""
    assert "OS file locks" in started(svc, "-ibD")
    local = agent(agents, svc, "local", data)
    remote = agent(agents, svc, "remote", data)
    assert local.started == "ready oslocks"
    assert local.ask(f"lock {KEY}") == "held oslocks"
    exclusive(local, remote, local.pid)
    listener = listener_pid(svc)
    told = (f"jdls: the lock listener (pid {listener}) runs without a lock table: it serves the instance with OS "
            "file locks, and a table now would be a second mechanism beside them: stop the service (jdls -k), then "
            "start it with its table (jdls -ib)")
    assert refused(svc, "-ibA") == told
    assert refused(svc, "-ib") == f"jdls: lock listener already running at pid {listener}"
    assert started(svc, "-kA") == "jdls: lock monitor is not running\n"
    exclusive(local, remote, local.pid)
    assert local.ask(f"release {KEY}") == "released"
    assert remote.ask(f"lock {KEY}") == "held remote"
    server = svc.server_pids()
    assert len(server) == 1
    exclusive(remote, local, next(iter(server)))  # an OS lock names the process that took it: the lock server
    assert refused(svc, "-ibA") == told


def test_lock_servers_left_by_a_stopped_listener_refuse_a_monitor_until_stopped(
        svc: Service, agents: list[Agent], data: Path) -> None:
    """-ibD, remote holder; -kD; -ibA refused (lock servers); -ibD; -ibA refused (listener); -k; -ibA; -ibD."""
    started(svc, "-ibD")
    remote = agent(agents, svc, "remote", data)
    assert remote.ask(f"lock {KEY}") == "held remote"
    (server,) = svc.server_pids()
    local = agent(agents, svc, "local", data)
    exclusive(remote, local, server)
    started(svc, "-kD")
    assert refused(svc, "-ibA") == (
        f"jdls: lock servers (pid {server}) run without a lock table: they serve their clients with OS file locks, "
        "and a table now would be a second mechanism beside them: stop the service (jdls -k), then start it with "
        "its table (jdls -ib)")
    exclusive(remote, local, server)
    # The listener again, still without a table: its new clients see the old one's locks.
    assert "OS file locks" in started(svc, "-ibD")
    second = agent(agents, svc, "remote", data)
    exclusive(remote, second, server)
    assert remote.ask(f"release {KEY}") == "released"
    assert "the lock listener (pid" in refused(svc, "-ibA")
    # Stopped as the refusal says: the table comes, and whoever locks next locks there.
    started(svc, "-k")
    assert "created lock table" in started(svc, "-ibA")
    assert local.ask(f"lock {KEY}") == "held table"
    assert "lock table 0x" in started(svc, "-ibD")
    third = agent(agents, svc, "remote", data)
    exclusive(local, third, local.pid)
    assert local.ask(f"release {KEY}") == "released"
    assert third.ask(f"lock {KEY}") == "held remote"
    exclusive(third, local, third.pid)  # in the table a remote holder is named by its own pid


def test_what_the_refusal_says_to_do_works_with_the_listener_already_stopped(
        svc: Service, agents: list[Agent], data: Path) -> None:
    """-ibD, remote holder; -kD; -ibA refused; -k (nothing but lock servers left: they are stopped); -ib."""
    started(svc, "-ibD")
    remote = agent(agents, svc, "remote", data)
    assert remote.ask(f"lock {KEY}") == "held remote"
    started(svc, "-kD")
    assert "jdls -k" in refused(svc, "-ibA")
    started(svc, "-k")
    assert svc.server_pids() == set()
    assert "created lock table" in started(svc, "-ib")
    local = agent(agents, svc, "local", data)
    assert local.ask(f"lock {KEY}") == "held table"
    again = agent(agents, svc, "remote", data)
    exclusive(local, again, local.pid)


def test_a_local_holder_of_an_os_lock_refuses_a_monitor_until_it_releases_and_then_follows_the_table(
        svc: Service, agents: list[Agent], data: Path) -> None:
    """-ibD, local holder; -kD; -ibA and -ib refused (OS lock held); release; -ibA; -ibD; -kA; -ibA; -kD; -ibD."""
    started(svc, "-ibD")
    holder = agent(agents, svc, "local", data)
    assert holder.ask(f"lock {KEY}") == "held oslocks"
    started(svc, "-kD")
    said = refused(svc, "-ibA")
    assert said.startswith(os_locks_held(svc, holder.pid)) and said.endswith(AFTER_HOLDERS), said
    # The holder's command line, as long as the refusal shows it (a deep clone's interpreter path is long).
    assert f"({command_line(holder.pid)}: 1 lock)" in said, said
    # Both at once: all or nothing, nothing started.
    assert refused(svc, "-ib") == said
    assert svc.pid("listener") is None and svc.pid("monitor") is None
    idle = agent(agents, svc, "local", data)
    assert idle.started == "ready oslocks"
    exclusive(holder, idle, holder.pid)
    assert holder.ask(f"release {KEY}") == "released"
    assert "created lock table" in started(svc, "-ibA")
    # Both local processes hold nothing: each follows the table at its next lock.
    assert holder.ask(f"lock {KEY}") == "held table"
    exclusive(holder, idle, holder.pid)
    started(svc, "-ibD")
    remote = agent(agents, svc, "remote", data)
    exclusive(holder, remote, holder.pid)
    assert holder.ask(f"release {KEY}") == "released"
    assert remote.ask(f"lock {KEY}") == "held remote"
    exclusive(remote, idle, remote.pid)
    assert idle.ask("lock another") == "held table"
    # Restarting either part on the table changes nothing.
    started(svc, "-kA")
    assert "attached lock table" in started(svc, "-ibA")
    started(svc, "-kD")
    assert "lock table 0x" in started(svc, "-ibD")
    exclusive(remote, idle, remote.pid)
    exclusive(remote, holder, remote.pid)
    assert remote.ask(f"release {KEY}") == "released"
    assert idle.ask("release another") == "released"


def test_a_local_process_holding_os_locks_the_monitor_could_not_see_is_told_and_follows_once_free(
        svc: Service, agents: list[Agent], data: Path, tmp_path: Path) -> None:
    """A LocalClient whose OS locks are in another directory than the monitor looks in: a table made
    meanwhile cannot take them over, so its next lock is an error naming them; released, it follows."""
    elsewhere = tmp_path / "elsewhere"
    local = agent(agents, svc, "local", data, str(elsewhere))
    assert local.ask("lock first") == "held oslocks"
    # Told where to look (--lock-dir goes with -A too), the monitor sees them.
    said = refused(svc, "-ibA", "--lock-dir", str(elsewhere))
    assert said.startswith(f"jdls: OS file locks in {elsewhere} are held by pid {local.pid} ("), said
    assert "created lock table" in started(svc, "-ibA")
    assert local.ask(f"lock {KEY}") == (
        f"error ServiceUnavailable: {data} {KEY}: lock table 0x{svc.key:08x} now serves this instance: no OS "
        f"file lock is taken in {elsewhere} any more (lock through the table), but this process holds or waits for "
        "1 OS file lock(s) taken before, which the table does not know: release them (or close this LocalClient) "
        "and lock again")
    assert local.ask("release first") == "released"
    assert local.ask(f"lock {KEY}") == "held table"
    assert local.ask(f"release {KEY}") == "released"


def test_a_lock_server_without_a_table_refuses_once_a_table_exists_also_for_a_waiting_request(
        svc: Service, agents: list[Agent], data: Path) -> None:
    """A table made behind the listener's back (as a monitor that won a race would): the lock server's
    next OS lock is dropped and its client told, and so is a request that was waiting."""
    started(svc, "-ibD")
    remote = agent(agents, svc, "remote", data)
    local = agent(agents, svc, "local", data)
    assert local.ask(f"lock {KEY}") == "held oslocks"
    remote.send(f"wait {KEY}")
    wait_for(lambda: len(svc.server_pids()) == 1, 10, "the remote client's lock server")
    time.sleep(0.3)  # queued behind the local holder
    table, created = LockTable.create(svc.key, geometry_for(100, 10))
    assert created
    try:
        served = (f"lock table 0x{svc.key:08x} now serves this instance: no OS file lock is taken in {svc.lock_dir} "
                  "any more (lock through the table)")
        assert local.ask(f"release {KEY}") == "released"
        told = "a lock table now serves this instance: no OS file lock is taken any more (connect again)"
        assert remote.answer() == f"error RequestFailed: {data} {KEY}: {told}"  # a peer is told no path
        assert remote.ask("lock another") == f"error RequestFailed: {data} another: {told}"
        assert local.ask("lock another") == "held table"  # the local process follows
        assert local.ask("release another") == "released"
        assert svc.log().count(served) == 2  # the lock server logs what it told its client
    finally:
        for one in (remote, local):
            one.end()
        table.remove()


def test_a_local_process_that_followed_a_table_which_went_again_goes_back_to_os_locks(
        svc: Service, agents: list[Agent], data: Path) -> None:
    """A table made and removed again (as by a monitor that refused after its look) while a local process
    followed it: holding nothing there, the process goes back to OS locks, and they exclude as before."""
    local = agent(agents, svc, "local", data)
    other = agent(agents, svc, "local", data)
    table, created = LockTable.create(svc.key, geometry_for(100, 10))
    assert created
    try:
        assert local.ask(f"lock {KEY}") == "held table"
        exclusive(local, other, local.pid)  # the other one followed too, at its first lock
        assert local.ask(f"release {KEY}") == "released"
    finally:
        table.remove()
    assert local.ask(f"lock {KEY}") == "held oslocks"
    exclusive(local, other, local.pid)
    assert local.ask(f"release {KEY}") == "released"
    assert other.ask(f"lock {KEY}") == "held oslocks"
    exclusive(other, local, other.pid)


# -- the race -----------------------------------------------------------------------------------


def test_a_monitor_starting_while_a_local_process_takes_os_locks_never_gives_two_holders(
        svc: Service, data: Path, tmp_path: Path) -> None:
    """Round after round, ``jdls -ibA`` starts while a local process takes and releases a record in a loop
    (about two thirds of the time held: a third was seen too seldom on a faster table, 20 starts in a row).
    Refused, it names the process; started, this test locks the record in the table meanwhile, the local
    process follows, and no critical section of one may overlap one of the other. Then -kA and -K -o for
    the next round (the table removed under the local process, which goes back to OS locks)."""
    marker = tmp_path / "inside"
    looper = subprocess.Popen([sys.executable, "-c", LOOPER, str(data), KEY, str(marker)], env=svc.env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outcomes: list[str] = []
    overlaps = 0
    try:
        assert looper.stdout is not None and looper.stdout.readline().strip() == "looping"
        for _ in range(RACE_ROUNDS):
            if outcomes.count("started") >= 2 and "refused" in outcomes:
                break
            result = jdls(svc, "-ibA")
            if result.returncode:
                assert result.stderr.startswith(os_locks_held(svc, looper.pid)), result.stderr
                assert ipc_left(svc.key) == []
                outcomes.append("refused")
                continue
            outcomes.append("started")
            table = LockTable.attach(svc.key)
            me = Owner(os.getpid(), 1, 0, os.getpid(), bytes(16))
            try:
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:
                    got = table.lock(me, data.stat().st_ino, -1, KEY.encode(), 5)
                    if isinstance(got, Grant):
                        try:
                            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                        except FileExistsError:
                            overlaps += 1
                        else:
                            time.sleep(0.001)
                            marker.unlink()
                        table.unlock(got.handle)
                    time.sleep(0.001)
            finally:
                table.close()
            started(svc, "-kA")
            started(svc, "-K", "-o")
        assert looper.stdin is not None
        assert looper.poll() is None, f"the local process ended: {looper.communicate()}"
        looper.stdin.write("\n")
        looper.stdin.flush()
        out, _ = looper.communicate(timeout=30)
    finally:
        if looper.poll() is None:
            looper.kill()
            looper.communicate(timeout=10)
    counts = json.loads(out)
    assert (overlaps, counts["overlaps"]) == (0, 0), (outcomes, counts)
    assert outcomes.count("started") >= 2 and "refused" in outcomes, (outcomes, counts)
    # Started, the monitor's table was followed: the local process locked there, and with OS locks between.
    assert counts["table"] > 0 and counts["oslocks"] > 0, (outcomes, counts)


def test_a_listener_without_a_table_refuses_while_lock_servers_lock_in_a_removed_table(
        svc: Service, agents: list[Agent], data: Path) -> None:
    """-ib, remote holder; -kD, -kA, -K -o (its lock server still maps the removed table and holds the lock
    there); -ibD refused like -ib, naming that lock server and what to do (audit i12b F8: it used to start
    and grant the record again); -k as it says: the holder is told; then -ibD starts."""
    started(svc, "-ib")
    remote = agent(agents, svc, "remote", data)
    assert remote.ask(f"lock {KEY}") == "held remote"
    (server,) = svc.server_pids()
    started(svc, "-kD")
    started(svc, "-kA")
    started(svc, "-K", "-o")
    assert f"lock servers (pid {server}) still lock in a lock table removed under them" in refused(svc, "-ib")
    assert refused(svc, "-ibD") == (
        f"jdls: lock servers (pid {server}) still lock in a lock table removed under them (jdls -K -o): their "
        "clients hold locks there that OS file locks would grant again, a second mechanism beside them: stop them "
        "(jdls -k: their clients are told their locks are lost), then start the listener again")
    assert svc.pid("listener") is None
    started(svc, "-k")
    assert svc.server_pids() == set()
    assert "OS file locks" in started(svc, "-ibD")
    second = agent(agents, svc, "remote", data)
    assert second.ask(f"lock {KEY}") == "held remote"


def test_a_local_process_locks_in_the_lock_directory_the_listener_recorded(
        svc: Service, agents: list[Agent], data: Path, tmp_path: Path) -> None:
    """-ibD --lock-dir D, a remote holder: a local process excludes it, and is excluded, whether its
    JDLS_LOCK_DIR names another directory (the record wins: said once in the error trace) or is unset
    (audit i12b F12: both locked in their own directory and were granted the record beside the holder)."""
    recorded = tmp_path / "service-locks"
    assert "OS file locks" in started(svc, "-ibD", "--lock-dir", str(recorded))
    remote = agent(agents, svc, "remote", data)
    assert remote.ask(f"lock {KEY}") == "held remote"
    (server,) = svc.server_pids()
    disagreeing = agent(agents, svc, "local", data)  # JDLS_LOCK_DIR is the service's default, not D
    exclusive(remote, disagreeing, server)
    unset = agent(agents, svc, "local", data, env={k: v for k, v in svc.env.items() if k != "JDLS_LOCK_DIR"})
    exclusive(remote, unset, server)
    assert remote.ask(f"release {KEY}") == "released"
    assert unset.ask(f"lock {KEY}") == "held oslocks"
    assert not svc.lock_dir.exists()  # nobody locked in the directory JDLS_LOCK_DIR names
    exclusive(unset, remote, unset.pid)
    said = [line for line in (svc.root / "tmp" / "jbase_error_trace").read_text().splitlines()
            if "disagrees with the lock directory" in line]
    assert len(said) == 1 and f"locking in {recorded}," in said[0], said


def test_a_local_process_refuses_a_recorded_lock_directory_not_to_be_trusted(
        svc: Service, data: Path, tmp_path: Path) -> None:
    """The listener's record names a symbolic link: a local process refuses it (ConfigurationError naming
    it), rather than lock there or in a directory of its own."""
    started(svc, "-ibD")
    started(svc, "-k")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    (svc.root / "run" / "lock-dir").write_text(f"{link}\n")
    result = subprocess.run([sys.executable, "-c", "from dls_client import LocalClient; LocalClient()"],
                            env=svc.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "dls_client.errors.ConfigurationError: local direct locking: the lock directory the listener recorded in "
        f"{svc.root / 'run' / 'lock-dir'} is not to be trusted: {link}: is a symbolic link")

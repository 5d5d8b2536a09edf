"""jdls with real processes: start, refuse, display, stop, remove, signals, lock servers.

Every test gets its own instance from the ``service`` fixture (conftest.py),
whose teardown fails the test if a process or IPC resource is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import sysv_ipc
from dls_daemon.cli import main
from dls_proto import Acquired, Lock
from dls_shm import SlotState
from dls_testkit import gone, greet, receive, wait_for


def started(service, *args: str) -> tuple[int, int]:
    """Start monitor and listener in the background; their pids."""
    result = service.jdls("-ib", *args)
    assert result.returncode == 0, result.stderr
    monitor, listener = service.pid("monitor"), service.pid("listener")
    assert monitor and listener
    return monitor, listener


# -- start, display, stop, remove ----------------------------------------------------


def test_start_display_stop_remove(service):
    result = service.jdls("-ibs13000,50")
    assert result.returncode == 0, result.stderr
    monitor, listener = service.pid("monitor"), service.pid("listener")
    assert f"lock monitor started at pid {monitor}" in result.stdout
    assert f"lock listener started at pid {listener} on 0.0.0.0:{service.port}" in result.stdout
    assert not gone(monitor) and not gone(listener)

    shown = service.jdls("-dvL")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"Lock monitor at pid:    {monitor} - Active" in out
    assert f"Lock listener at pid:   {listener} - Active" in out
    assert "Program started:" in out
    assert "13150 locks maximum in 263 groups of 50 locks/group" in out
    assert "0 locks currently in use" in out
    header = service.header()
    assert (header.monitor_pid, header.listener_pid, header.ngroups, header.per_group) == (monitor, listener, 263, 50)

    stop = service.jdls("-k")
    assert stop.returncode == 0, stop.stderr
    assert "waiting up to 5 s for lock listener" in stop.stdout
    assert "waiting up to 5 s for lock monitor" in stop.stdout
    assert gone(monitor) and gone(listener)
    assert service.processes() == []
    assert not service.instance.pid_file("monitor").exists()
    assert not service.instance.pid_file("listener").exists()
    assert "Inactive" in service.jdls("-d").stdout

    remove = service.jdls("-K")
    assert remove.returncode == 0, remove.stderr
    assert "removed lock table" in remove.stdout
    assert service.ipc_left() == []
    again = service.jdls("-K")
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_start_returns_with_its_output_pipes_closed(service):
    """The daemons must not keep the caller's stdout/stderr open, or `$(jdls -ib)` would hang."""
    proc = service.popen("-ib")
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "lock listener started" in out


def test_second_start_refuses(service):
    monitor, _ = started(service)
    again = service.jdls("-ib")
    assert again.returncode == 1
    assert f"lock monitor already running at pid {monitor}" in again.stderr
    assert service.pid("monitor") == monitor


def test_monitor_and_listener_started_and_stopped_apart(service):
    result = service.jdls("-ibA")
    assert result.returncode == 0, result.stderr
    monitor = service.pid("monitor")
    assert "lock monitor started" in result.stdout and "listener" not in result.stdout

    result = service.jdls("-ibD")
    assert result.returncode == 0, result.stderr
    listener = service.pid("listener")
    assert f"lock table 0x{service.instance.key:08x}" in result.stdout

    stop = service.jdls("-kD")
    assert stop.returncode == 0, stop.stderr
    assert gone(listener)
    assert not gone(monitor)
    header = service.header()
    assert header.monitor_pid == monitor and header.listener_pid == 0
    assert f"Lock monitor at pid:    {monitor} - Active" in service.jdls("-d").stdout


def test_listener_alone_uses_os_file_locks(service):
    result = service.jdls("-ibD")
    assert result.returncode == 0, result.stderr
    assert "OS file locks" in result.stdout
    shown = service.jdls("-d").stdout
    assert "Lock monitor at pid:    0 - Inactive" in shown
    assert "OS file locks" in shown
    assert service.ipc_left() == []


def test_existing_table_is_attached_as_it_is(service):
    assert service.jdls("-ibA", "-s", "100,7").returncode == 0
    assert service.jdls("-kA").returncode == 0
    again = service.jdls("-ibA", "-s13000,50")
    assert again.returncode == 0, again.stderr
    assert "attached lock table" in again.stdout
    assert "119 locks in 17 groups of 7" in again.stdout
    assert "is ignored" in again.stderr
    assert "is ignored" in (service.root / "log" / "jdls.log").read_text()


def test_restart_warns_only_of_table_options_given_now(service):
    """A table made with -P and -T keeps them: -ibA without them says nothing of them; -T on a table
    without it is named as ignored."""
    assert service.jdls("-ibAP").returncode == 0
    assert service.jdls("-kA").returncode == 0
    again = service.jdls("-ibA")
    assert again.returncode == 0, again.stderr
    assert "-P" not in again.stderr and "-T" not in again.stderr and "as given now" not in again.stderr
    assert service.jdls("-kA").returncode == 0
    with_t = service.jdls("-ibAT")
    assert with_t.returncode == 0, with_t.stderr
    assert "the lock table exists without -T: -T is ignored" in with_t.stderr
    assert "-P" not in with_t.stderr


# -- failures and usage ----------------------------------------------------------------


def test_port_in_use_fails_clearly_and_starts_nothing(service):
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", service.port))
        holder.listen()
        result = service.jdls("-ib")
    assert result.returncode == 1
    assert f"cannot listen on 0.0.0.0:{service.port}: Address already in use" in result.stderr
    assert service.processes() == []
    assert service.ipc_left() == []


def test_bad_table_size_names_the_value(service):
    result = service.jdls("-i", "-s", "10")
    assert result.returncode == 2
    assert "usage: jdls" in result.stderr
    assert "'10'" in result.stderr
    assert service.processes() == []


@pytest.mark.parametrize(
    "argv",
    [
        [], ["-x"], ["-i", "-k"], ["-k", "-b"], ["-iAD"], ["-is", "0,50"], ["-is", "a,b"], ["-is", "1,2,3"],
        ["-it", "0"], ["-d", "-s", "1,1"], ["-KA"], ["-kL"], ["-i", "--port", "70000"],
    ],
)
def test_wrong_options_exit_2_with_usage(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: jdls" in err


def test_wrong_option_as_a_program(service):
    result = service.jdls("-iq")
    assert result.returncode == 2
    assert "usage: jdls" in result.stderr and "'q'" in result.stderr


def test_bad_port_variable(service):
    service.env["JDLS_PORT"] = "fifty"
    result = service.jdls("-ib")
    assert result.returncode == 2
    assert "JDLS_PORT" in result.stderr


def test_remove_refuses_while_running(service):
    monitor, _ = started(service)
    result = service.jdls("-K")
    assert result.returncode == 1
    assert f"lock monitor (pid {monitor})" in result.stderr
    assert service.ipc_left() == ["shared memory", "semaphore"]


def test_stop_when_nothing_runs(service):
    result = service.jdls("-k")
    assert result.returncode == 0
    assert "lock listener is not running" in result.stdout
    assert "lock monitor is not running" in result.stdout


def test_stale_pid_files_are_ignored_and_cleaned(service):
    run = service.root / "run"
    (run / "servers").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "jdls-monitor.pid").write_text(f"{dead.pid}\n1.0\n")
    (run / "servers" / f"{os.getpid()}.pid").write_text(f"{os.getpid()}\n1.0\n")  # live pid, wrong start time
    monitor, _ = started(service)
    assert monitor != dead.pid
    assert service.jdls("-k").returncode == 0
    assert not (run / "servers" / f"{os.getpid()}.pid").exists()
    assert not gone(os.getpid())


def test_stop_kills_what_ignores_sigterm(service):
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True,
    )
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
        servers = service.root / "run" / "servers"
        servers.mkdir(parents=True)
        (servers / f"{stubborn.pid}.pid").write_text(f"{stubborn.pid}\n{psutil.Process(stubborn.pid).create_time()}\n")
        result = service.jdls("-k", "--stop-timeout", "0.3")
        assert result.returncode == 0, result.stderr
        assert f"lock server (pid {stubborn.pid}) did not stop within 0.3 s: killing" in result.stdout
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
        assert not (servers / f"{stubborn.pid}.pid").exists()
    finally:
        stubborn.kill()
        stubborn.wait()


def test_killed_processes_are_given_time_to_end_by_their_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thousands of lock servers SIGKILLed at once take the system seconds to end (their memory torn down,
    on two cores): jdls waits for that beyond the stop timeout, a little per process, saying so, instead of
    calling them "still there after SIGKILL" (seen stopping 5,000 clients' lock servers)."""
    import io

    from dls_daemon import stop
    from dls_shm import Occupant

    stubborn = [subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                  "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                                 stdout=subprocess.PIPE, text=True) for _ in range(3)]
    waits: list[float] = []

    def wait_gone(targets: list[Occupant], timeout: float) -> list[Occupant]:
        waits.append(timeout)
        return [] if len(waits) > 1 else list(targets)  # none stops at SIGTERM

    try:
        for process in stubborn:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        monkeypatch.setattr(stop, "_wait_gone", wait_gone)
        out = io.StringIO()
        targets = [Occupant("lock server", p.pid, Path("/nowhere"), None) for p in stubborn]
        assert stop.terminate(targets, 0.3, out) == 0
        teardown = 0.3 + 3 * stop.KILL_TEARDOWN
        assert waits == [0.3, teardown]
        assert f"waiting up to {teardown:g} s for the system to end 3 killed processes" in out.getvalue()
        assert [p.wait(timeout=5) for p in stubborn] == [-signal.SIGKILL] * 3
    finally:
        for process in stubborn:
            process.kill()
            process.wait()


# -- signals and the foreground --------------------------------------------------------


def test_sigterm_stops_background_daemons_cleanly(service):
    monitor, listener = started(service)
    os.kill(listener, signal.SIGTERM)
    wait_for(lambda: gone(listener), what="the listener to stop")
    os.kill(monitor, signal.SIGTERM)
    wait_for(lambda: gone(monitor), what="the monitor to stop")
    assert not service.instance.pid_file("monitor").exists()
    assert not service.instance.pid_file("listener").exists()
    header = service.header()  # the table stays: only -K removes it
    assert (header.monitor_pid, header.listener_pid) == (0, 0)
    log = (service.root / "log" / "jdls.log").read_text()
    assert "monitor stopped" in log and "listener stopped" in log


def test_foreground_runs_monitor_and_listener_until_sigterm(service):
    proc = service.popen("-i", "--foreground")
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert "lock monitor started" in first and "lock listener started" in second, proc.stderr
        monitor, listener = service.pid("monitor"), service.pid("listener")
        assert monitor == proc.pid
        assert psutil.Process(listener).ppid() == proc.pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert gone(listener)
        assert service.processes() == []
        assert service.header().monitor_pid == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("roles", ["-i", "-iA"])
def test_a_foreground_monitor_that_crashes_exits_70_and_logs_why(service, roles):
    """An unexpected exception ends a daemon with EX_SOFTWARE and its traceback in the log, in the
    foreground too, where both roles run as the monitor and its companion (the systemd unit's way)."""
    crash = (
        "import sys\n"
        "from dls_daemon import monitor\n"
        "from dls_daemon.cli import main\n"
        "def work(self, readable):\n"
        "    raise RuntimeError('a bug in the monitor')\n"
        "monitor.Monitor.work = work\n"
        f"sys.exit(main([{roles!r}, '--foreground']))\n"
    )
    done = subprocess.run([sys.executable, "-c", crash], env=service.env, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 70, done.stderr
    assert "lock monitor failed: a bug in the monitor" in done.stderr
    log = service.log()
    assert "Traceback" in log and "RuntimeError: a bug in the monitor" in log
    assert service.processes() == []  # the listener companion was stopped with it


def test_monitor_tidies_orphaned_locks(service):
    assert service.jdls("-ibA", "--tidy-seconds", "1").returncode == 0
    code = (
        "import os; from dls_shm import *; t = LockTable.attach(Instance.from_environment().key); "
        "t.lock(Owner(os.getpid(), 1, 0, os.getpid(), LOCAL_IP), 7, 8, b'ORPHAN', modes.EX)"
    )
    subprocess.run([sys.executable, "-c", code], env=service.env, check=True)
    table = service.table()
    try:
        assert len(list(table.scan())) == 1
        # The tidy frees the slot, then counts it in the header: wait for both, not for the first alone.
        wait_for(lambda: not list(table.scan()) and table.header().tidy_ops >= 1, timeout=5,
                 what="the monitor to tidy the orphaned lock and count it")
    finally:
        table.close()


# -- lock servers ------------------------------------------------------------------------


def test_connection_forks_a_lock_server_that_ends_with_its_client(service):
    _, listener = started(service)
    with socket.create_connection(("127.0.0.1", service.port)) as client:
        wait_for(lambda: service.server_pids(), what="a lock server pid file")
        (server,) = service.server_pids()
        assert psutil.Process(server).ppid() == listener
        _, welcome = greet(client)
        assert welcome.server_pid == server
    wait_for(lambda: gone(server) and not service.server_pids(), what="the lock server to end")


def test_stopping_the_listener_leaves_lock_servers_serving(service):
    monitor, listener = started(service)
    with socket.create_connection(("127.0.0.1", service.port)) as client:
        wait_for(lambda: service.server_pids(), what="a lock server pid file")
        (server,) = service.server_pids()
        assert service.jdls("-kD").returncode == 0
        assert gone(listener) and not gone(server) and not gone(monitor)
        assert greet(client)[1].server_pid == server  # still serving its client
        assert service.jdls("-ibD").returncode == 0  # a new listener; the old lock server goes on
        assert not gone(server)
        stop = service.jdls("-k")
        assert stop.returncode == 0, stop.stderr
        assert f"lock server (pid {server})" in stop.stdout
        assert gone(server)


@pytest.mark.parametrize("lock_delay", ["15", "0"])
def test_stop_keeps_the_locks_of_the_lock_servers_it_stops_for_the_lock_delay(service, lock_delay):
    """jdls -k stops the service, not its clients: their locks are kept for them to reclaim from the service
    started again (within the lock-delay; --lock-delay 0 frees them, as before there was one)."""
    started(service, "--lock-delay", lock_delay)
    with socket.create_connection(("127.0.0.1", service.port)) as client:
        conn, welcome = greet(client)
        client.sendall(conn.send(Lock(2, 5, 0, 0, 1, 11, 12, b"REC1", "/data/FILE")))
        receive(client, conn, Acquired)
        shown = service.jdls("-dL").stdout
        assert f"{welcome.server_pid}\tWRITE\t4242" in shown and "127.0.0.1\tREC1" in shown
        assert "1 locks currently in use" in shown
        assert service.jdls("-k").returncode == 0
    assert gone(welcome.server_pid)
    table = service.table()
    try:
        left = [(e.slot.state, e.slot.key[: e.slot.key_len]) for e in table.scan()]
    finally:
        table.close()
    assert left == ([(SlotState.KEPT, b"REC1")] if lock_delay != "0" else [])


def test_foreground_listener_alone_stops_on_sigint(service):
    proc = service.popen("-iD")
    try:
        assert proc.stdout is not None
        assert "lock listener started" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert service.processes() == []
        assert not service.instance.pid_file("listener").exists()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_remove_refuses_while_the_table_is_attached(service):
    assert service.jdls("-ibA").returncode == 0
    assert service.jdls("-kA").returncode == 0
    table = service.table()
    try:
        result = service.jdls("-K")
        assert result.returncode == 1
        assert "1 other process(es) still attached" in result.stderr
    finally:
        table.close()
    assert service.ipc_left() == ["shared memory", "semaphore"]


def test_remove_refuses_a_table_this_user_may_not_remove(service, monkeypatch, capsys):
    """Decided from /proc/sysvipc before anything is touched, even with -o: not a failed removal's error."""
    assert service.jdls("-ibA").returncode == 0
    assert service.jdls("-kA").returncode == 0
    monkeypatch.setenv("JBCRELEASEDIR", str(service.root))
    monkeypatch.delenv("DLS_IPC_KEY", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 4242)
    assert main(["-K", "-o"]) == 1
    err = capsys.readouterr().err
    assert f"cannot remove the lock table 0x{service.instance.key:08x}: it belongs to user " in err
    assert "run jdls -K as that user or as root" in err
    assert service.ipc_left() == ["shared memory", "semaphore"]


def test_remove_refuses_while_a_lock_server_runs(service):
    started(service)
    with socket.create_connection(("127.0.0.1", service.port)):
        wait_for(lambda: service.server_pids(), what="a lock server pid file")
        (server,) = service.server_pids()
        assert service.jdls("-kD").returncode == 0
        assert service.jdls("-kA").returncode == 0
        result = service.jdls("-K")
        assert result.returncode == 1
        assert f"lock server (pid {server})" in result.stderr
    wait_for(lambda: gone(server), what="the lock server to end with its client")


def test_remove_names_a_lone_semaphore_as_dls_ipcrm_does(service):
    """Half a table (its segment gone) is not 'nothing to remove': jdls -K says what is left and how to
    remove it, exit 1, as dls-ipcrm does (the one decision of dls_shm.Occupancy)."""
    sem = sysv_ipc.Semaphore(service.instance.key, sysv_ipc.IPC_CREX, 0o600, 1)
    try:
        result = service.jdls("-K")
        assert result.returncode == 1, result
        assert f"only a semaphore (id {sem.id}) is left" in result.stderr
        assert f"ipcrm -s {sem.id}" in result.stderr
        assert service.ipc_left() == ["semaphore"]
    finally:
        sem.remove()


@pytest.mark.parametrize(("removed", "left", "flag"), [
    (sysv_ipc.Semaphore, "shared memory segment", "-m"),
    (sysv_ipc.SharedMemory, "semaphore", "-s"),
])
def test_half_a_table_is_named_by_start_as_by_remove(service, removed, left, flag):
    """One of the table's two IPC objects removed behind jdls's back: neither a table to attach nor nothing.
    jdls -i names the object left and the ipcrm that removes it, as jdls -K (with -o too) does, and exits 1
    (it sent the operator to jdls -K, or said there was no table); once it is removed so, the service starts."""
    assert service.jdls("-ibA").returncode == 0
    assert service.jdls("-kA").returncode == 0
    key = service.instance.key
    removed(key).remove()
    remaining = sysv_ipc.SharedMemory(key) if flag == "-m" else sysv_ipc.Semaphore(key)
    ident = remaining.id
    if flag == "-m":
        remaining.detach()
    remove_it = f"check it with ipcs and remove it with ipcrm {flag} {ident}"
    start = service.jdls("-ibA")
    said = f"only a {left} (id {ident}) is left with key 0x{key:08x}, not a whole lock table: {remove_it}"
    assert (start.returncode, start.stderr) == (1, f"jdls: cannot create the lock table: {said}\n")
    for args in (("-K",), ("-K", "-o")):
        result = service.jdls(*args)
        assert result.returncode == 1 and result.stderr.endswith(f"{remove_it}\n"), (args, result.stderr)
    assert service.ipc_left() == [{"-m": "shared memory", "-s": "semaphore"}[flag]]
    assert subprocess.run(["ipcrm", flag, str(ident)]).returncode == 0
    assert service.jdls("-ibA").returncode == 0


def test_a_table_of_the_previous_layout_is_refused_clearly_and_removed_by_jdls_K(service):
    """dls-shm 0.8 changed the table's layout (version 3: a semaphore per set of groups, a ticket counter per
    group): a table left by an older service is not read as if it were new. jdls -i names it and what to do;
    jdls -K removes it; then the service starts."""
    key = service.instance.key
    sem = sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, 0o600, 1)
    shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, 0o600, 4096 + 263 * 10_000)
    try:
        shm.write(struct.pack("=8sHH", b"DLSTABLE", 2, 4096))
        shm.detach()  # not to count as a process still using it
        start = service.jdls("-ibA")
        assert start.returncode == 1, start
        assert "has layout version 2" in start.stderr and "jdls -K" in start.stderr, start.stderr
        assert "Traceback" not in start.stderr
        removed = service.jdls("-K")
        assert removed.returncode == 0, removed
        assert service.ipc_left() == []
        assert service.jdls("-ibA").returncode == 0
        assert service.jdls("-kA").returncode == 0
    finally:
        for made in (sem, shm):
            with contextlib.suppress(sysv_ipc.ExistentialError):
                made.remove()

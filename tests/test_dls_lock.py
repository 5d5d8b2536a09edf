"""dls-lock answers for every process its command starts: real dls-lock processes on a real service.

The lock lasts while any process the command started runs (as flock(1)'s does), whether it stayed in the
command's process group, made a session of its own or was forked twice; each such process gets a signal
dls-lock passes on exactly once, however it was sent (kill, or the terminal's Ctrl-C); and none of them
outlives dls-lock, even killed by SIGKILL. A witness client of the test checks who holds the lock.

When the lock is lost, dls-lock stops the command (TERM, then KILL) and exits 75: the timing and the
messages with a fake client that loses its lock when told (a real dls-lock process all the same), then a
real loss on a real service.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dls_client import Client, LockRefused
from dls_client.exitcodes import LOST
from dls_testkit import (
    DLS_LOCK,
    KEY,
    Service,
    alive,
    data_file,
    free_port,
    holder_of,
    lock_holder,
    running,
    running_service,
    wait_for,
    wait_free,
)
from dls_testkit.fixtures import kernel_signals

#: A process that counts the signals it is sent (TERM, INT, HUP), each delivery apart (it takes them with
#: sigtimedwait, not a handler, so two deliveries are never merged into one call): it touches OUT.ready, and
#: half a second after the first signal writes their names to OUT and exits 0.
COUNTER = textwrap.dedent("""
    import pathlib, signal, sys, time
    out = pathlib.Path(sys.argv[1])
    counted = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, counted)
    pathlib.Path(str(out) + ".ready").touch()
    got, end = [], time.monotonic() + 60
    while time.monotonic() < end:
        info = signal.sigtimedwait(counted, 0.05)
        if info is not None:
            got.append(signal.Signals(info.si_signo).name)
            end = min(end, time.monotonic() + 0.5)
    out.write_text(" ".join(got))
""")

#: A job-control shell in one process: it runs its arguments as a job of their own process group in the
#: foreground of its terminal (as an interactive shell runs a command line) and exits with the job's status.
JOB_SHELL = textwrap.dedent("""
    import os, signal, sys
    job = os.fork()
    if job == 0:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        os.tcsetpgrp(0, os.getpgrp())
        signal.signal(signal.SIGTTOU, signal.SIG_DFL)
        os.execv(sys.argv[1], sys.argv[1:])
    code = os.waitstatus_to_exitcode(os.waitpid(job, 0)[1])
    sys.exit(code if code >= 0 else 128 - code)
""")

#: How a command leaves a process behind: in the background (same process group), in a session of its own,
#: and forked twice (its parent ends at once, so it is reparented while the command still runs).
LEAVE_BEHIND = {
    "background": "{child} &",
    "own session": "setsid {child} &",
    "double fork": "( {child} & ) &",
}


@pytest.fixture
def witness(service: Service) -> Iterator[Client]:
    with service.client(timeout=10) as client:
        yield client


def _quoted(*words: str | Path) -> str:
    return " ".join(shlex.quote(str(word)) for word in words)


def _counter(tmp_path: Path) -> str:
    script = tmp_path / "counter.py"
    script.write_text(COUNTER)
    return _quoted(sys.executable, script)


def _counted(out: Path, timeout: float = 10.0) -> list[str]:
    wait_for(out.exists, timeout, f"{out.name} to be written")
    return out.read_text().split()


def _tree(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def _keeper(proc: subprocess.Popen[bytes]) -> psutil.Process:
    [keeper] = [p for p in psutil.Process(proc.pid).children() if p.name() == "dls-lock keeper"]
    return keeper


def _three_counters(tmp_path: Path) -> tuple[str, list[Path]]:
    """A command that runs three counters: one left in the background, one in a session of its own, and
    itself (exec'd); and their output files."""
    counter = _counter(tmp_path)
    outs = [tmp_path / name for name in ("command", "background", "own-session")]
    script = (f"{counter} {_quoted(outs[1])} & setsid {counter} {_quoted(outs[2])} & "
              f"exec {counter} {_quoted(outs[0])}")
    return script, outs


def _ready(outs: list[Path], proc: subprocess.Popen[bytes]) -> None:
    wait_for(lambda: all(Path(f"{out}.ready").exists() for out in outs) or proc.poll() is not None, 15,
             "the counters to start")
    assert proc.poll() is None, f"dls-lock ended with status {proc.returncode}"


# -- the lock lasts while anything the command started runs ---------------------------------------------


@pytest.mark.parametrize("how", LEAVE_BEHIND)
def test_the_lock_lasts_while_a_process_the_command_left_runs(service: Service, witness: Client, tmp_path: Path,
                                                              how: str) -> None:
    data = data_file(tmp_path)
    go, child_pid, err = tmp_path / "go", tmp_path / "child.pid", tmp_path / "err"
    child = _quoted("sh", "-c", f"echo $$ > {_quoted(child_pid)}; while [ ! -e {_quoted(go)} ]; do sleep 0.05; done")
    script = LEAVE_BEHIND[how].format(child=child) + "\nexit 3"
    with err.open("wb") as stderr:
        proc = service.dls_lock_popen("-v", str(data), KEY, "sh", "-c", script, stderr=stderr)
    with running(proc):
        wait_for(lambda: ("waiting for" in err.read_text() and child_pid.exists() and child_pid.read_text().strip())
                 or proc.poll() is not None, 15, "dls-lock to say it waits for what the command left")
        assert proc.poll() is None, f"dls-lock ended ({proc.returncode}): {err.read_text()}"
        left = int(child_pid.read_text())
        told = [line for line in err.read_text().splitlines() if "waiting for" in line]
        said = re.fullmatch(r"dls-lock: the command ended \(3\); waiting for (\d+) process(?:es)? the command "
                            r"started: pids? ([\d, ]+)", told[0])
        assert said, told
        pids = [int(pid) for pid in said[2].split(", ")]
        assert len(pids) == int(said[1])
        # what ran then: the process left, or (forked twice) the subshell about to fork it
        assert left in pids or how == "double fork", (left, told)

        time.sleep(0.3)  # the command is long gone: the lock must stay while the process it left runs
        assert alive(left) and proc.poll() is None
        assert holder_of(witness, data, KEY).client_pid == proc.pid

        go.touch()
        assert proc.wait(timeout=10) == 3, err.read_text()  # the command's status, not the last process's
    assert not alive(left)
    witness.try_lock(data, KEY).release()  # free once everything has ended
    assert err.read_text().splitlines()[-1] == "dls-lock: released"


# -- signals ------------------------------------------------------------------------------------------


def test_a_signal_to_dls_lock_reaches_every_process_once(service: Service, tmp_path: Path) -> None:
    """TERM sent to dls-lock reaches the command and what it left, in its process group or not, once each;
    the same signal sent to the keeper by anyone else is not passed on."""
    data = data_file(tmp_path)
    script, outs = _three_counters(tmp_path)
    proc = service.dls_lock_popen(str(data), KEY, "sh", "-c", script)
    with running(proc):
        _ready(outs, proc)
        os.kill(_keeper(proc).pid, signal.SIGTERM)  # a stranger's: ignored
        time.sleep(0.3)
        assert not any(out.exists() for out in outs)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=15) == 0  # the command's status: the counter counted and exited
    assert {out.name: _counted(out) for out in outs} == {out.name: ["SIGTERM"] for out in outs}


def test_ctrl_c_reaches_every_process_once(service: Service, tmp_path: Path) -> None:
    """Ctrl-C on the terminal of an interactive shell's job: the terminal sends INT to the job's process
    group (dls-lock, its keeper, the command and what it left in the group); dls-lock passes it on only to
    the process outside the group, so each counts one."""
    data = data_file(tmp_path)
    script, outs = _three_counters(tmp_path)
    shell = tmp_path / "job_shell.py"
    shell.write_text(JOB_SHELL)
    pid, terminal = pty.fork()
    if pid == 0:  # the session leader on the new terminal: exec at once
        os.execve(sys.executable, [sys.executable, str(shell), DLS_LOCK, str(data), KEY, "sh", "-c", script],
                  service.env)
    try:
        wait_for(lambda: all(Path(f"{out}.ready").exists() for out in outs), 15, "the counters to start")
        assert signal.SIGINT not in kernel_signals(pid)[0], "the job's shell was started with SIGINT ignored"
        os.write(terminal, b"\x03")
        status = _wait_draining(pid, terminal, 15)
    finally:
        os.close(terminal)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert {out.name: _counted(out) for out in outs} == {out.name: ["SIGINT"] for out in outs}
    assert status == 0  # the command's (the counter's) status, through dls-lock and the shell


def _wait_draining(pid: int, terminal: int, timeout: float) -> int:
    """Reap ``pid`` (the terminal's session leader), reading what it writes meanwhile; its exit status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(raw)
        if select.select([terminal], [], [], 0.05)[0]:
            try:
                os.read(terminal, 4096)
            except OSError:  # EIO: the terminal's last process closed it
                time.sleep(0.05)
    raise AssertionError(f"the job on the terminal still runs after {timeout} s")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_waiting_for_the_lock_ends_dls_lock(service: Service, tmp_path: Path,
                                                           signum: signal.Signals) -> None:
    data = data_file(tmp_path)
    ran, err = tmp_path / "ran", tmp_path / "err"
    held = lock_holder(service, data, tmp_path / "held")
    with running(held):
        with err.open("wb") as stderr:
            waiter = service.dls_lock_popen(str(data), KEY, "touch", str(ran), stderr=stderr)
        with running(waiter):
            wait_for(lambda: "waiting for" in err.read_text() or waiter.poll() is not None, 10,
                     "the waiter to say it waits")
            keeper = _keeper(waiter)
            assert signum not in kernel_signals(waiter.pid)[0], "dls-lock was started with the signal ignored"
            waiter.send_signal(signum)
            try:
                assert waiter.wait(timeout=10) == -signum, err.read_text()
            except subprocess.TimeoutExpired:
                ignored, blocked = kernel_signals(waiter.pid)
                raise AssertionError(f"dls-lock still runs 10 s after {signum.name} (ignored {sorted(ignored)}, "
                                     f"blocked {sorted(blocked)}): {err.read_text()}") from None
            wait_for(lambda: not alive(keeper.pid), 5, "the waiter's keeper to end with it")
    assert not ran.exists()
    assert "Traceback" not in err.read_text()


# -- killed -------------------------------------------------------------------------------------------


def _leaving_three(service: Service, tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
    """dls-lock running a command that leaves a process in the background and one in a session of its own;
    returned with its processes once all three run."""
    data = data_file(tmp_path)
    script = "sleep 60 & setsid sleep 61 & exec sleep 62"
    proc = service.dls_lock_popen(str(data), KEY, "sh", "-c", script)
    sleeps: list[psutil.Process] = []

    def started() -> bool:
        sleeps[:] = [p for p in _tree(proc) if p.name() == "sleep"]
        return len(sleeps) == 3 or proc.poll() is not None

    wait_for(started, 15, "the command and what it leaves to start")
    assert proc.poll() is None, f"dls-lock ended with status {proc.returncode}"
    return proc, sleeps


def test_what_the_command_left_dies_with_a_killed_dls_lock(service: Service, witness: Client,
                                                           tmp_path: Path) -> None:
    proc, sleeps = _leaving_three(service, tmp_path)
    with running(proc):
        keeper = _keeper(proc)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: not any(alive(p.pid) for p in [*sleeps, keeper]), 2,
                 "the keeper to kill every process the command started, and end")
    assert wait_free(witness, tmp_path / "FBNK.ACCOUNT", KEY, 2) < 2


def test_a_killed_keeper_takes_the_command_and_dls_lock_what_it_left(service: Service, witness: Client,
                                                                    tmp_path: Path) -> None:
    proc, sleeps = _leaving_three(service, tmp_path)
    with running(proc):
        _keeper(proc).kill()
        assert proc.wait(timeout=10) == 128 + signal.SIGKILL
    assert not any(alive(p.pid) for p in sleeps)
    witness.try_lock(tmp_path / "FBNK.ACCOUNT", KEY).release()


# -- commands that cannot run -------------------------------------------------------------------------


def test_a_command_that_cannot_run(service: Service, witness: Client, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    missing = service.dls_lock(str(data), KEY, "no-such-command-here")
    assert (missing.returncode, missing.stderr) == (127, "dls-lock: no-such-command-here: command not found\n")
    not_runnable = tmp_path / "script"
    not_runnable.write_text("#!/bin/sh\n")
    refused = service.dls_lock(str(data), KEY, str(not_runnable))
    assert (refused.returncode, refused.stderr) == (126, f"dls-lock: {not_runnable}: permission denied\n")
    try:
        witness.try_lock(data, KEY).release()
    except LockRefused as exc:
        raise AssertionError("the lock stayed held after a command that could not run") from exc


# -- the lock lost ------------------------------------------------------------------------------------

#: dls-lock's main with a fake client: the lock is granted at once and lost when the file $LOSE appears,
#: seen by a watcher thread which calls on_lost, as the real client's does (but, with $SILENT set, the loss
#: is found only by release()).
FAKE_CLIENT = textwrap.dedent("""
    import os, sys, threading, time
    from pathlib import Path
    from dls_client import LockLost, Mode, client, lock_command

    class FakeHeld:
        mode, value, token, lost, lost_reason = Mode.EX, 0, 0, False, None

        def release(self):
            if self.lost:
                raise LockLost("FILE", b"KEY", self.lost_reason)

    class FakeClient:
        def __init__(self, config, **_):
            pass

        def lock(self, ref, key, mode, *, on_lost, **_):
            held, lose = FakeHeld(), Path(os.environ["LOSE"])

            def watch():
                while not lose.exists():
                    time.sleep(0.01)
                held.lost, held.lost_reason = True, "the fake lost it"
                if not os.environ.get("SILENT"):
                    on_lost(held)

            threading.Thread(target=watch, daemon=True).start()
            time.sleep(0.05)  # a loss already due is seen before the grant returns
            return held

        def held_until(self, held):
            return time.monotonic() + 3600  # a lease the holder renews: never the reason here

        def held_through(self, held):
            return []  # no connection for the keeper to keep

        def close(self):
            pass

    client.Client = FakeClient  # lock_command imports it when it takes the lock
    sys.exit(lock_command.main(sys.argv[1:]))
""")

#: A command that leaves a process behind which ignores TERM: the command itself ends on TERM (7).
STUBBORN = textwrap.dedent("""
    trap 'echo TERM >> "$LOG"; exit 7' TERM
    sh -c 'trap "" TERM; echo $$ > "$STUBBORN"; while :; do sleep 0.05; done' &
    touch "$READY"
    while :; do sleep 0.05; done
""")


def _fake_dls_lock(tmp_path: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    # A service nobody listens for: dls-lock connects before it makes its (fake) client.
    environ = {k: v for k, v in os.environ.items() if k != "JBCPORTNO"} | {"JDLS": f"SERVER=127.0.0.1,{free_port()}"}
    return subprocess.Popen([sys.executable, "-c", FAKE_CLIENT, *args], env={**environ, **env},
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("grace", ["0.5", "0"])
def test_a_lost_lock_stops_the_command(tmp_path: Path, grace: str) -> None:
    data = data_file(tmp_path)
    files = {name: tmp_path / name for name in ("LOSE", "LOG", "STUBBORN", "READY")}
    script = tmp_path / "work.sh"
    script.write_text(STUBBORN)
    proc = _fake_dls_lock(tmp_path, "-k", grace, str(data), KEY, "sh", str(script),
                          **{name: str(path) for name, path in files.items()})
    with running(proc):
        wait_for(lambda: (files["READY"].exists() and files["STUBBORN"].exists() and files["STUBBORN"].read_text())
                 or proc.poll() is not None, 15, "the command to start")
        assert proc.poll() is None, proc.communicate()
        stubborn = int(files["STUBBORN"].read_text())
        lost = time.monotonic()
        files["LOSE"].touch()
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - lost
    assert proc.returncode == LOST, err
    assert not alive(stubborn)
    name = f"{data} {KEY}"
    assert f"dls-lock: lost the lock on {name} (the fake lost it): stopping the command (TERM now, KILL after " \
        f"{grace} s)\n" in err
    if grace == "0":  # KILL at once, no TERM
        assert not files["LOG"].exists()
        assert "dls-lock: killing " in err and " running: pid" in err and str(stubborn) in err, err
        assert took < 1.5
    else:  # TERM to all, which ends the command but not the stubborn one; KILL for it after 0.5 s
        assert files["LOG"].read_text() == "TERM\n"
        assert " still running 0.5 s after TERM: pid" in err and str(stubborn) in err, err
        assert 0.5 <= took < 2.5, f"stopped {took:.2f} s after the loss"


def test_a_loss_found_at_release_is_told(tmp_path: Path) -> None:
    data, lose = data_file(tmp_path), tmp_path / "LOSE"
    proc = _fake_dls_lock(tmp_path, "-v", str(data), KEY, "sh", "-c", f"touch {_quoted(lose)}; sleep 0.2",
                          LOSE=str(lose), SILENT="1")
    with running(proc):
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == LOST, err
    assert err.splitlines()[-1] == f"dls-lock: lost the lock on {data} {KEY} (the fake lost it) after the command ended"


def test_a_lock_lost_before_the_command_starts(tmp_path: Path) -> None:
    """The command never runs: 69, as when the service is lost before the grant (not 75, which says the
    command may have done part of its work)."""
    data, lose, ran = data_file(tmp_path), tmp_path / "LOSE", tmp_path / "ran"
    lose.touch()
    proc = _fake_dls_lock(tmp_path, str(data), KEY, "touch", str(ran), LOSE=str(lose))
    with running(proc):
        _, err = proc.communicate(timeout=15)
    assert (proc.returncode, err) == (
        69, f"dls-lock: lost the lock on {data} {KEY} (the fake lost it) before the command started: it does not "
        "run\n")
    assert not ran.exists()


def _holding(service: Service, data: Path, err: Path) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
    """dls-lock running a command that leaves a sleep behind and sleeps itself; returned with the two sleeps
    once both run."""
    with err.open("wb") as stderr:
        proc = service.dls_lock_popen(str(data), KEY, "sh", "-c", "sleep 60 & exec sleep 61", stderr=stderr)
    sleeps: list[psutil.Process] = []

    def started() -> bool:
        sleeps[:] = [p for p in _tree(proc) if p.name() == "sleep"]
        return len(sleeps) == 2 or proc.poll() is not None

    try:
        wait_for(started, 15, "the command and what it leaves to start")
        assert proc.poll() is None, f"dls-lock ended ({proc.returncode}): {err.read_text()}"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, sleeps


def test_a_lock_lost_with_its_lock_server_stops_the_command(tmp_path: Path) -> None:
    """The lock server serving dls-lock is killed, and the service keeps nothing of it (--lock-delay 0): the
    lock is handed on at once, dls-lock cannot take it back, and must say so, stop the command and what it
    left, and exit 75, within a few seconds."""
    data, err = data_file(tmp_path), tmp_path / "err"
    with running_service(tmp_path / "release", "--lock-delay", "0") as service, \
            service.client(timeout=10) as witness:
        proc, sleeps = _holding(service, data, err)
        with running(proc):
            holder = holder_of(witness, data, KEY)
            assert holder.client_pid == proc.pid
            os.kill(holder.pid, signal.SIGKILL)  # dls-lock's lock server
            killed = time.monotonic()
            with witness.lock(data, KEY, timeout=10):  # handed on: dls-lock cannot have it back
                assert proc.wait(timeout=10) == LOST, err.read_text()
                took = time.monotonic() - killed
                assert not any(alive(p.pid) for p in sleeps), "the command outlived the lock"
    said = err.read_text()
    assert re.search(f"dls-lock: lost the lock on {re.escape(f'{data} {KEY}')} \\(.+\\): stopping the command "
                     r"\(TERM now, KILL after 2 s\)\n", said), said
    assert took < 5, f"dls-lock stopped its command {took:.1f} s after its lock server was killed"


def test_a_lock_taken_back_after_its_lock_server_died_lets_the_command_run(service: Service, witness: Client,
                                                                          tmp_path: Path) -> None:
    """The same kill with the service's lock-delay (15 s): the lock is kept for dls-lock, which takes it back
    through a new lock server; the command runs on, and ends as it would have."""
    data, err = data_file(tmp_path), tmp_path / "err"
    proc, sleeps = _holding(service, data, err)
    with running(proc):
        killed = holder_of(witness, data, KEY).pid
        os.kill(killed, signal.SIGKILL)

        def taken_back() -> bool:
            holder = holder_of(witness, data, KEY)
            return holder.client_pid == proc.pid and holder.pid != killed

        wait_for(taken_back, 10, "dls-lock to take its lock back through another lock server", poll=0.1)
        assert proc.poll() is None and all(alive(p.pid) for p in sleeps), err.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM, err.read_text()
    assert "lost" not in err.read_text()


# -- a holder that falls silent (SIGSTOP): the keeper's lease -------------------------------------------------

#: A lock-delay that leaves the keeper's lease 4 s (less the 5 s a dead server takes to be found): TERM after
#: 2 s of the holder's silence (-k 2), KILL after 4, and the lock handed on 9 s after its lock server dies.
SILENT_DELAY = "9"


def test_a_stopped_dls_lock_whose_lock_is_lost_has_its_command_stopped_before_the_lock_is_handed_on(
        tmp_path: Path) -> None:
    """dls-lock is stopped (SIGSTOP: it can no longer hear that its lock is lost) and its lock server is
    killed: the service keeps the lock for the lock-delay, then hands it on. The keeper, which was not
    stopped, must have stopped the command by then; resumed, dls-lock says why and exits 75."""
    data, err = data_file(tmp_path), tmp_path / "err"
    with running_service(tmp_path / "release", "--lock-delay", SILENT_DELAY) as service, \
            service.client(timeout=30) as witness:
        proc, sleeps = _holding(service, data, err)
        with running(proc):
            server = holder_of(witness, data, KEY).pid
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                os.kill(server, signal.SIGKILL)
                with witness.lock(data, KEY, timeout=30):  # handed on after the lock-delay
                    assert not any(alive(p.pid) for p in sleeps), "the command ran beside the next holder"
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            assert proc.wait(timeout=15) == LOST, err.read_text()
    said = err.read_text()
    assert f"pid {proc.pid}) did not renew its lease in time (stopped or frozen?)" in said, said
    assert (f"dls-lock: this dls-lock (pid {proc.pid}) was stopped or frozen too long to be sure it still held the "
            f"lock on {data} {KEY}: the command was stopped\n") in said, said


def test_dls_lock_stopped_whole_and_resumed_keeps_its_command_running(tmp_path: Path) -> None:
    """dls-lock, its keeper and its command all stopped for longer than the lease (as the terminal's Ctrl-Z
    stops them), then resumed while the lock is still held: the keeper gives the holder its chance to renew,
    and the command runs on."""
    data, err = data_file(tmp_path), tmp_path / "err"
    with running_service(tmp_path / "release", "--lock-delay", SILENT_DELAY) as service:
        proc, sleeps = _holding(service, data, err)
        with running(proc):
            tree = [psutil.Process(proc.pid), *_tree(proc)]
            for p in tree:
                p.send_signal(signal.SIGSTOP)
            time.sleep(6)
            for p in reversed(tree):  # the command first, dls-lock last: the worst order for the keeper
                p.send_signal(signal.SIGCONT)
            time.sleep(3)
            assert proc.poll() is None and all(alive(p.pid) for p in sleeps), err.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 128 + signal.SIGTERM, err.read_text()
    assert "lease" not in err.read_text()


# -- the keeper keeps the lock's connection: no hand-on while the command may still run ------------------------

#: A command that writes the time, a line at a time, as fast as it can.
BEAT = textwrap.dedent("""\
    import sys, time
    with open(sys.argv[1], "a", buffering=1) as f:
        while True:
            f.write(f"{time.time():.6f}\\n")
""")


def _beating(service: Service, data: Path, tmp_path: Path, log: Path) -> subprocess.Popen[bytes]:
    script = tmp_path / "beat.py"
    script.write_text(BEAT)
    proc = service.dls_lock_popen(str(data), KEY, sys.executable, str(script), str(log))
    wait_for(lambda: log.exists() and log.stat().st_size > 0, 15, "the command to run")
    return proc


def _granted_after(witness: Client, data: Path, timeout: float) -> list[float]:
    """Start a thread in which ``witness`` waits for the lock; the list gets the time it was granted."""
    granted: list[float] = []

    def wait() -> None:
        with witness.lock(data, KEY, timeout=timeout):
            granted.append(time.time())

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    time.sleep(0.5)  # it waits by now
    return granted


def _last_beat(log: Path) -> float:
    return float(log.read_text().split()[-1])


@pytest.mark.parametrize("round_", range(3))
def test_a_killed_dls_lock_frees_its_lock_only_once_its_command_is_dead(service: Service, witness: Client,
                                                                       tmp_path: Path, round_: int) -> None:
    """SIGKILL of dls-lock: the kernel closes its connection at once, but the keeper holds a duplicate, so the
    service frees the lock only once the keeper has killed the command (the audit saw the command run 40 ms
    after the next grant)."""
    data, log = data_file(tmp_path), tmp_path / "beats"
    proc = _beating(service, data, tmp_path, log)
    with running(proc):
        granted = _granted_after(witness, data, 20)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: bool(granted), 15, "the witness to be granted the lock")
    assert _last_beat(log) < granted[0], "the command ran after the lock was handed on"


def test_a_stopped_keeper_keeps_the_lock_of_a_killed_dls_lock(service: Service, witness: Client,
                                                             tmp_path: Path) -> None:
    """The keeper stopped, dls-lock killed: the lock is not handed on while the keeper (and so the command)
    cannot be stopped; resumed, the keeper kills the command, and only then is the lock free."""
    data, log = data_file(tmp_path), tmp_path / "beats"
    proc = _beating(service, data, tmp_path, log)
    with running(proc):
        keeper = _keeper(proc)
        keeper.suspend()
        try:
            granted = _granted_after(witness, data, 30)
            proc.kill()
            proc.wait(timeout=10)
            time.sleep(3)
            assert not granted, "the lock was handed on while the command ran"
        finally:
            keeper.resume()
        wait_for(lambda: bool(granted), 15, "the witness to be granted the lock")
    assert _last_beat(log) < granted[0], "the command ran after the lock was handed on"


def test_a_keeper_keeps_no_connection_before_the_lock_is_held(service: Service, witness: Client,
                                                             tmp_path: Path) -> None:
    """dls-lock connects before it forks its keeper (the service starts the connection's lock server
    meanwhile), and the keeper closes its copy of that connection at once: it keeps one only once handed it,
    the lock held. So a dls-lock killed while it waits for the lock, its keeper stopped, leaves no request
    behind: the lock goes to whoever asks next, not to the dead dls-lock's connection held open by the
    stopped keeper."""
    data, err = data_file(tmp_path), tmp_path / "err"
    held = witness.lock(data, KEY)
    with err.open("wb") as stderr:
        waiter = service.dls_lock_popen(str(data), KEY, "true", stderr=stderr)
    with running(waiter):
        wait_for(lambda: "waiting for" in err.read_text() or waiter.poll() is not None, 10,
                 "the waiter to say it waits")
        keeper = _keeper(waiter)
        keeper.suspend()
        try:
            waiter.kill()
            waiter.wait(timeout=10)
            held.release()
            with service.client(timeout=10) as other:
                assert wait_free(other, data, KEY, 5) < 5, "the lock went to the killed dls-lock's request"
        finally:
            keeper.resume()
    wait_for(lambda: not alive(keeper.pid), 10, "the keeper to end")


def test_a_stopped_keeper_is_killed_with_the_command_when_the_lock_is_lost(tmp_path: Path) -> None:
    """The keeper stopped, then the lock lost (the service stopped for good: not taken back within the
    lock-delay less 5 s): told to stop, the keeper cannot, so dls-lock KILLs it a grace period later, and the
    command dies with it, long before the service could have handed the lock on."""
    data, log = data_file(tmp_path), tmp_path / "beats"
    with running_service(tmp_path / "release", "--lock-delay", "9") as service:
        proc = _beating(service, data, tmp_path, log)
        with running(proc):
            keeper = _keeper(proc)
            keeper.suspend()
            stopped = time.time()
            assert service.jdls("-k").returncode == 0
            assert proc.wait(timeout=20) == LOST
            assert not alive(keeper.pid)
            last = _last_beat(log)
            time.sleep(0.5)
            assert _last_beat(log) == last, "the command still runs"
            assert last < stopped + 9, "the command ran past the service's lock-delay"


def test_the_command_does_not_get_the_lock_connection(service: Service, witness: Client, tmp_path: Path) -> None:
    """The keeper's duplicates of the connection are close-on-exec: the command holds no socket (it could
    keep the lock after dls-lock and its keeper are gone, or speak for them)."""
    data, out = data_file(tmp_path), tmp_path / "fds"
    result = service.dls_lock(str(data), KEY, "sh", "-c", f"ls -l /proc/$$/fd > {shlex.quote(str(out))}")
    assert result.returncode == 0, result.stderr
    assert "socket:" not in out.read_text(), out.read_text()


def test_a_kill_after_beyond_the_margin_is_warned_of(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    result = service.dls_lock("-k", "8", str(data), KEY, "true")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("dls-lock: warning: -k 8 is not less than the 5 s between a lost lock being told "
                                    "and the service handing it on"), result.stderr


def test_a_killed_keeper_is_said(service: Service, witness: Client, tmp_path: Path) -> None:
    data, err = data_file(tmp_path), tmp_path / "err"
    proc, _sleeps = _holding(service, data, err)
    with running(proc):
        keeper = _keeper(proc)
        keeper.kill()
        assert proc.wait(timeout=10) == 128 + signal.SIGKILL
    assert f"dls-lock: the keeper (pid {keeper.pid}) was killed, and the command with it\n" in err.read_text()

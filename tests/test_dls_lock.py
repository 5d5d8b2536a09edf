"""dls-lock answers for every process its command starts: real dls-lock processes on a real service.

The lock lasts while any process the command started runs (as flock(1)'s does), whether it stayed in the
command's process group, made a session of its own or was forked twice; each such process gets a signal
dls-lock passes on exactly once, however it was sent (kill, or the terminal's Ctrl-C); and none of them
outlives dls-lock, even killed by SIGKILL. A witness client of the test checks who holds the lock.
"""

from __future__ import annotations

import os
import pty
import select
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dls_client import Client, LockRefused
from dls_testkit import DLS_LOCK, KEY, Service, alive, data_file, holder_of, lock_holder, running, wait_for, wait_free

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
        assert told[0].startswith("dls-lock: the command ended (3); waiting for "), told
        assert "process" in told[0] and "the command started: pid" in told[0] and str(left) in told[0], told

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
            waiter.send_signal(signum)
            assert waiter.wait(timeout=10) == -signum, err.read_text()
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

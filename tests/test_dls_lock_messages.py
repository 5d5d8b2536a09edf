"""What dls-lock says while it waits, and when JDLS EXIT meets a lost service (issue 12, second audit).

Real dls-lock processes on a real service: a waiter behind a holder with a short TIMEOUT (interim messages
every second) says "waiting for" once; a holder with JDLS EXIT whose service is stopped under it
(``jdls -k``) tells the loss and exits 75 as without EXIT, instead of dying silently of its own SIGTERM.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from dls_client.exitcodes import LOST
from dls_testkit import DLS_LOCK, KEY, Service, data_file, lock_holder, running, wait_for

pytestmark = pytest.mark.slow


def _env(service: Service, *options: str) -> dict[str, str]:
    return dict(service.env, JDLS=service.jdls_value(*options))


def test_the_waiting_line_is_said_once_per_wait(service: Service, tmp_path: Path) -> None:
    """TIMEOUT=3: an interim message every second; the holder keeps the lock 3 s, so the waiter is told 3 or
    4 times that it still waits. It said "waiting for" at each; once is enough (VERBOSE traces the rest)."""
    data = data_file(tmp_path)
    with running(lock_holder(service, data, tmp_path / "held", seconds=3)):
        done = subprocess.run([DLS_LOCK, str(data), KEY, "true"], env=_env(service, "TIMEOUT=3"),
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    [said] = done.stderr.splitlines()
    assert re.fullmatch(rf"dls-lock: waiting for {re.escape(str(data))} {KEY}, held by port \d+, pid \d+ on "
                        r"127\.0\.0\.1 \(lock server pid \d+\)", said), done.stderr


def test_hold_says_waiting_once_too(service: Service, tmp_path: Path) -> None:
    data, out = data_file(tmp_path), tmp_path / "out"
    script = tmp_path / "hold.sh"
    script.write_text(f"#!/bin/sh\n{shlex.quote(DLS_LOCK)} --hold {shlex.quote(str(data))} {KEY} || exit 9\n"
                      f"{shlex.quote(DLS_LOCK)} -u {shlex.quote(str(data))} {KEY}\necho done > {out}\n")
    script.chmod(0o755)
    with running(lock_holder(service, data, tmp_path / "held", seconds=3)):
        done = subprocess.run([str(script)], env=dict(_env(service, "TIMEOUT=3"), TMPDIR=str(tmp_path)),
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "done\n"
    assert done.stderr.count("waiting for") == 1, done.stderr


@pytest.mark.parametrize("exit_option", [True, False], ids=["EXIT", "without"])
def test_a_lost_service_is_a_lost_lock_with_or_without_exit(service: Service, tmp_path: Path,
                                                             exit_option: bool) -> None:
    """jdls -k under a dls-lock running its command: the lock is lost; dls-lock says so, stops the command and
    exits 75. With JDLS EXIT it used to SIGTERM itself and end with 143 without a word."""
    data, started, err = data_file(tmp_path), tmp_path / "started", tmp_path / "err"
    with err.open("wb") as stderr:
        proc = subprocess.Popen([DLS_LOCK, "-k", "0.5", str(data), KEY, "sh", "-c",
                                 f"touch {shlex.quote(str(started))}; exec sleep 60"],
                                env=_env(service, *(["EXIT"] if exit_option else [])), stdin=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        with running(proc):
            wait_for(lambda: started.exists() or proc.poll() is not None, 10, "the command to start")
            assert proc.poll() is None, err.read_text()
            stopped = service.jdls("-k")
            assert stopped.returncode == 0, stopped.stderr
            assert proc.wait(timeout=30) == LOST, err.read_text()
        said = err.read_text()
        assert re.search(rf"^dls-lock: lost the lock on {re.escape(str(data))} {KEY} \(.+\): stopping the command",
                         said, re.MULTILINE), said
    finally:
        service.start()  # for the fixture's stop and check
        wait_for(lambda: service.pid("listener") is not None, 10, "the service to be back")


def test_a_lost_service_under_hold_with_exit_is_told(service: Service, tmp_path: Path) -> None:
    """--hold with JDLS EXIT: the hold process tells the loss and stops the shell (TERM), as without EXIT;
    it used to die of its own SIGTERM, and its guard killed the shell (KILL) with no word of the service."""
    data, ready, err = data_file(tmp_path), tmp_path / "ready", tmp_path / "err"
    script = tmp_path / "hold.sh"
    script.write_text(f"#!/bin/sh\n{shlex.quote(DLS_LOCK)} -k 0.5 --hold {shlex.quote(str(data))} {KEY} || exit 9\n"
                      f"touch {shlex.quote(str(ready))}\nwhile :; do sleep 0.05; done\n")
    script.chmod(0o755)
    with err.open("wb") as stderr:
        shell = subprocess.Popen([str(script)], env=dict(_env(service, "EXIT"), TMPDIR=str(tmp_path)),
                                 stdin=subprocess.DEVNULL, stderr=stderr)
    try:
        with running(shell):
            wait_for(lambda: ready.exists() or shell.poll() is not None, 10, "the shell to hold its lock")
            assert shell.poll() is None, err.read_text()
            stopped = service.jdls("-k")
            assert stopped.returncode == 0, stopped.stderr
            assert shell.wait(timeout=30) == -signal.SIGTERM, err.read_text()
        said = err.read_text().splitlines()[0]
        assert said.startswith(f"dls-lock: lost the lock on {data} {KEY} (") and said.endswith(
            f"): stopping the shell, pid {shell.pid}, and what it started (TERM now, KILL after 0.5 s)"), said
    finally:
        service.start()
        wait_for(lambda: service.pid("listener") is not None, 10, "the service to be back")

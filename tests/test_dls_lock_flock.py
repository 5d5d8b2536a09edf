"""dls-lock beside flock(1): where it behaves as flock does, and where it chose otherwise (its page says why).

Real dls-lock processes on a real service, a witness client checking who holds the lock; flock(1) itself
run side by side where the comparison is the point (skipped where util-linux's flock is not installed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dls_client import Client, shell_hold
from dls_testkit import (
    DLS_LOCK,
    KEY,
    NOBODY,
    Service,
    alive,
    data_file,
    holder_of,
    lock_holder,
    reachable_dir,
    running,
    running_service,
    wait_for,
    wait_free,
)

FLOCK = shutil.which("flock")
needs_flock = pytest.mark.skipif(FLOCK is None, reason="util-linux's flock(1) is not installed")

USAGE = ("usage: dls-lock [options] FILE KEY {COMMAND [ARG ...] | -c COMMAND}  or  dls-lock [options] {--hold | -u} "
         "FILE KEY\n")


@pytest.fixture
def witness(service: Service) -> Iterator[Client]:
    with service.client(timeout=10) as client:
        yield client


# -- FILE must exist ----------------------------------------------------------------------------------


def test_a_missing_file_is_not_created(service: Service, tmp_path: Path) -> None:
    missing, ran = tmp_path / "FBNK.ACOUNT", tmp_path / "ran"
    result = service.dls_lock(str(missing), KEY, "touch", str(ran))
    assert result.returncode == 66
    assert result.stderr == (f"dls-lock: cannot lock records of {str(missing)!r}: No such file or directory "
                             "(dls-lock does not create FILE: the lock is on a record of a file that exists)\n")
    assert not missing.exists() and not ran.exists()


@needs_flock
def test_flock_creates_the_file_dls_lock_would_refuse(tmp_path: Path) -> None:
    """The difference the page documents, seen side by side."""
    missing = tmp_path / "made-by-flock"
    assert FLOCK is not None
    assert subprocess.run([FLOCK, str(missing), "true"], check=False).returncode == 0
    assert missing.exists()


# -- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "said"), [
    ([], "missing FILE, KEY and COMMAND (or -c COMMAND): give the file, the record key and the command to run"),
    (["F"], "missing KEY and COMMAND (or -c COMMAND): give the file, the record key and the command to run"),
    (["F", "K"], "missing COMMAND (or -c COMMAND): give the file, the record key and the command to run"),
    (["-c", "true", "F"], "missing KEY: give the file, the record key and the command to run"),
    (["F", "K", "-c", "a", "b"], "-c takes one argument, the whole command line in one (quoted) string"),
    (["-c", "a", "F", "K", "b"], "both -c COMMAND and a COMMAND given: give one"),
    (["-c", "a", "F", "K", "-c", "b"], "-c given twice"),
    (["F", "K", "-n", "true"], "'-n' after KEY: options go before FILE (only -c may follow KEY)"),
])
def test_a_usage_error_says_what_is_wrong_in_words(service: Service, argv: list[str], said: str) -> None:
    result = service.dls_lock(*argv)
    assert (result.returncode, result.stderr) == (2, f"{USAGE}dls-lock: error: {said}\n")


@pytest.mark.parametrize("where", ["before FILE", "after KEY", "after KEY, joined"])
def test_dash_c_runs_the_string_through_the_shell(service: Service, witness: Client, tmp_path: Path,
                                                  where: str) -> None:
    data, out = data_file(tmp_path), tmp_path / "out"
    line = f"echo $((2 + 3)) | sed s/5/five/ > {shlex.quote(str(out))}; exit 4"
    argv = {"before FILE": ["-c", line, str(data), KEY], "after KEY": [str(data), KEY, "-c", line],
            "after KEY, joined": [str(data), KEY, f"--command={line}"]}[where]
    result = service.dls_lock(*argv)
    assert (result.returncode, result.stderr) == (4, "")
    assert out.read_text() == "five\n"
    witness.try_lock(data, KEY).release()


def test_dash_c_uses_shell_as_flock_does(service: Service, tmp_path: Path) -> None:
    data, out = data_file(tmp_path), tmp_path / "out"
    shell = tmp_path / "myshell"
    shell.write_text(f"#!/bin/sh\necho \"$@\" > {shlex.quote(str(out))}\n")
    shell.chmod(0o755)
    result = subprocess.run([DLS_LOCK, str(data), KEY, "-c", "the line"], env={**service.env, "SHELL": str(shell)},
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "-c the line\n"


@pytest.mark.parametrize("how", ["by path", "found in PATH"])
def test_a_script_without_a_shebang_runs_with_bin_sh(service: Service, tmp_path: Path, how: str) -> None:
    """An executable file without a #! line: exec fails with ENOEXEC, and POSIX execvp runs it with /bin/sh, as
    flock(1) and the shells do (audit F2); dls-lock did not, and exited 126."""
    data, out = data_file(tmp_path), tmp_path / "out"
    script = tmp_path / "bin" / "noshebang"
    script.parent.mkdir()
    script.write_text(f'echo "$0 $*" > {shlex.quote(str(out))}\nexit 7\n')
    script.chmod(0o755)
    env = {**service.env, "PATH": f"{script.parent}:{os.environ['PATH']}"}
    command = str(script) if how == "by path" else script.name
    result = subprocess.run([DLS_LOCK, str(data), KEY, command, "a b", "c"], env=env, capture_output=True, text=True,
                            timeout=30, check=False, stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stderr) == (7, "")
    assert out.read_text() == f"{script} a b c\n"
    if FLOCK is not None:  # the same as flock's
        flocked = subprocess.run([FLOCK, str(data), command, "a b", "c"], env=env, check=False)
        assert flocked.returncode == 7
        assert out.read_text() == f"{script} a b c\n"


# -- -w 0 does not wait -------------------------------------------------------------------------------


def test_a_zero_wait_says_nothing_and_gives_up_at_once(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    held = lock_holder(service, data, tmp_path / "held")
    with running(held):
        zero = service.dls_lock("-w", "0", str(data), KEY, "true")
        assert (zero.returncode, zero.stderr) == (1, "")
        custom = service.dls_lock("-w", "0", "-E", "9", str(data), KEY, "true")
        assert (custom.returncode, custom.stderr) == (9, "")
        waited = service.dls_lock("-w", "0.3", str(data), KEY, "true")  # a wait that waits says so
        assert waited.returncode == 1 and "dls-lock: waiting for" in waited.stderr
        held.send_signal(signal.SIGTERM)
        held.wait(timeout=10)


# -- -o: the lock ends with the command ----------------------------------------------------------------


def test_dash_o_releases_when_the_command_ends(service: Service, witness: Client, tmp_path: Path) -> None:
    """Without -o the lock lasts while what the command left runs (test_dls_lock); with -o, as with
    flock -o, only while the command runs: what it left goes on, without the lock."""
    data, pid_file = data_file(tmp_path), tmp_path / "left.pid"
    script = f"sleep 60 >/dev/null 2>&1 & echo $! > {shlex.quote(str(pid_file))}; exit 5"
    result = service.dls_lock("-o", str(data), KEY, "sh", "-c", script, timeout=15)
    left = int(pid_file.read_text())
    try:
        assert (result.returncode, result.stderr) == (5, "")
        assert alive(left)
        witness.try_lock(data, KEY).release()  # free though the sleep runs
    finally:
        os.kill(left, signal.SIGKILL)


def test_dash_o_still_stops_the_command_when_dls_lock_is_killed(service: Service, witness: Client,
                                                                 tmp_path: Path) -> None:
    data, marker = data_file(tmp_path), tmp_path / "started"
    proc = service.dls_lock_popen("-o", str(data), KEY, "sh", "-c",
                                  f"touch {shlex.quote(str(marker))}; exec sleep 60")
    with running(proc):
        wait_for(lambda: marker.exists() or proc.poll() is not None, 10, "the command to start")
        assert holder_of(witness, data, KEY).client_pid == proc.pid
        [keeper] = _children(proc.pid)
        [command] = _children(keeper)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(lambda: not alive(command), 5, "the command to be killed with dls-lock")


def _children(pid: int) -> list[int]:
    return [child.pid for child in psutil.Process(pid).children()]


# -- the whole-script idiom the page gives instead of flock's descriptor form ------------------------------


def test_a_script_locks_itself_by_running_under_dls_lock(service: Service, witness: Client,
                                                         tmp_path: Path) -> None:
    data, go, out = data_file(tmp_path), tmp_path / "go", tmp_path / "out"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$DLS_LOCKED" = "$0" ] || exec env DLS_LOCKED="$0" dls-lock -n {shlex.quote(str(data))} {KEY} '
        '"$0" "$@"\n'
        f'echo "$$ $*" > {shlex.quote(str(out))}\n'
        f"while [ ! -e {shlex.quote(str(go))} ]; do sleep 0.05; done\n")
    script.chmod(0o755)
    env = {**service.env, "PATH": f"{Path(DLS_LOCK).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([str(script), "a b", "c"], env=env, stdin=subprocess.DEVNULL)
    with running(proc):
        wait_for(lambda: (out.exists() and out.read_text().endswith("\n")) or proc.poll() is not None, 10,
                 "the script to run under its lock")
        assert proc.poll() is None
        assert out.read_text().split(" ", 1)[1] == "a b c\n"  # its arguments kept
        assert holder_of(witness, data, KEY).client_pid == proc.pid  # dls-lock took the script's pid
        second = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert second.returncode == 1  # -n: a second run gives up at once
        go.touch()
        assert proc.wait(timeout=10) == 0
    witness.try_lock(data, KEY).release()


# -- --hold and -u: a lock for the life of the calling shell (flock's descriptor form) ---------------------


def _script(tmp_path: Path, name: str, body: str) -> Path:
    script = tmp_path / name
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return script


def _shell(service: Service, script: Path, stderr: Path, tmpdir: Path | None = None) -> subprocess.Popen[bytes]:
    """Run ``script`` with dls-lock in PATH; TMPDIR (where --hold makes its socket directory) the test's own."""
    env = {**service.env, "PATH": f"{Path(DLS_LOCK).parent}:{os.environ['PATH']}",
           "TMPDIR": str(tmpdir or script.parent)}
    with stderr.open("wb") as err:
        return subprocess.Popen([str(script)], env=env, stdin=subprocess.DEVNULL, stderr=err)


def _hold_process(holder_pid: int) -> psutil.Process:
    process = psutil.Process(holder_pid)
    assert process.name() == "dls-lock hold"
    return process


def _holding_shell(service: Service, tmp_path: Path, *options: str, trap: bool = False,
                   data: Path | None = None) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """A shell script that takes --hold on (data, KEY), leaves a sleep in the background, touches READY and
    waits for GO; returned once it holds the lock, with its stderr file and the sleep's pid file."""
    data = data or data_file(tmp_path)
    ready, go, sleep_pid, err = (tmp_path / name for name in ("ready", "go", "sleep.pid", "shell.err"))
    script = _script(tmp_path, "hold.sh",
                     f"dls-lock {' '.join(options)} --hold {shlex.quote(str(data))} {KEY} || exit 9\n"
                     + ("trap 'echo TERM ignored >&2' TERM\n" if trap else "")
                     + f"sleep 60 & echo $! > {shlex.quote(str(sleep_pid))}\n"
                     f"touch {shlex.quote(str(ready))}\n"
                     f"while [ ! -e {shlex.quote(str(go))} ]; do sleep 0.05; done\n")
    shell = _shell(service, script, err)
    try:
        wait_for(lambda: ready.exists() or shell.poll() is not None, 10, "the shell to hold its lock")
        assert shell.poll() is None, f"the shell ended ({shell.returncode}): {err.read_text()}"
    except BaseException:
        shell.kill()
        shell.wait()
        raise
    return shell, err, sleep_pid


def test_hold_keeps_the_lock_until_the_shell_ends(service: Service, witness: Client, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    shell, err, sleep_pid = _holding_shell(service, tmp_path, data=data)
    with running(shell):
        holder = _hold_process(holder_of(witness, data, KEY).client_pid)
        assert holder.ppid() != shell.pid  # not the shell's child: its end is what it waits for
        (tmp_path / "go").touch()
        assert shell.wait(timeout=10) == 0, err.read_text()
    assert wait_free(witness, data, KEY, 3) < 3
    wait_for(lambda: not alive(holder.pid), 5, "the hold process to end with the shell")
    os.kill(int(sleep_pid.read_text()), signal.SIGKILL)  # left by the shell; it never kept the lock
    assert err.read_text() == ""


def test_hold_ends_with_a_killed_shell(service: Service, witness: Client, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    shell, _, sleep_pid = _holding_shell(service, tmp_path, data=data)
    with running(shell):
        holder = _hold_process(holder_of(witness, data, KEY).client_pid)
        shell.kill()
        shell.wait(timeout=10)
    assert wait_free(witness, data, KEY, 3) < 3
    wait_for(lambda: not alive(holder.pid), 5, "the hold process to end with the shell")
    os.kill(int(sleep_pid.read_text()), signal.SIGKILL)


def test_dash_u_releases_the_shells_lock(service: Service, witness: Client, tmp_path: Path) -> None:
    data, out, err = data_file(tmp_path), tmp_path / "out", tmp_path / "err"
    quoted = f"{shlex.quote(str(data))} {KEY}"
    script = _script(tmp_path, "u.sh", "\n".join([
        f"dls-lock --hold {quoted}; a=$?",
        f"dls-lock -n {quoted} true; b=$?",  # held: by this shell's hold, as by anyone else
        f"dls-lock --hold {quoted}; c=$?",  # twice: refused, as a lock held already
        f"dls-lock -u {quoted}; d=$?",
        f"dls-lock -n {quoted} true; e=$?",
        f"dls-lock -u {quoted}; f=$?",
        f"echo $a $b $c $d $e $f > {shlex.quote(str(out))}", ""]))
    shell = _shell(service, script, err)
    with running(shell):
        assert shell.wait(timeout=30) == 0
    assert out.read_text() == "0 1 1 0 0 1\n", err.read_text()
    assert err.read_text() == (f"dls-lock: {data} {KEY} is held for this shell already (release it with "
                               f"dls-lock -u first)\ndls-lock: {data} {KEY} is not held for this shell (pid "
                               f"{shell.pid}): nothing to release\n")
    witness.try_lock(data, KEY).release()


def test_dash_u_from_another_process_releases_nothing(service: Service, witness: Client, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    shell, _, sleep_pid = _holding_shell(service, tmp_path, data=data)
    with running(shell):
        other = service.dls_lock("-u", str(data), KEY)  # its parent is this test, not the shell
        assert (other.returncode, other.stderr) == (
            1, f"dls-lock: {data} {KEY} is not held for this shell (pid {os.getpid()}): nothing to release\n")
        holder_of(witness, data, KEY)  # still held
        (tmp_path / "go").touch()
        shell.wait(timeout=10)
    os.kill(int(sleep_pid.read_text()), signal.SIGKILL)


def test_a_killed_hold_process_is_told_by_its_guard(service: Service, witness: Client, tmp_path: Path) -> None:
    """SIGKILL to the hold process: the lock goes with its connection, and its guard stops the shell (which
    ignores TERM here: KILL after -k) and what it started."""
    data = data_file(tmp_path)
    shell, err, sleep_pid = _holding_shell(service, tmp_path, "-k", "0.5", trap=True, data=data)
    with running(shell):
        holder = _hold_process(holder_of(witness, data, KEY).client_pid)
        holder.kill()
        assert shell.wait(timeout=10) == -signal.SIGKILL
    wait_for(lambda: not alive(int(sleep_pid.read_text())), 5, "what the shell started to be stopped")
    said = err.read_text().splitlines()
    assert said[0] == (
        f"dls-lock: the process holding the lock on {data} {KEY} (pid {holder.pid}) ended: the lock is gone; "
        f"killing the shell, pid {shell.pid}, and what it started (KILL now: the lock may be someone else's "
        "already)")
    assert "TERM ignored" not in said  # no TERM and no grace: the next holder may have the lock already
    wait_free(witness, data, KEY, 5)  # once the guard, which kept the connection, has ended
    witness.try_lock(data, KEY).release()


def test_a_lost_hold_stops_the_shell(tmp_path: Path) -> None:
    """The hold process's lock server is killed and the service keeps nothing (--lock-delay 0): the lock is
    handed on, and the shell is told (on its standard error) and stopped with what it started."""
    data = data_file(tmp_path)
    with running_service(tmp_path / "release", "--lock-delay", "0") as service, \
            service.client(timeout=10) as witness:
        shell, err, sleep_pid = _holding_shell(service, tmp_path, "-k", "0.5", data=data)
        with running(shell):
            holder = holder_of(witness, data, KEY)
            hold = _hold_process(holder.client_pid)
            guard = hold.children()
            os.kill(holder.pid, signal.SIGKILL)  # its lock server
            with witness.lock(data, KEY, timeout=10):
                assert shell.wait(timeout=10) == -signal.SIGTERM, err.read_text()
                wait_for(lambda: not alive(int(sleep_pid.read_text())), 5, "what the shell started to be stopped")
            # The hold process and its guard end too (after the -k grace), before the service is stopped.
            wait_for(lambda: not any(alive(p.pid) for p in [hold, *guard]), 10, "the hold process and its guard to end")
        said = err.read_text().splitlines()[0]  # the shell may add a line of its own ("Terminated")
        assert said.startswith(f"dls-lock: lost the lock on {data} {KEY} (") and said.endswith(
            f"): stopping the shell, pid {shell.pid}, and what it started (TERM now, KILL after 0.5 s)"), said


def test_a_stopped_hold_process_whose_lock_is_lost_has_the_shell_stopped_before_the_lock_is_handed_on(
        tmp_path: Path) -> None:
    """The hold process is stopped (SIGSTOP: it can no longer hear that its lock is lost) and its lock server
    killed; the service keeps the lock 9 s, then hands it on. The guard must have stopped the shell by then
    (its lease: 9 s less the 5 s a dead server takes to be found)."""
    data = data_file(tmp_path)
    with running_service(tmp_path / "release", "--lock-delay", "9") as service, \
            service.client(timeout=30) as witness:
        shell, err, sleep_pid = _holding_shell(service, tmp_path, "-k", "0.5", data=data)
        with running(shell):
            holder = holder_of(witness, data, KEY)
            hold = _hold_process(holder.client_pid)
            hold.suspend()
            try:
                os.kill(holder.pid, signal.SIGKILL)  # its lock server
                with witness.lock(data, KEY, timeout=30):  # handed on after the lock-delay
                    assert shell.poll() is not None, "the shell ran beside the next holder"
                    assert not alive(int(sleep_pid.read_text())), "what the shell started ran beside the next holder"
            finally:
                hold.resume()
            assert shell.wait(timeout=10) == -signal.SIGTERM, err.read_text()
            wait_for(lambda: not alive(hold.pid), 10, "the hold process to end once resumed")
    said = err.read_text().splitlines()[0]
    assert said.startswith(f"dls-lock: the process holding the lock (pid {hold.pid}) did not renew its lease in "
                           f"time (stopped or frozen?): the lock may be lost; stopping the shell, pid {shell.pid}, "
                           "and what it started (TERM now, KILL after 0.5 s)"), said


def test_a_stopped_guard_keeps_the_lock_of_a_killed_hold_process(service: Service, witness: Client,
                                                                 tmp_path: Path) -> None:
    """The guard stopped, the hold process killed: the guard holds duplicates of the lock's connection, so the
    lock is not handed on while the shell runs untold; resumed, the guard kills the shell, and only then is the
    lock free (the audit's F2; and a killed hold process's lock is never freed before its shell is dead)."""
    data = data_file(tmp_path)
    shell, _, sleep_pid = _holding_shell(service, tmp_path, data=data)
    with running(shell):
        hold = _hold_process(holder_of(witness, data, KEY).client_pid)
        [guard] = hold.children()
        guard.suspend()
        granted: list[float] = []

        def wait() -> None:
            with witness.lock(data, KEY, timeout=30):
                granted.append(time.monotonic())

        waiter = threading.Thread(target=wait, daemon=True)
        try:
            waiter.start()
            hold.kill()
            time.sleep(3)
            assert not granted and shell.poll() is None, "the lock was handed on while the shell ran"
        finally:
            guard.resume()
        assert shell.wait(timeout=10) == -signal.SIGKILL
        shell_dead = time.monotonic()
        waiter.join(15)
        assert granted and granted[0] >= shell_dead - 0.05, "the lock was handed on before the shell was dead"
    wait_for(lambda: not alive(int(sleep_pid.read_text())), 5, "what the shell started to be killed")


def test_a_killed_guard_is_told_and_stops_the_shell(service: Service, witness: Client, tmp_path: Path) -> None:
    """SIGKILL to the guard: nothing would stop the shell if the hold process were killed next (the third
    audit did so, and the shell ran on beside the next holder), so the hold process tells the shell and stops
    it as for a lost lock, then lets the lock go."""
    data = data_file(tmp_path)
    shell, err, sleep_pid = _holding_shell(service, tmp_path, "-k", "0.5", data=data)
    with running(shell):
        hold = _hold_process(holder_of(witness, data, KEY).client_pid)
        [guard] = hold.children()
        guard.kill()
        assert shell.wait(timeout=10) == -signal.SIGTERM, err.read_text()
        wait_for(lambda: not alive(hold.pid), 10, "the hold process to end")
    wait_for(lambda: not alive(int(sleep_pid.read_text())), 5, "what the shell started to be stopped")
    said = err.read_text().splitlines()[0]
    assert said.startswith(f"dls-lock: lost the lock on {data} {KEY} (its guard, pid {guard.pid}, ended: nothing "
                           "would stop the shell if the hold process were killed next): stopping the shell"), said
    witness.try_lock(data, KEY).release()


def _squat(names: list[bytes], tmp: Path, uid: int, file: str, ready: int, stop: int) -> int:
    """As nobody: bind every abstract name of ``names``, and ``file`` in directories of the name pattern of
    ``uid``'s socket directories in ``tmp`` (one 0700, one 0777, a symlink to the latter); tell ``ready``, wait
    for ``stop``; the number of connections the squatted sockets got (the exit status)."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    servers = []
    for name in names:
        servers.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        servers[-1].bind(name)
    for suffix, mode in (("squat0700", 0o700), ("squat0777", 0o777)):
        directory = tmp / f"dls-lock-{uid}.{suffix}"
        directory.mkdir()
        directory.chmod(mode)
        servers.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        servers[-1].bind(str(directory / file))
    (tmp / f"dls-lock-{uid}.link").symlink_to(tmp / f"dls-lock-{uid}.squat0777")
    for server in servers:
        server.listen(8)
        server.setblocking(False)
    os.write(ready, b"r")
    os.read(stop, 1)
    connections = 0
    for server in servers:
        with contextlib.suppress(BlockingIOError):
            while server.accept():
                connections += 1
    return connections


@pytest.mark.skipif(os.geteuid() != 0, reason="another user is needed: the test runs as root to become nobody")
def test_hold_and_unlock_cannot_be_squatted_by_another_user(service: Service, witness: Client, tmp_path: Path) -> None:
    """Another local user binds the socket name --hold would use, before the shell runs it (audit F4): the
    abstract name of before (predictable: the shell's pid and start time, the inode, the key's digest), and
    the name in directories of the socket directory's name pattern, of their own or open to all, or a symlink.
    --hold and -u still work, and never talk to the squatter."""
    data, pid_file, go, out, err = data_file(tmp_path), *(tmp_path / n for n in ("pid", "go", "out", "err"))
    quoted = f"{shlex.quote(str(data))} {KEY}"
    script = _script(tmp_path, "squatted.sh", "\n".join([
        f"echo $$ > {shlex.quote(str(pid_file))}",
        f"while [ ! -e {shlex.quote(str(go))} ]; do sleep 0.05; done",
        f"dls-lock --hold {quoted}; a=$?",
        f"dls-lock -n {quoted} true; b=$?",
        f"dls-lock -u {quoted}; c=$?",
        f"echo $a $b $c > {shlex.quote(str(out))}", ""]))
    with reachable_dir() as shared:
        tmp = shared / "tmp"  # the test's own /tmp: sticky and open to all, as /tmp is
        tmp.mkdir()
        tmp.chmod(0o1777)
        shell = _shell(service, script, err, tmp)
        with running(shell):
            wait_for(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"), 10, "the shell to start")
            pid = int(pid_file.read_text())
            stat_line = Path(f"/proc/{pid}/stat").read_text()
            start = stat_line[stat_line.rfind(")") + 2:].split()[19]
            inode, digest = data.stat().st_ino, hashlib.sha256(KEY.encode()).hexdigest()
            abstract = f"\0dls-lock/{os.getuid()}/{pid}.{start}/{inode}/{digest[:32]}".encode()
            file = shell_hold.socket_file(pid, inode, KEY.encode())
            ready_read, ready_write = os.pipe()
            stop_read, stop_write = os.pipe()
            squatter = os.fork()
            if squatter == 0:
                code = 99
                try:
                    code = _squat([abstract], tmp, os.geteuid(), file, ready_write, stop_read)
                finally:
                    os._exit(code)
            try:
                os.close(ready_write)
                os.close(stop_read)
                assert os.read(ready_read, 1) == b"r", "the squatter did not get ready"
                go.touch()
                assert shell.wait(timeout=30) == 0
            finally:
                os.write(stop_write, b"s")
                _, status = os.waitpid(squatter, 0)
                for fd in (ready_read, stop_write):
                    os.close(fd)
        assert out.read_text() == "0 1 0\n", err.read_text()
        assert err.read_text() == ""
        assert os.waitstatus_to_exitcode(status) == 0, "the squatter's sockets were connected to"
        [own] = [entry for entry in tmp.iterdir() if not entry.name.startswith(f"dls-lock-{os.getuid()}.squat")
                 and not entry.is_symlink()]
        assert stat.S_IMODE(own.lstat().st_mode) == 0o700 and own.lstat().st_uid == os.getuid()
        assert list(own.iterdir()) == []  # the socket is removed when the hold ends
    witness.try_lock(data, KEY).release()


def test_a_socket_left_by_a_killed_hold_process_is_replaced(service: Service, witness: Client,
                                                             tmp_path: Path) -> None:
    """The hold process and its guard killed at once (the one case where the shell lives on): their socket file
    stays in the user's directory, nothing listening on it; the shell's next --hold replaces it, and -u
    reaches the new hold process."""
    data, ready, go, out, err = data_file(tmp_path), *(tmp_path / n for n in ("ready", "go", "out", "err"))
    quoted = f"{shlex.quote(str(data))} {KEY}"
    script = _script(tmp_path, "again.sh", "\n".join([
        f"dls-lock --hold {quoted} || exit 9",
        f"touch {shlex.quote(str(ready))}",
        f"while [ ! -e {shlex.quote(str(go))} ]; do sleep 0.05; done",
        f"dls-lock --hold {quoted}; a=$?",
        f"dls-lock -u {quoted}; b=$?",
        f"echo $a $b > {shlex.quote(str(out))}", ""]))
    shell = _shell(service, script, err)
    with running(shell):
        wait_for(lambda: ready.exists() or shell.poll() is not None, 10, "the shell to hold its lock")
        assert shell.poll() is None, err.read_text()
        hold = _hold_process(holder_of(witness, data, KEY).client_pid)
        [guard] = hold.children()
        hold.suspend()  # at once: stopped first, the hold process cannot act on its guard's end in between
        guard.kill()
        hold.kill()
        wait_for(lambda: not alive(hold.pid) and not alive(guard.pid), 5, "the hold process and its guard to end")
        [directory] = tmp_path.glob(f"dls-lock-{os.geteuid()}.*")
        assert len(list(directory.iterdir())) == 1  # the killed hold process's socket
        wait_free(witness, data, KEY, 10)
        go.touch()
        assert shell.wait(timeout=30) == 0
    assert (out.read_text(), err.read_text()) == ("0 0\n", "")
    # The last hold process removes its socket as it ends, which may be a moment after the shell's exit.
    wait_for(lambda: list(directory.iterdir()) == [], 5, "the hold process's socket to be removed")
    witness.try_lock(data, KEY).release()


@pytest.mark.parametrize(("argv", "said"), [
    (["--hold", "F", "K", "true"], "--hold runs no command: give FILE and KEY alone (not 'true')"),
    (["--hold", "-c", "true", "F", "K"], "--hold and -c given: --hold runs no command"),
    (["-u", "-o", "F", "K"], "-u and -o given: -u runs no command"),
    (["-u", "F"], "missing KEY: give the file and the record key"),
])
def test_hold_and_unlock_usage_errors(service: Service, argv: list[str], said: str) -> None:
    result = service.dls_lock(*argv)
    assert (result.returncode, result.stderr) == (2, f"{USAGE}dls-lock: error: {said}\n")


def test_sigterm_to_the_hold_process_and_its_guard_leaves_the_guard_to_stop_the_shell(
        service: Service, witness: Client, tmp_path: Path) -> None:
    """`pkill dls-lock` TERMs the hold process and its guard at once (the third audit: nothing was left to stop
    the shell, which ran on beside the next holder): the guard ignores TERM, finds the hold process gone, and
    kills the shell before it lets the lock's connection go."""
    data = data_file(tmp_path)
    shell, err, sleep_pid = _holding_shell(service, tmp_path, data=data)
    with running(shell):
        hold = _hold_process(holder_of(witness, data, KEY).client_pid)
        [guard] = hold.children()
        guard.terminate()
        hold.terminate()
        assert shell.wait(timeout=10) in (-signal.SIGKILL, -signal.SIGTERM), err.read_text()
        wait_for(lambda: not alive(guard.pid) and not alive(hold.pid), 10, "the guard and the hold process to end")
    wait_for(lambda: not alive(int(sleep_pid.read_text())), 5, "what the shell started to be killed")
    assert wait_free(witness, data, KEY, 5) < 5

"""dls_shm.pidfiles: the pid-file format, reading and writing it, liveness of a record, the lock and its tests."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from dls_shm import Instance, pidfiles
from dls_shm.pidfiles import SAME_START, PidRecord
from dls_testkit import wait_for


def test_text_and_read_round_trip(tmp_path: Path) -> None:
    record = pidfiles.record_of(os.getpid())
    assert record.started == psutil.Process().create_time()
    path = tmp_path / "jdls-monitor.pid"
    path.write_text(record.text())
    assert path.read_text() == f"{os.getpid()}\n{record.started:.6f}\n{psutil.Process().name()}\n"
    back = pidfiles.read(path)
    assert back is not None and back.pid == record.pid
    assert abs(back.started - record.started) < 1e-6


def test_record_of_a_process_whose_command_is_known_is_psutils() -> None:
    """A forking daemon gives its children's command (theirs is its own): the start time read from /proc without
    psutil's machinery is psutil's, to the digit, so that ``alive`` (psutil) never takes the child for another."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for pid in (os.getpid(), os.getppid(), child.pid):
            full = pidfiles.record_of(pid)
            assert pidfiles.record_of(pid, full.command) == full
            assert pidfiles.record_of(pid, full.command).alive()
    finally:
        child.kill()
        child.wait()
    with pytest.raises(psutil.NoSuchProcess):
        pidfiles.record_of(child.pid, "python")


@pytest.mark.parametrize("content", ["", "123\n", "abc\n1.5\n", "12\nnot-a-time\n"])
def test_read_of_an_incomplete_file_is_none(tmp_path: Path, content: str) -> None:
    path = tmp_path / "x.pid"
    path.write_text(content)
    assert pidfiles.read(path) is None


def test_read_of_no_file_is_none(tmp_path: Path) -> None:
    assert pidfiles.read(tmp_path / "missing.pid") is None
    (tmp_path / "file").write_text("")
    assert pidfiles.read(tmp_path / "file" / "below.pid") is None  # NotADirectoryError


def test_read_raises_other_errors(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        pidfiles.read(tmp_path)


def test_alive_is_this_very_process_only() -> None:
    me = pidfiles.record_of(os.getpid())
    assert me.alive()
    assert not PidRecord(me.pid, me.started + 10 * SAME_START).alive()  # a later process with our pid
    assert PidRecord(me.pid, me.started + SAME_START / 2).alive()


def test_alive_of_an_ended_process_and_a_zombie() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    record = PidRecord(child.pid, psutil.Process(child.pid).create_time())
    wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, 5, "the child to end")
    assert not record.alive()  # ended, not yet reaped
    child.wait()
    assert not record.alive()  # gone


def test_lock_holder_names_the_process_holding_the_lockf_lock(tmp_path: Path) -> None:
    path = tmp_path / "jdls-listener.pid"
    assert pidfiles.lock_holder(path) is None  # no file
    path.write_text("")
    assert pidfiles.lock_holder(path) is None  # not locked
    # A lock of this process does not conflict with itself: the holder must be another process.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.lockf(fd, fcntl.LOCK_EX); "
         "print('locked', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert pidfiles.lock_holder(path) == holder.pid
        fd = os.open(path, os.O_RDWR)
        try:  # tested, never taken: the holder still has it
            with pytest.raises(OSError):
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(5)
    assert pidfiles.lock_holder(path) is None


def test_paths_of_an_instance(tmp_path: Path) -> None:
    instance = Instance(tmp_path, 1)
    assert instance.servers_dir == tmp_path / "run" / "servers"
    assert instance.server_pid_file(42) == tmp_path / "run" / "servers" / "42.pid"


def test_read_or_none_never_raises(tmp_path: Path) -> None:
    assert pidfiles.read_or_none(tmp_path) is None  # a directory
    (tmp_path / "binary.pid").write_bytes(b"\xff\xfe\n")
    assert pidfiles.read_or_none(tmp_path / "binary.pid") is None
    pidfiles.write(tmp_path / "me.pid", pidfiles.record_of(os.getpid()))
    assert pidfiles.read_or_none(tmp_path / "me.pid") == pidfiles.read(tmp_path / "me.pid")


def test_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "servers" / "7.pid"  # the directories are made
    pidfiles.write(path, PidRecord(7, 1.5))
    assert pidfiles.read(path) == PidRecord(7, 1.5)
    assert [p.name for p in path.parent.iterdir()] == ["7.pid"]
    pidfiles.remove(path)
    pidfiles.remove(path)  # removing what is gone is no error
    assert not path.exists()


def test_running_removes_a_stale_file_running_pid_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "jdls-monitor.pid"
    me = pidfiles.record_of(os.getpid())
    path.write_text(me.text())
    assert pidfiles.running(path) == me and pidfiles.running_pid(path) == me.pid
    path.write_text(PidRecord(me.pid, me.started + 10).text())  # our pid, another start time: stale
    assert pidfiles.running_pid(path) is None
    assert path.exists()  # read only
    assert pidfiles.running(path) is None
    assert not path.exists()  # tidied
    assert pidfiles.running(path) is None and pidfiles.running_pid(path) is None


def test_a_held_pid_file_is_running_for_both_and_refuses_a_second_holder(tmp_path: Path) -> None:
    path = tmp_path / "jdls-listener.pid"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from pathlib import Path; from dls_shm import HeldPidFile; "
         "held = HeldPidFile.acquire(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read(); held.release()",
         str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        record = pidfiles.running(path)
        assert record is not None and record.pid == holder.pid
        assert pidfiles.running_pid(path) == holder.pid
        with pytest.raises(pidfiles.AlreadyRunning) as refused:
            pidfiles.HeldPidFile.acquire(path)
        assert refused.value.record == record
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(5) == 0
    assert not path.exists()  # released: removed, then unlocked
    held = pidfiles.HeldPidFile.acquire(path)
    try:
        assert pidfiles.read(path) == pidfiles.record_of(os.getpid())
    finally:
        held.release()
    assert not path.exists()


def test_a_record_names_its_process_by_start_time_and_command() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        me = pidfiles.record_of(sleeper.pid)
        assert me.command == "sleep" and me.alive() and me.impostor() is None
        other = PidRecord(sleeper.pid, me.started, "jdls")
        assert not other.alive()
        assert other.impostor() == f"pid {sleeper.pid} runs 'sleep', not 'jdls'"
        earlier = PidRecord(sleeper.pid, me.started - 10, "sleep")
        assert not earlier.alive() and "is now a process started at" in (earlier.impostor() or "")
        assert PidRecord(sleeper.pid, me.started).alive(), "a file of an older version: the start time decides"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert me.impostor() is None, "gone: nothing to signal, nothing to tell"


@pytest.mark.parametrize("problem", ["symlink", "world-writable"])
def test_an_untrusted_pid_file_is_refused_not_believed(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "jdls-monitor.pid"
    real = tmp_path / "elsewhere"
    real.write_text(pidfiles.record_of(os.getpid()).text())
    if problem == "symlink":
        path.symlink_to(real)
    else:
        real.rename(path)
        path.chmod(0o666)
    with pytest.raises(OSError, match="jdls-monitor.pid: " + ("is a symbolic link" if problem == "symlink"
                                                             else r"writable by others \(mode 0666\)")):
        pidfiles.read(path)
    assert pidfiles.read_or_none(path) is None


def test_pid_files_are_0640_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        pidfiles.write(tmp_path / "run" / "1.pid", pidfiles.record_of(os.getpid()))
        held = pidfiles.HeldPidFile.acquire(tmp_path / "run" / "held.pid")
    finally:
        os.umask(old)
    try:
        modes = {p.name: p.stat().st_mode & 0o7777 for p in (tmp_path / "run").iterdir()}
        assert modes == {"1.pid": 0o640, "held.pid": 0o640}
        assert (tmp_path / "run").stat().st_mode & 0o7777 == 0o750
    finally:
        held.release()

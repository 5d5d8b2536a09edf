"""dls_shm.pidfiles: the pid-file format, reading it, liveness of a record, and the lock-holder test."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from dls_shm import Instance, pidfiles
from dls_shm.pidfiles import SAME_START, PidRecord


def test_text_and_read_round_trip(tmp_path: Path) -> None:
    record = pidfiles.record_of(os.getpid())
    assert record.started == psutil.Process().create_time()
    path = tmp_path / "jdls-monitor.pid"
    path.write_text(record.text())
    assert path.read_text() == f"{os.getpid()}\n{record.started:.6f}\n"
    back = pidfiles.read(path)
    assert back is not None and back.pid == record.pid
    assert abs(back.started - record.started) < 1e-6


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
    deadline = time.monotonic() + 5
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
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
    assert pidfiles.servers_dir(instance) == tmp_path / "run" / "servers"
    assert pidfiles.server_pid_file(instance, 42) == tmp_path / "run" / "servers" / "42.pid"

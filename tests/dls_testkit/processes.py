"""Processes of a test: is one alive, ending the ones it started, forking children, pipes to talk to them,
and finding every process that belongs to an instance.

Whatever a test starts is ended when the test ends, however it ends, so that a failing test leaves
nothing running to the next one.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil

#: Two start times closer than this are the same process (as the daemon's pid files mean it).
SAME_START = 0.05
#: The exit code of a forked child whose body raised (as the daemon's "internal error").
CHILD_FAILED = 70


def alive(pid: int) -> bool:
    """A process with this pid exists and is not a zombie."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def gone(pid: int) -> bool:
    """No process with this pid runs (none, or a zombie not yet reaped)."""
    return not alive(pid)


@contextlib.contextmanager
def running(*procs: subprocess.Popen[Any]) -> Iterator[None]:
    """End these processes (SIGKILL, which also ends a stopped one) when the block is left, however."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def _within(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root) + os.sep)


def processes_of(root: Path) -> list[psutil.Process]:
    """Every live process of the instance at ``root``: listed in a pid file under run/ (and started when the
    file says), or with an environment (JBCRELEASEDIR) or working directory that refers to it. Zombies and
    this process do not count."""
    found: dict[int, psutil.Process] = {}
    run = root / "run"
    for path in [*run.glob("*.pid"), *run.glob("servers/*.pid")] if run.exists() else []:
        try:
            fields = path.read_text().split()
            pid, started = int(fields[0]), float(fields[1])
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < SAME_START:
                found[pid] = proc
        except (OSError, IndexError, ValueError, psutil.Error):
            continue
    me = os.getpid()
    for proc in psutil.process_iter(["status"]):
        if proc.pid == me or proc.pid in found or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get("JBCRELEASEDIR") == str(root) or _within(proc.cwd(), root):
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    return list(found.values())


def kill_all(procs: Iterable[psutil.Process]) -> list[str]:
    """SIGKILL each of ``procs``; a description of each ("pid command line") for a failure message."""
    described = []
    for proc in procs:
        try:
            described.append(f"{proc.pid} {proc.cmdline()}")
        except psutil.Error:
            described.append(str(proc.pid))
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return described


class Children:
    """Forked children of one test. Each runs a function and ends with ``os._exit``; ``reap_all`` kills and
    reaps whatever the test did not reap itself."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def fork(self, body: Callable[[], int | None]) -> int:
        """Run ``body`` in a child; its return value is the exit code (an exception: CHILD_FAILED)."""
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 0
            try:
                code = body() or 0
            except BaseException:
                traceback.print_exc()
                code = CHILD_FAILED
            finally:
                os._exit(code)
        self.pids.append(pid)
        return pid

    def wait(self, pid: int, timeout: float = 30.0) -> int:
        """Reap ``pid``: its exit code (negative: the signal that killed it)."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pids.remove(pid)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise AssertionError(f"child {pid} still running after {timeout} s")
            time.sleep(0.005)

    def kill(self, pid: int) -> int:
        os.kill(pid, signal.SIGKILL)
        return self.wait(pid)

    def reap_all(self) -> None:
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.pids.remove(pid)

    def check_reaped(self) -> None:
        """Reap every child still there, then fail if one of them still runs."""
        forked = list(self.pids)
        self.reap_all()
        running_now = {p.pid for p in psutil.Process().children()}
        assert not running_now & set(forked), f"forked children still running: {running_now & set(forked)}"


class Pipe:
    """A one-way pipe for telling a child or the parent that something happened."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def send(self, data: bytes = b".") -> None:
        os.write(self.w, data)

    def recv(self, size: int = 1, timeout: float = 10.0) -> bytes:
        data = b""
        deadline = time.monotonic() + timeout
        while len(data) < size:
            ready, _, _ = select.select([self.r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"nothing on the pipe after {timeout} s")
            chunk = os.read(self.r, size - len(data))
            if not chunk:
                raise AssertionError("the pipe was closed")
            data += chunk
        return data

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)

"""Fixtures of the dls-shm tests: lock tables under their own IPC keys, always removed; forked children,
always reaped.

Every table is made under a key derived from the test's own tmp_path, so tests running in parallel (and
other test runs on the machine) never meet, and is removed at teardown whatever the test did; teardown then
checks that no SysV object is left under the key.
"""

from __future__ import annotations

import os
import select
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import sysv_ipc
from dls_shm import Geometry, LockTable, geometry_for, ipc_key_for

#: Every key this test process made a table under, checked once more at the end of the session.
_KEYS: list[int] = []

MakeTable = Callable[..., LockTable]


def ipc_left(key: int) -> list[str]:
    """The SysV objects that still exist under ``key`` (empty when none)."""
    left = []
    try:
        shm = sysv_ipc.SharedMemory(key)
    except sysv_ipc.ExistentialError:
        pass
    else:
        shm.detach()
        left.append(f"shared memory id {shm.id}")
    try:
        sem = sysv_ipc.Semaphore(key)
    except sysv_ipc.ExistentialError:
        pass
    else:
        left.append(f"semaphore id {sem.id}")
    return left


def free_key(base: Path) -> int:
    """An IPC key derived from ``base`` under which nothing exists yet."""
    for n in range(100):
        key = ipc_key_for(base / f"table-{n}")
        if not ipc_left(key):
            return key
    raise AssertionError(f"no free IPC key near {base}")


@pytest.fixture(scope="session", autouse=True)
def _no_ipc_left_at_the_end() -> Iterator[None]:
    yield
    left = {f"0x{key:08x}": ipc_left(key) for key in _KEYS}
    assert not any(left.values()), f"SysV objects left behind: {left}"


@pytest.fixture
def make_table(tmp_path: Path) -> Iterator[MakeTable]:
    """make_table(geometry=..., **create_options) -> a new LockTable, removed at teardown."""
    tables: list[LockTable] = []

    def make(geometry: Geometry | None = None, **options: int) -> LockTable:
        key = free_key(tmp_path)
        _KEYS.append(key)
        table, created = LockTable.create(key, geometry or geometry_for(1000, 10), **options)
        tables.append(table)
        assert created, f"a table with key 0x{key:08x} existed already"
        return table

    yield make
    for table in tables:
        table.remove()
    for table in tables:
        with pytest.raises(sysv_ipc.ExistentialError):
            sysv_ipc.SharedMemory(table.key)
        with pytest.raises(sysv_ipc.ExistentialError):
            sysv_ipc.Semaphore(table.key)


@pytest.fixture
def table(make_table: MakeTable) -> LockTable:
    """A table of 101 groups of 10 locks."""
    return make_table()


class Children:
    """Forked children of one test. Each runs a function and ends with ``os._exit``; teardown kills and
    reaps whatever the test did not reap itself."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def fork(self, body: Callable[[], int | None]) -> int:
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 0
            try:
                code = body() or 0
            except BaseException:
                traceback.print_exc()
                code = 70
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
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            self.pids.remove(pid)


@pytest.fixture
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        forked = list(kids.pids)
        kids.reap_all()
        alive = {p.pid for p in psutil.Process().children()}
        assert not alive & set(forked)


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
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pipes() -> Iterator[Callable[[], Pipe]]:
    made: list[Pipe] = []

    def make() -> Pipe:
        made.append(Pipe())
        return made[-1]

    yield make
    for p in made:
        p.close()

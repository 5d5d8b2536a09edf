"""Fixtures of the dls-utils tests: a lock table of a private instance, always removed.

Each table belongs to an instance rooted in the test's own tmp_path (so its own
IPC key): tests running in parallel, and other runs on the machine, never meet.
The environment is cleaned of JDLS and DLS_IPC_KEY, which would otherwise send
show-item-locks to another service.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import sysv_ipc
from dls_shm import Instance, LockTable, geometry_for, ipc_key_for


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


@pytest.fixture(name="ipc_left")
def ipc_left_fixture() -> Callable[[int], list[str]]:
    """``ipc_left`` for test modules (importlib mode does not let them import conftest)."""
    return ipc_left


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Instance:
    """JBCRELEASEDIR of this test only, and nothing that points elsewhere; the instance (no table)."""
    root = tmp_path / "release"
    root.mkdir()
    for name in ("JDLS", "DLS_IPC_KEY", "JBCPORTNO"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JBCRELEASEDIR", str(root))
    instance = Instance.from_environment()
    assert instance.key == ipc_key_for(root)
    assert not ipc_left(instance.key), f"IPC key 0x{instance.key:08x} already in use"
    return instance


@dataclass
class Local:
    instance: Instance
    table: LockTable


@pytest.fixture
def local(clean_env: Instance) -> Iterator[Local]:
    """A table of the test's instance (11 groups of 10 locks), removed at teardown."""
    table, created = LockTable.create(clean_env.key, geometry_for(100, 10))
    assert created
    try:
        yield Local(clean_env, table)
    finally:
        table.remove()
    assert not ipc_left(clean_env.key)


# -- a real lock service (python -m dls_daemon -ib) of the test's own instance --------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    """A jdls of the test's instance (``clean_env``): ``jdls(...)`` runs more jdls commands on it."""

    instance: Instance
    port: int
    env: dict[str, str]
    #: Raw client connections a test made; closed before the service is stopped.
    sockets: list[socket.socket] = field(default_factory=list)

    def jdls(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dls_daemon", *args], env=self.env, capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)

    def start(self, *options: str) -> None:
        started = self.jdls("-ib", "--port", str(self.port), *options)
        assert started.returncode == 0, started.stderr

    def processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE or "dls_daemon" not in (proc.info["cmdline"] or []):
                    continue
                if proc.environ().get("JBCRELEASEDIR") == str(self.instance.root):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found


@contextlib.contextmanager
def stopped_after(svc: Daemon, *remove_options: str) -> Iterator[Daemon]:
    """Yield ``svc``; then stop it (-k), remove its table (-K ``remove_options``), and fail if a process
    or IPC object of it is left (after killing and reporting them)."""
    try:
        yield svc
    finally:
        for sock in svc.sockets:
            sock.close()
        stop = svc.jdls("-k")
        remove = svc.jdls("-K", *remove_options)
        leftovers = svc.processes()
        for proc in leftovers:  # never leave them to the next run, but still fail
            proc.kill()
        left = ipc_left(svc.instance.key)
        assert stop.returncode == 0, stop.stderr
        assert remove.returncode == 0, remove.stderr
        assert not leftovers, f"processes left after jdls -k: {leftovers}"
        assert not left, f"IPC left after jdls -K: {left}"


def service_env() -> dict[str, str]:
    """This process's environment without what would point a daemon at another service."""
    return {k: v for k, v in os.environ.items() if k not in ("DLS_IPC_KEY", "JDLS_PORT", "JDLS")}


@pytest.fixture
def daemon(clean_env: Instance) -> Iterator[Daemon]:
    """A Daemon not yet started (``daemon.start("-P")``); at teardown stopped (-k), removed (-K), checked."""
    with stopped_after(Daemon(clean_env, _free_port(), service_env()), "-o") as svc:
        yield svc


@pytest.fixture
def daemon_in(ipc_left: Callable[[int], list[str]]) -> Callable[[Path], contextlib.AbstractContextManager[Daemon]]:
    """``with daemon_in(root) as d:`` a Daemon of the instance at ``root``, started (-ib), checked after."""
    @contextlib.contextmanager
    def started(root: Path) -> Iterator[Daemon]:
        env = service_env()
        env["JBCRELEASEDIR"] = str(root)
        svc = Daemon(Instance.from_environment(root), _free_port(), env)
        assert not ipc_left(svc.instance.key)
        with stopped_after(svc) as running:
            running.start()
            yield running
    return started

"""A lock service of its own for each test: a private JBCRELEASEDIR (so its own IPC key) and a free port.

``jdls`` runs as a real program (``python -m dls_daemon``). At teardown the
service is stopped (-k) and removed (-K), and the test fails if any process or
IPC resource of its instance is left behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import sysv_ipc
from dls_shm import Header, Instance, LockTable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    root: Path
    port: int
    env: dict[str, str]
    instance: Instance

    def jdls(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dls_daemon", *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "dls_daemon", *args], env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )

    def pid(self, role: str) -> int | None:
        try:
            return int(self.instance.pid_file(role).read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def processes(self) -> list[psutil.Process]:
        """Every live process started by ``jdls`` for this instance, whatever its pid files say."""
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE or "dls_daemon" not in (proc.info["cmdline"] or []):
                    continue
                if proc.environ().get("JBCRELEASEDIR") == str(self.root):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def ipc_left(self) -> list[str]:
        left = []
        if LockTable.exists(self.instance.key):
            left.append("shared memory")
        try:
            sysv_ipc.Semaphore(self.instance.key)
            left.append("semaphore")
        except sysv_ipc.ExistentialError:
            pass
        return left

    def table(self) -> LockTable:
        """The instance's table, attached: close it before the end of the test (-K refuses otherwise)."""
        return LockTable.attach(self.instance.key)

    def header(self) -> Header:
        table = self.table()
        try:
            return table.header()
        finally:
            table.close()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    root = tmp_path / "release"
    env = {k: v for k, v in os.environ.items() if k not in ("DLS_IPC_KEY", "JDLS_PORT")}
    port = free_port()
    env.update(JBCRELEASEDIR=str(root), JDLS_PORT=str(port), JDLS_LOCK_DIR=str(tmp_path / "jbase"),
               JDLS_BINARY_LOCK_DIR=str(tmp_path / "jbase_lock"))
    svc = Service(root, port, env, Instance.from_environment(root))
    yield svc
    stop = svc.jdls("-k")
    remove = svc.jdls("-K")
    leftovers = svc.processes()
    for proc in leftovers:  # do not leave them to the next test run, but still fail
        proc.kill()
    ipc = svc.ipc_left()
    if ipc:
        for kind in (sysv_ipc.SharedMemory, sysv_ipc.Semaphore):
            try:
                kind(svc.instance.key).remove()
            except sysv_ipc.ExistentialError:
                pass
    assert stop.returncode == 0, stop.stderr
    assert remove.returncode == 0, remove.stderr
    assert not leftovers, f"processes left after jdls -k: {leftovers}"
    assert not ipc, f"IPC left after jdls -K: {ipc}"

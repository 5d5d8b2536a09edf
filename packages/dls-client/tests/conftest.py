"""A real lock service for the client's tests: started in the test's own instance, checked when stopped.

Each test module prepares the environment it needs (which variables this
process and the daemon see) and asks ``running_daemon`` for a service in it;
the start (with a new port if one was taken meanwhile) and the teardown (``-k``,
``-K``, and nothing of the instance left: no process, no IPC) live here once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from dls_client import Client, Config, LocalClient, Server
from dls_shm import Instance


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    root: Path
    port: int
    env: dict[str, str]
    key: int
    lock_dir: Path | None = None
    binary_lock_dir: Path | None = None

    def jdls(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dls_daemon", *args], env=self.env, capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)

    def config(self, **options: object) -> Config:
        return Config(server=Server("127.0.0.1", self.port), **options)  # type: ignore[arg-type]

    def client(self, **options: object) -> Client:
        return Client(self.config(**options))

    def remote(self) -> Client:
        return self.client()

    def jdls_value(self, *options: str) -> str:
        return ",".join([f"SERVER=127.0.0.1,{self.port}", *options])

    def processes(self) -> list[psutil.Process]:
        """Live processes listed in the instance's pid files or whose JBCRELEASEDIR is the instance."""
        found = {}
        run = self.root / "run"
        for path in [*run.glob("*.pid"), *run.glob("servers/*.pid")] if run.exists() else []:
            try:
                proc = psutil.Process(int(path.read_text().split()[0]))
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
            except (OSError, IndexError, ValueError, psutil.Error):
                continue
        for proc in psutil.process_iter(["status"]):
            if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                if proc.environ().get("JBCRELEASEDIR") == str(self.root):
                    found[proc.pid] = proc
            except psutil.Error:
                continue
        return list(found.values())

    def ipc_left(self) -> list[str]:
        hexkey = f"0x{self.key:08x}"
        listing = subprocess.run(["ipcs", "-m", "-s"], capture_output=True, text=True, check=True).stdout
        return [line for line in listing.splitlines() if line.split()[:1] == [hexkey]]


@contextlib.contextmanager
def _running(root: Path, env: dict[str, str], *start: str, set_jdls: bool = False,
             lock_dir: Path | None = None, binary_lock_dir: Path | None = None) -> Iterator[Daemon]:
    svc = Daemon(root, free_port(), env, Instance.from_environment(root).key, lock_dir, binary_lock_dir)
    try:
        for _ in range(5):
            if set_jdls:
                env["JDLS"] = f"SERVER=127.0.0.1,{svc.port}"
            started = svc.jdls(*start, "--port", str(svc.port))
            if started.returncode == 0 or "cannot listen" not in started.stderr:
                break
            svc.port = free_port()
        assert started.returncode == 0, started.stderr
        yield svc
    finally:
        stop, remove = svc.jdls("-k"), svc.jdls("-K")
        left = svc.processes()
        for proc in left:
            proc.kill()
        ipc = svc.ipc_left()
        if ipc:
            subprocess.run(["ipcrm", "-M", f"0x{svc.key:08x}"], capture_output=True)
            subprocess.run(["ipcrm", "-S", f"0x{svc.key:08x}"], capture_output=True)
        assert stop.returncode == 0, stop.stderr
        assert remove.returncode == 0, remove.stderr
        assert not left, f"processes of the instance left: {left}"
        assert not ipc, f"IPC left: {ipc}"


@pytest.fixture
def running_daemon() -> Callable[..., AbstractContextManager[Daemon]]:
    """``with running_daemon(root, env, "-ib", ...) as daemon:``: a started service, stopped and checked after."""
    return _running


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "FBNK.ACCOUNT"
    path.touch()
    return path


@pytest.fixture
def local_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process as a local process of the test's instance: JBCRELEASEDIR set, JDLS and DLS_IPC_KEY unset.

    The lock directories are under tmp_path too (JDLS_LOCK_DIR, JDLS_BINARY_LOCK_DIR), for this process, the
    processes it starts and a daemon started with ``dict(os.environ)``.
    """
    import dls_client as client_module

    root = tmp_path / "release"
    monkeypatch.setenv("JBCRELEASEDIR", str(root))
    monkeypatch.setenv("JDLS_LOCK_DIR", str(tmp_path / "jbase"))
    monkeypatch.setenv("JDLS_BINARY_LOCK_DIR", str(tmp_path / "jbase_lock"))
    for name in ("JDLS", "DLS_IPC_KEY", "JBCPORTNO", "JDLS_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(client_module, "_process_client", None)
    return root


#: Another local process: locks (data, key) directly, says "locked", releases when a line comes on stdin.
LOCAL_HOLDER = textwrap.dedent("""
    import sys
    from dls_client import LocalClient
    client = LocalClient()
    held = client.lock({data!r}, {key!r})
    print("locked", client.mechanism, flush=True)
    sys.stdin.readline()
    held.release()
    print("released", flush=True)
    sys.stdin.read()
    client.close()
""")


def start_local_holder(data: Path, key: str, **env: str) -> subprocess.Popen[str]:
    """A LocalClient in another process holding (data, key) EX, with this environment (JDLS unset) and ``env``."""
    environ = {k: v for k, v in os.environ.items() if k not in ("JDLS", "DLS_IPC_KEY")} | env
    proc = subprocess.Popen([sys.executable, "-c", LOCAL_HOLDER.format(data=str(data), key=key)], env=environ,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("locked"):
        proc.kill()
        raise AssertionError(f"local holder failed: {line!r} {proc.communicate()[1]}")
    return proc


@pytest.fixture
def local_holder() -> Callable[..., subprocess.Popen[str]]:
    """``local_holder(data, key, **env)``: start_local_holder, as a fixture (test modules cannot import conftest)."""
    return start_local_holder


@pytest.fixture
def local(daemon: Daemon) -> Iterator[LocalClient]:
    """A LocalClient of the test's instance, beside the module's ``daemon`` (table or OS locks), closed after."""
    with LocalClient() as c:
        yield c


@pytest.fixture
def remote(daemon: Daemon) -> Iterator[Client]:
    """A Client through the listener of the module's ``daemon``, closed after."""
    with daemon.remote() as c:
        yield c

"""Fixtures of the client's tests: a data file, this process as a local process of the test's instance,
another local process holding a lock, and a local and a remote client beside the module's ``daemon``.

Each test module starts the real lock service it needs with ``running_daemon`` (the harness's
``running_service``, tests/dls_testkit), in the environment it prepared; the start and the teardown
(``-k``, ``-K``, and nothing of the instance left: no process, no IPC) live there once.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from dls_client import Client, LocalClient
from dls_testkit import Service, running_service
from dls_testkit.fixtures import signals_left_alone  # noqa: F401 - the fixture of every test


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """A running lock service of the test's own (``jdls -ib`` of tmp_path/release, the harness's defaults);
    this process's clients trace into its instance. A module that needs another service defines its own."""
    root = tmp_path / "release"
    monkeypatch.setenv("JBCRELEASEDIR", str(root))
    monkeypatch.delenv("JBCPORTNO", raising=False)
    with running_service(root) as svc:
        yield svc


@pytest.fixture
def running_daemon() -> Callable[..., AbstractContextManager[Service]]:
    """``with running_daemon(root, "-ib", ...) as daemon:``: ``jdls -ib ... --port P`` of the instance at
    ``root``, in this process's environment as the test prepared it (without JDLS), stopped and checked after."""
    return functools.partial(running_service, start_options=(), client_jdls=False)


@pytest.fixture
def trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], str]:
    """The error trace of the test's instance (JBCRELEASEDIR is tmp_path, JBCPORTNO unset), as text."""
    monkeypatch.setenv("JBCRELEASEDIR", str(tmp_path))
    monkeypatch.delenv("JBCPORTNO", raising=False)
    path = tmp_path / "tmp" / "jbase_error_trace"
    return lambda: path.read_text() if path.exists() else ""


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
def local(daemon: Service) -> Iterator[LocalClient]:
    """A LocalClient of the test's instance, beside the module's ``daemon`` (table or OS locks), closed after."""
    with LocalClient() as c:
        yield c


@pytest.fixture
def remote(daemon: Service) -> Iterator[Client]:
    """A Client through the listener of the module's ``daemon``, closed after."""
    with daemon.client() as c:
        yield c

"""JDLS OSLOCKS, BINARY and LOCK= against a real lock service (and, for local binary locks, none at all).

Each test that needs a service starts its own ``jdls -ib`` with JBCRELEASEDIR,
JDLS_LOCK_DIR and JDLS_BINARY_LOCK_DIR under ``tmp_path``, and at the end stops
it (``-k``), removes its table (``-K``) and fails if a process or IPC resource
of the instance is left. No file is made outside ``tmp_path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dls_client import Client, Config, DlsError, LocalBinaryLock, LockRefused, Mode, Server
from dls_testkit import KEY, free_port
from dls_testkit import Service as Daemon


@pytest.fixture
def local_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """JBCRELEASEDIR, JDLS_LOCK_DIR and JDLS_BINARY_LOCK_DIR of this process, all under tmp_path."""
    root, lock_dir, binary_dir = tmp_path / "release", tmp_path / "jbase", tmp_path / "jbase_lock"
    monkeypatch.setenv("JBCRELEASEDIR", str(root))
    monkeypatch.setenv("JDLS_LOCK_DIR", str(lock_dir))
    monkeypatch.setenv("JDLS_BINARY_LOCK_DIR", str(binary_dir))
    monkeypatch.delenv("JDLS", raising=False)
    monkeypatch.delenv("JBCPORTNO", raising=False)
    return root, lock_dir, binary_dir


@pytest.fixture
def daemon(local_dirs: tuple[Path, Path, Path], running_daemon: Callable[..., Any]) -> Iterator[Daemon]:
    root, lock_dir, binary_dir = local_dirs
    with running_daemon(root, "-ib") as svc:
        assert (svc.lock_dir, svc.binary_lock_dir) == (lock_dir, binary_dir)
        yield svc


HOLDER = textwrap.dedent("""
    import sys
    from dls_client import Client, Config
    client = Client(Config.from_environment() or Config())
    held = {what}
    print("locked", type(held).__name__, flush=True)
    sys.stdin.read()
    held.release()
    client.close()
""")


class Holding:
    def __init__(self, what: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(what=what)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline().strip()
        if not self.line.startswith("locked"):
            self.proc.kill()
            raise AssertionError(f"holder failed: {self.line!r} {self.proc.communicate()[1]}")

    def __enter__(self) -> Holding:
        return self

    def __exit__(self, *exc: object) -> None:
        _, err = self.proc.communicate("", timeout=30)
        assert self.proc.returncode == 0, err


def child_env(jdls: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("JDLS", None)
    if jdls is not None:
        env["JDLS"] = jdls
    return env


# -- OSLOCKS ---------------------------------------------------------------------------


@pytest.mark.slow
def test_oslocks_clients_exclude_each_other_across_processes(daemon: Daemon, data: Path) -> None:
    with Holding(f"client.lock({str(data)!r}, {KEY!r})", child_env(daemon.jdls_value("OSLOCKS"))):
        client = Client(daemon.config(oslocks=True))
        try:
            with pytest.raises(LockRefused):
                client.try_lock(data, KEY)
        finally:
            client.close()


@pytest.mark.slow
@pytest.mark.parametrize("first_oslocks", [True, False], ids=["oslocks-holds", "plain-holds"])
def test_beside_a_table_oslocks_clients_and_the_others_exclude_each_other(daemon: Daemon, data: Path,
                                                                           first_oslocks: bool) -> None:
    """A record lock has one holder whatever the clients' options (second audit of issue 12): beside a
    table a client with JDLS OSLOCKS and one without lock the same record in the same mechanism, the
    table, so that the other is refused (-n) or waits while one holds it, in both orders. They used to be
    granted both: the OSLOCKS client's lock was an OS file lock, which the table's locks never met."""
    holder_jdls = daemon.jdls_value("OSLOCKS") if first_oslocks else daemon.jdls_value()
    with Holding(f"client.lock({str(data)!r}, {KEY!r})", child_env(holder_jdls)):
        assert not any(p.name.startswith("jlock_") for p in daemon.lock_dir.glob("*")), "an OS lock beside a table"
        client = Client(daemon.config(oslocks=not first_oslocks))
        try:
            with pytest.raises(LockRefused):
                client.try_lock(data, KEY)
            with pytest.raises(LockRefused):  # a wait that times out: the holder keeps it throughout
                client.lock(data, KEY, timeout=0.5)
        finally:
            client.close()
    # Once per connection (the OSLOCKS client asked once or twice), the lock server logs how it serves them.
    assert daemon.log().count("(JDLS OSLOCKS): served by the lock table") == 1, daemon.log()


@pytest.mark.slow
def test_without_a_table_oslocks_clients_and_the_others_take_os_locks(
        local_dirs: tuple[Path, Path, Path], running_daemon: Callable[..., Any], data: Path) -> None:
    """Under ``jdls -ibD`` (no table) every record lock is an OS file lock in the lock directory, what
    JDLS OSLOCKS asks for, and OSLOCKS clients and the others exclude each other there."""
    root, lock_dir, _ = local_dirs
    with running_daemon(root, "-ibD") as svc, Holding(f"client.lock({str(data)!r}, {KEY!r})",
                                                     child_env(svc.jdls_value("OSLOCKS"))):
        assert any(p.name.startswith("jlock_") for p in lock_dir.iterdir())
        client = Client(svc.config())
        try:
            with pytest.raises(LockRefused):
                client.try_lock(data, KEY)
        finally:
            client.close()


# -- BINARY ----------------------------------------------------------------------------


@pytest.mark.slow
def test_binary_sends_file_locks_to_the_service(daemon: Daemon, data: Path) -> None:
    env = child_env(daemon.jdls_value("BINARY"))
    with Holding(f"client.binary_lock({str(data)!r})", env) as holding:
        assert holding.line == "locked HeldLock"
        names = [p.name for p in daemon.binary_lock_dir.iterdir()]
        assert any(name.startswith("jlock_") for name in names), names
        client = Client(daemon.config(binary=True))
        try:
            with pytest.raises(LockRefused):
                client.binary_lock(data, wait=False)
            # the local OS knows nothing of it: the lock is the service's
            LocalBinaryLock.take(str(data), Mode.EX, wait=False, timeout=None, create=False).release()
        finally:
            client.close()
    client = Client(daemon.config(binary=True))
    try:
        with client.binary_lock(data, wait=False) as held:
            assert held.key == b""
    finally:
        client.close()


@pytest.mark.slow
def test_binary_sends_execution_locks_to_the_service(daemon: Daemon) -> None:
    with Holding("client.execution_lock(7)", child_env(daemon.jdls_value("BINARY"))):
        client = Client(daemon.config(binary=True))
        try:
            with pytest.raises(LockRefused):
                client.execution_lock(7, wait=False)
            with client.execution_lock(8, wait=False) as held:  # another number is another lock
                assert held.key == b"EXEC008"
                assert held.file.inode == 0 and held.file.path == "execution lock 008"
        finally:
            client.close()
    assert not (daemon.binary_lock_dir / "execution_lock_007").exists()  # nothing local


def test_without_binary_file_locks_are_local_and_exclude_across_processes(local_dirs: tuple[Path, Path, Path],
                                                                          data: Path) -> None:
    # no daemon at all, and JDLS names a port nobody listens on: nothing may go to a service
    jdls = f"SERVER=127.0.0.1,{free_port()}"
    client = Client(Config(server=Server("127.0.0.1", free_port())))
    with Holding(f"client.binary_lock({str(data)!r})", child_env(jdls)) as holding:
        assert holding.line == "locked LocalBinaryLock"
        with pytest.raises(LockRefused):
            client.binary_lock(data, wait=False)
        with pytest.raises(LockRefused):
            client.binary_lock(data, timeout=0.2)
        with pytest.raises(LockRefused):
            client.binary_lock(data, Mode.PR, wait=False)
    with client.binary_lock(data, wait=False) as held:
        assert isinstance(held, LocalBinaryLock)
        with pytest.raises(LockRefused):  # a second lock of the same process is excluded too
            client.binary_lock(data, wait=False)
    assert not client.connected  # never connected


def test_shared_local_binary_locks_share(local_dirs: tuple[Path, Path, Path], data: Path) -> None:
    client = Client(Config(server=Server("127.0.0.1", free_port())))
    with client.binary_lock(data, Mode.PR), client.binary_lock(data, Mode.PR, wait=False):
        with pytest.raises(LockRefused):
            client.binary_lock(data, Mode.EX, wait=False)


def test_without_binary_execution_locks_are_local_files(local_dirs: tuple[Path, Path, Path]) -> None:
    _, _, binary_dir = local_dirs
    assert not binary_dir.exists()
    client = Client(Config(server=Server("127.0.0.1", free_port())))
    with Holding("client.execution_lock(255)", child_env(f"SERVER=127.0.0.1,{free_port()}")) as holding:
        assert holding.line == "locked LocalBinaryLock"
        assert (binary_dir / "execution_lock_255").exists()
        with pytest.raises(LockRefused):
            client.execution_lock(255, wait=False)
        client.execution_lock(0, wait=False).release()
    with client.execution_lock(255, wait=False):
        pass
    assert not client.connected


@pytest.mark.parametrize("number", [-1, 256, 1000, True, 3.0, "7"])
def test_execution_lock_numbers_are_0_to_255(number: object) -> None:
    client = Client(Config(binary=True, server=Server("127.0.0.1", free_port())))
    with pytest.raises(ValueError, match="0 to 255"):
        client.execution_lock(number)  # type: ignore[arg-type]


# -- LOCK= -----------------------------------------------------------------------------


def test_lock_internal_refuses_external_locks_without_asking_the_service(data: Path) -> None:
    client = Client(Config(lock="INTERNAL", server=Server("127.0.0.1", free_port())))
    with pytest.raises(DlsError) as refused:
        client.lock(data, KEY, kind="external")
    assert str(refused.value) == ("record locks of kind 'external' are not handled by the lock service "
                                  "(JDLS LOCK=INTERNAL); the caller's own lock handler must take them")
    assert not client.connected


def test_lock_external_refuses_internal_locks(data: Path) -> None:
    client = Client(Config(lock="EXTERNAL", server=Server("127.0.0.1", free_port())))
    with pytest.raises(DlsError, match=r"kind 'internal'.*LOCK=EXTERNAL"):
        client.lock(data, KEY)


def test_unknown_lock_kind_is_refused(data: Path) -> None:
    client = Client(Config(server=Server("127.0.0.1", free_port())))
    with pytest.raises(ValueError, match="'both'"):
        client.lock(data, KEY, kind="both")  # type: ignore[arg-type]


@pytest.mark.slow
def test_lock_all_sends_both_kinds_and_internal_sends_internal(daemon: Daemon, data: Path) -> None:
    client = Client(daemon.config(lock="ALL"))
    internal_only = Client(daemon.config(lock="INTERNAL"))
    try:
        with client.lock(data, KEY, kind="external"):
            with pytest.raises(LockRefused):
                internal_only.try_lock(data, KEY)
        with client.lock(data, KEY, kind="internal"):
            pass
        internal_only.lock(data, KEY, kind="internal").release()
    finally:
        client.close()
        internal_only.close()

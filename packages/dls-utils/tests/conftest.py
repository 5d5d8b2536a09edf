"""Fixtures of the dls-utils tests: a lock table of a private instance, always removed; a real jdls of it.

Each table belongs to an instance rooted in the test's own tmp_path (so its own IPC key): tests running
in parallel, and other runs on the machine, never meet. The environment is cleaned of JDLS and
DLS_IPC_KEY, which would otherwise send show-item-locks to another service. The helpers themselves are
the harness's (tests/dls_testkit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dls_shm import Instance, LockTable, geometry_for, ipc_key_for
from dls_testkit import Service, ipc_left, own_table
from dls_testkit.fixtures import signals_left_alone  # noqa: F401 - the fixture of every test


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
    with own_table(clean_env.key, geometry_for(100, 10)) as table:
        yield Local(clean_env, table)


# -- a real lock service (python -m dls_daemon -ib) of the test's own instance --------------------------


@pytest.fixture
def daemon(clean_env: Instance) -> Iterator[Service]:
    """A jdls of the test's instance not yet started (``daemon.start("-P")`` runs ``jdls -ib -P``); at
    teardown stopped (-k), removed (-K -o), checked."""
    with Service(clean_env.root, start_options=("-ib",), remove_options=("-o",), client_jdls=False).checked() as svc:
        yield svc


@pytest.fixture
def daemon_in() -> Callable[[Path], contextlib.AbstractContextManager[Service]]:
    """``with daemon_in(root) as d:`` a jdls of the instance at ``root``, started (-ib), checked after."""
    @contextlib.contextmanager
    def started(root: Path) -> Iterator[Service]:
        svc = Service(root, start_options=("-ib",), client_jdls=False)
        assert not ipc_left(svc.key)
        with svc.checked():
            svc.start()
            yield svc
    return started

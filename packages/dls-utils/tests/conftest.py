"""Fixtures of the dls-utils tests: a lock table of a private instance, always removed.

Each table belongs to an instance rooted in the test's own tmp_path (so its own
IPC key): tests running in parallel, and other runs on the machine, never meet.
The environment is cleaned of JDLS and DLS_IPC_KEY, which would otherwise send
show-item-locks to another service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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

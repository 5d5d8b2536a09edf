"""The SysV IPC objects of a key: what is left, removing them, a table of the test's own.

Every table a test makes is under a key derived from the test's own directory, so tests running in
parallel (and other runs on the machine) never meet; and every test that made one checks at the end
that nothing is left under its key.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sysv_ipc
from dls_shm import Geometry, LockTable, ipc_key_for

SHARED_MEMORY, SEMAPHORE = "shared memory", "semaphore"


def ipc_left(key: int) -> list[str]:
    """Which SysV objects exist under ``key``: ["shared memory", "semaphore"], or part of it, or []."""
    left = []
    try:
        sysv_ipc.SharedMemory(key).detach()
        left.append(SHARED_MEMORY)
    except sysv_ipc.ExistentialError:
        pass
    try:
        sysv_ipc.Semaphore(key)
        left.append(SEMAPHORE)
    except sysv_ipc.ExistentialError:
        pass
    return left


def ipcs_listing() -> str:
    """``ipcs -m -s``: every shared memory segment and semaphore array of the machine, as an operator sees them."""
    return subprocess.run(["ipcs", "-m", "-s"], capture_output=True, text=True, check=True).stdout


def ipcs_lines(key: int) -> list[str]:
    """The lines of ``ipcs -m -s`` that show ``key`` (owner, mode, id: for failure messages)."""
    hexkey = f"0x{key:08x}"
    return [line for line in ipcs_listing().splitlines() if line.split()[:1] == [hexkey]]


def remove_ipc(key: int) -> None:
    """Remove whatever exists under ``key`` (a test that fails must not leave it to the next run)."""
    for kind in (sysv_ipc.SharedMemory, sysv_ipc.Semaphore):
        try:
            kind(key).remove()
        except sysv_ipc.ExistentialError:
            pass


def free_key(base: Path) -> int:
    """An IPC key derived from ``base`` under which nothing exists yet."""
    for n in range(100):
        key = ipc_key_for(base / f"table-{n}")
        if not ipc_left(key):
            return key
    raise AssertionError(f"no free IPC key near {base}")


@contextlib.contextmanager
def own_table(key: int, geometry: Geometry, **options: Any) -> Iterator[LockTable]:
    """A new lock table under ``key`` (nothing may exist there before); removed at the end, and then
    nothing may be left under the key."""
    table, created = LockTable.create(key, geometry, **options)
    assert created, f"a table with key 0x{key:08x} existed already"
    try:
        yield table
    finally:
        table.remove()
        left = ipc_left(key)
        assert not left, f"IPC left under 0x{key:08x} after removing the table: {left}"

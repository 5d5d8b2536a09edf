"""Fixtures of the dls-shm tests: lock tables under their own IPC keys, always removed; forked children,
always reaped; pipes, always closed (the helpers themselves are the harness's, tests/dls_testkit).

Every table is made under a key derived from the test's own tmp_path, so tests running in parallel (and
other test runs on the machine) never meet, and is removed at teardown whatever the test did; teardown then
checks that no SysV object is left under the key, and the session checks every key once more at its end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dls_shm import Geometry, LockTable, geometry_for
from dls_testkit import free_key, ipc_left, own_table
from dls_testkit.fixtures import children, pipes, signals_left_alone  # noqa: F401 - fixtures of these tests too

#: Every key this test process made a table under, checked once more at the end of the session.
_KEYS: list[int] = []

MakeTable = Callable[..., LockTable]


@pytest.fixture(scope="session", autouse=True)
def _no_ipc_left_at_the_end() -> Iterator[None]:
    yield
    left = {f"0x{key:08x}": ipc_left(key) for key in _KEYS}
    assert not any(left.values()), f"SysV objects left behind: {left}"


@pytest.fixture
def make_table(tmp_path: Path) -> Iterator[MakeTable]:
    """make_table(geometry=..., **create_options) -> a new LockTable, removed (and checked gone) at teardown."""
    with contextlib.ExitStack() as tables:

        def make(geometry: Geometry | None = None, **options: int) -> LockTable:
            key = free_key(tmp_path)
            _KEYS.append(key)
            return tables.enter_context(own_table(key, geometry or geometry_for(1000, 10), **options))

        yield make


@pytest.fixture
def table(make_table: MakeTable) -> LockTable:
    """A table of 101 groups of 10 locks."""
    return make_table()

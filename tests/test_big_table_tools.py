"""The tools that list every lock of a big table stream it (issue 13): ``jdls -dvL``, ``dls-dump`` (text and
``--json``) and ``show-item-locks`` write their first lock row before the table's last batch is read, and
never write while they hold the table's semaphore: a slow reader (a pager, a pipe) never holds the table,
and a million locks are never all in memory.

Counted, not timed: the table's semaphore holds of this process (where each tool's ``main`` runs) are
counted, and each write of the tool's output notes how many there had been and whether one was under way.
The table: 100,150 slots, 20,000 locks (more than show-item-locks sorts whole, ``SORTED_ROWS``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dls_daemon import display
from dls_shm import LOCAL_IP, Grant, Instance, Owner, geometry_for, modes, rows
from dls_shm.semaphores import Semaphores
from dls_testkit import free_key, own_table
from dls_utils import dump, show_item_locks

LOCKS = 20_000


class Holds:
    """This process's holds of a table's semaphores: how many have ended, and whether one is under way."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ended = 0
        self.depth = 0
        for take, give in (("take", "give"), ("take_groups", "give_members"), ("take_header", "give_header")):
            monkeypatch.setattr(Semaphores, take, self._taking(getattr(Semaphores, take)))
            monkeypatch.setattr(Semaphores, give, self._giving(getattr(Semaphores, give)))

    @property
    def now(self) -> bool:
        return self.depth > 0

    def _taking(self, take: Callable[..., Any]) -> Callable[..., Any]:
        def counted(sems: Semaphores, *args: Any) -> Any:
            taken = take(sems, *args)
            self.depth += 1
            return taken

        return counted

    def _giving(self, give: Callable[..., Any]) -> Callable[..., Any]:
        def counted(sems: Semaphores, *args: Any) -> Any:
            self.depth -= 1
            self.ended += 1
            return give(sems, *args)

        return counted


class Output:
    """A tool's standard output: for each write, the holds ended before it; a write under a hold fails."""

    def __init__(self, holds: Holds) -> None:
        self.holds = holds
        self.writes: list[tuple[int, str]] = []

    def write(self, text: str) -> int:
        assert not self.holds.now, "written while holding the table's semaphore"
        self.writes.append((self.holds.ended, text))
        return len(text)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError("not a file")


@pytest.fixture(scope="module")
def big_table(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """(an instance directory, its table's key): LOCKS locks of this process, in groups of 50."""
    root = tmp_path_factory.mktemp("big")
    key = free_key(root)
    with own_table(key, geometry_for(100_000, 50)) as table:
        for n in range(LOCKS):
            who = Owner(os.getpid(), n, 5000 + n % 7, os.getpid(), LOCAL_IP)
            assert isinstance(table.lock(who, 1 + n % 991, 0, b"K%d" % n, modes.EX), Grant)
        yield root, key


def run_jdls(root: Path, key: int, out: Output) -> int:
    return display.display(Instance(root, key), verbose=1, locks=True, out=out)  # type: ignore[arg-type]


def tool(main: Callable[[list[str]], int], *argv: str) -> Callable[[Path, int, Output], int]:
    def run(root: Path, key: int, out: Output) -> int:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("sys.stdout", out)
            mp.setenv("JBCRELEASEDIR", str(root))
            mp.setenv("DLS_IPC_KEY", f"0x{key:08x}")
            mp.delenv("JDLS", raising=False)
            return main(list(argv))
    return run


TOOLS = {
    "jdls -dvL": (run_jdls, "0x"),
    "dls-dump": (tool(dump.main), "0x"),
    "dls-dump --json": (tool(dump.main, "--json"), '"index"'),
    "show-item-locks": (tool(show_item_locks.main, "--local"), "0.0.0.0\t"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", TOOLS)
def test_a_big_table_is_listed_as_it_is_read(big_table: tuple[Path, int], name: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert rows.SORTED_ROWS < LOCKS
    run, row_mark = TOOLS[name]
    holds = Holds(monkeypatch)
    out = Output(holds)
    assert run(*big_table, out) == 0
    text = "".join(t for _, t in out.writes)
    assert text.count(row_mark) >= LOCKS, text[-500:]
    first_row = next(ended for ended, t in out.writes if row_mark in t)
    assert first_row < holds.ended, "nothing was read from the table once the lock rows had begun"
    # Rows go out as the table is read: batches are copied between the rows, all the way.
    during = {ended for ended, t in out.writes if row_mark in t}
    assert len(during) > 10, f"the rows came out in {len(during)} bursts"

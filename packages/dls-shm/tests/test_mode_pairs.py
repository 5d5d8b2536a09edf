"""All 36 pairs of lock modes, both orders, through the table (issue 14): a request for one mode while
another owner holds another is granted at once exactly when the DLM's compatibility matrix says so. This
process holds, a forked child asks.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
from dls_shm import LOCAL_IP, Conflict, Grant, LockTable, Owner, modes

NAMES = modes.NAMES
PAIRS = list(itertools.product(range(6), range(6)))


def _ask(table: LockTable, key: bytes, mode: int) -> int:
    """Child body: 1 if ``mode`` is granted at once (released again), 0 if refused."""
    got = table.lock(Owner(os.getpid(), 1, 0, os.getpid(), LOCAL_IP), 5151, 7, key, mode)
    if isinstance(got, Grant):
        table.unlock(got.handle)
        return 1
    assert isinstance(got, Conflict)
    return 0


@pytest.mark.parametrize(("held", "asked"), PAIRS, ids=[f"{NAMES[h]}-{NAMES[a]}" for h, a in PAIRS])
def test_every_pair_through_the_table(table: LockTable, children: Any, held: int, asked: int) -> None:
    for order, (mine, theirs) in enumerate(((held, asked), (asked, held))):  # both orders
        key = f"PAIR*{order}".encode()
        holding = table.lock(Owner(os.getpid(), 1, 0, os.getpid(), LOCAL_IP), 5151, 7, key, mine)
        assert isinstance(holding, Grant)
        granted = children.wait(children.fork(lambda key=key, theirs=theirs: _ask(table, key, theirs)))
        assert granted == int(modes.compatible(theirs, mine)), (NAMES[mine], NAMES[theirs])
        table.unlock(holding.handle)

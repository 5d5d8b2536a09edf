"""Pytest fixtures more than one package's tests use: forked children (always reaped) and pipes (always
closed). A conftest makes them its own by importing them (``from dls_testkit.fixtures import children``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from .processes import Children, Pipe


@pytest.fixture
def children() -> Iterator[Children]:
    """Forked children of the test; any still running at the end is killed, reaped, and fails the test."""
    kids = Children()
    try:
        yield kids
    finally:
        kids.check_reaped()


@pytest.fixture
def pipes() -> Iterator[Callable[[], Pipe]]:
    """``pipes()`` makes a Pipe, closed at the end of the test."""
    made: list[Pipe] = []

    def make() -> Pipe:
        made.append(Pipe())
        return made[-1]

    yield make
    for p in made:
        p.close()

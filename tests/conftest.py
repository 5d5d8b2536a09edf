"""A lock service of its own for every end-to-end test: real processes, real TCP, real SysV IPC.

The helpers and the ``Service`` class live in the harness (tests/dls_testkit); here are the fixtures.

The ``service`` fixture gives the test a private instance (its own
JBCRELEASEDIR, hence its own IPC key) and a free port, starts
``jdls -ibs1000,10 --port P`` there as a real program, and at the end stops
it (``-k``) and removes its table (``-K``). The teardown fails the test if
any process of the instance is left, or any IPC resource with its key; it
cleans them up first, so a failing test never leaves anything to the next run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dls_testkit import Service, make_service
from dls_testkit.fixtures import children, pipes, signals_left_alone  # noqa: F401 - fixtures of these tests too


@pytest.fixture(autouse=True)
def instance_of_the_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test process's own clients use the instance of the test's service (tmp_path/release), so
    that what they write (the error trace) stays in the test's directory, never in /var/tmp/dls."""
    root = tmp_path / "release"
    monkeypatch.setenv("JBCRELEASEDIR", str(root))
    return root


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """A running lock service of the test's own (monitor and listener), stopped and checked at the end."""
    with make_service(tmp_path).checked() as svc:
        svc.start()
        yield svc


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One running service shared by the tests of a module, which do not disturb one another (each its own
    records); stopped and checked after the module's last test."""
    svc = make_service(tmp_path_factory.mktemp("daemon"))
    try:
        svc.start()
        yield svc
    finally:
        svc.stop_and_check()

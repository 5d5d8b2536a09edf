"""A lock service of its own for each test: a private JBCRELEASEDIR (so its own IPC key) and a free port.

``service`` is the harness's ``Service`` (tests/dls_testkit), not started: each test runs the ``jdls``
commands it is about (``service.jdls("-ib")``), as a real program, the port coming from JDLS_PORT. At
teardown the service is stopped (-k) and removed (-K), and the test fails if any process or IPC resource
of its instance is left behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dls_testkit import Service, make_service
from dls_testkit.fixtures import children, pipes, signals_left_alone  # noqa: F401 - fixtures of these tests too


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    with make_service(tmp_path, start_options=("-ib",), client_jdls=False).checked() as svc:
        yield svc

"""dls-test, the connection test of JDLS (jDLS's ``-C teststring``), as a real program and in-process.

The service is a real ``jdls -ib`` of the test's own (JBCRELEASEDIR, JDLS_LOCK_DIR
and JDLS_BINARY_LOCK_DIR under ``tmp_path``), stopped (``-k``) and removed
(``-K``) at the end; the test fails if a process or IPC resource is left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dls_client import check_command
from dls_testkit import Service as Daemon
from dls_testkit import free_port

DLS_TEST = str(Path(sys.executable).parent / "dls-test")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's and its children's environment, every directory under tmp_path and no JDLS."""
    monkeypatch.setenv("JBCRELEASEDIR", str(tmp_path / "release"))
    monkeypatch.setenv("JDLS_LOCK_DIR", str(tmp_path / "jbase"))
    monkeypatch.setenv("JDLS_BINARY_LOCK_DIR", str(tmp_path / "jbase_lock"))
    for name in ("JDLS", "JBCPORTNO", "DLS_IPC_KEY", "JDLS_PORT"):
        monkeypatch.delenv(name, raising=False)
    return dict(os.environ)


@pytest.fixture
def daemon(env: dict[str, str], running_daemon: Callable[..., Any]) -> Iterator[Daemon]:
    with running_daemon(Path(env["JBCRELEASEDIR"]), "-ib") as svc:
        yield svc


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DLS_TEST, *args], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_echoes_through_the_service_and_says_what_it_used(daemon: Daemon, env: dict[str, str]) -> None:
    done = run({**env, "JDLS": f"SERVER=127.0.0.1,{daemon.port}"}, "hello jdls")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"Client: Using host '127.0.0.1', service '{daemon.port}'"
    assert re.fullmatch(r"Client: connected to lock server pid [1-9]\d* on '\S+' \(protocol version \d+, shared "
                        r"memory lock table\)", lines[1])
    assert lines[2] == "Client: the lock server sees this client as 127.0.0.1"
    assert lines[3].startswith("Client: received 'hello jdls' in ") and lines[3].endswith(" ms (round trip)")


@pytest.mark.slow
def test_default_test_string(daemon: Daemon, env: dict[str, str]) -> None:
    done = run({**env, "JDLS": f"SERVER=127.0.0.1,{daemon.port}"})
    assert done.returncode == 0, done.stderr
    assert "received 'teststring'" in done.stdout


def test_unreachable_service_prints_the_guides_messages(env: dict[str, str]) -> None:
    port = free_port()
    done = run({**env, "JDLS": f"SERVER=127.0.0.1,{port}"})
    assert done.returncode == 1
    assert done.stdout == f"Client: Using host '127.0.0.1', service '{port}'\n"
    assert done.stderr.splitlines() == [
        "Client: Unable to allocate socket",
        f"Client: connection failed for host '127.0.0.1', service '{port}', error Connection refused",
    ]
    trace = (Path(env["JBCRELEASEDIR"]) / "tmp" / "jbase_error_trace").read_text()
    assert "Client: connection failed for host '127.0.0.1'" in trace  # the failure is traced


@pytest.mark.slow
def test_server2_tests_both_servers_and_fails_if_either_does(daemon: Daemon, env: dict[str, str]) -> None:
    closed = free_port()
    done = run({**env, "JDLS": f"SERVER=127.0.0.1,{daemon.port},SERVER2=127.0.0.1,{closed}"}, "both")
    assert done.returncode == 1, done.stdout
    lines = done.stdout.splitlines()
    assert lines[0] == "Client: testing the primary lock service (JDLS SERVER)"
    assert "received 'both'" in lines[4]
    assert lines[5:] == ["Client: testing the secondary lock service (JDLS SERVER2)",
                         f"Client: Using host '127.0.0.1', service '{closed}'"]
    assert done.stderr.splitlines() == [
        "Client: Unable to allocate socket",
        f"Client: connection failed for host '127.0.0.1', service '{closed}', error Connection refused",
    ]
    # One service under two names (the same host and port are refused: a lock would wait behind itself).
    both = run({**env, "JDLS": f"SERVER=127.0.0.1,{daemon.port},SERVER2=localhost,{daemon.port}"}, "both")
    assert both.returncode == 0, both.stdout
    assert both.stdout.count("received 'both'") == 2


def test_bad_jdls_is_refused_by_name(env: dict[str, str]) -> None:
    done = run({**env, "JDLS": "SERVER=127.0.0.1,99999"})
    assert done.returncode == 78
    assert done.stdout == ""
    assert done.stderr == "dls-test: JDLS SERVER: port '99999' is not a number from 1 to 65535\n"
    done = run({**env, "JDLS": "TIMEOUT=soon"})
    assert done.returncode == 78
    assert "JDLS TIMEOUT: 'soon' is not a number of seconds from 0.5 to 86400" in done.stderr


def test_bad_jbcportno_is_refused_by_name(env: dict[str, str]) -> None:
    """As a malformed JDLS: exit 78 and the client's message, before any server is tried."""
    done = run({**env, "JDLS": f"SERVER=127.0.0.1,{free_port()}", "JBCPORTNO": "abc"})
    assert (done.returncode, done.stdout) == (78, "")
    assert done.stderr == "dls-test: JBCPORTNO='abc' is not a port number (0 to 4294967295)\n"


def test_unset_jdls_tests_localhost_50002(env: dict[str, str]) -> None:
    done = run(env)
    assert done.returncode in (0, 1)  # whatever listens on this host's port 50002
    assert done.stdout.splitlines()[:2] == [
        "Client: JDLS is not set; testing the default of a set but empty JDLS, localhost,50002",
        "Client: Using host 'localhost', service '50002'",
    ]


@pytest.mark.parametrize(("jdls", "says"), [
    ("SERVER=h,notaport", "JDLS SERVER: 'notaport' after the host is neither a port"),
    ("SERVER=h,FOO", "JDLS SERVER: 'FOO' after the host is neither a port (a number from 1 to 65535) nor a JDLS "
                     "option"),
    ("SERVER=h,WAIT,BOGUS", "JDLS: unknown option 'BOGUS'; expected SERVER, SERVER2, WAIT"),
    ("SERVER=h:1,2", "JDLS SERVER: the port is given twice ('h:1' and '2')"),
    ("TIMEOUT=inf", "JDLS TIMEOUT: 'inf' is not a number of seconds from 0.5 to 86400"),
    ("SERVER=h,SERVER=i", "JDLS SERVER is given twice"),
])
def test_bad_jdls_named_with_78(env: dict[str, str], jdls: str, says: str) -> None:
    done = run({**env, "JDLS": jdls})
    assert (done.returncode, done.stdout) == (78, ""), done.stderr
    assert done.stderr.startswith(f"dls-test: {says}")


@pytest.mark.slow
def test_host_colon_port_is_the_server_and_port(daemon: Daemon, env: dict[str, str]) -> None:
    done = run({**env, "JDLS": f"SERVER=127.0.0.1:{daemon.port}"}, "colon")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"Client: Using host '127.0.0.1', service '{daemon.port}'"


def test_overlong_string_is_a_usage_error_not_a_traceback(env: dict[str, str]) -> None:
    done = run({**env, "JDLS": f"SERVER=127.0.0.1,{free_port()}"}, "x" * 70000)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "dls-test: the test string is 70000 bytes long; an echo carries at most 65535\n"


def test_parser() -> None:
    assert check_command.get_parser().parse_args([]).teststring == "teststring"
    assert check_command.get_parser().parse_args(["abc"]).teststring == "abc"

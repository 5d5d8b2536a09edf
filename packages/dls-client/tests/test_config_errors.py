"""A configuration a client cannot use is a message and exit 78 for every command, never a traceback.

dls-lock's page promises 78 (EX_CONFIG) for a bad JDLS or JBCPORTNO; the commands are run as real
programs, with JDLS naming a port nothing listens on (nothing is reached before the refusal) and unset
(the local path).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dls_testkit import free_port
from dls_testkit.fixtures import tool_env  # noqa: F401 - the fixture env

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("jdls", [None, "SERVER=127.0.0.1"])
@pytest.mark.parametrize("port", ["abc", "-1", "99999999999"])
def test_bad_jbcportno_is_78_with_its_name(env: dict[str, str], jdls: str | None, port: str) -> None:
    if jdls is not None:
        env["JDLS"] = f"{jdls},{free_port()}"
    env["JBCPORTNO"] = port
    for argv in ([str(BIN / "dls-lock"), env["DATA"], "KEY", "true"], [str(BIN / "dls-test")]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout) == (78, ""), done.stderr
        name = Path(argv[0]).name
        assert done.stderr == f"{name}: JBCPORTNO={port!r} is not a port number (0 to 4294967295)\n"


@pytest.mark.parametrize("jdls", ["SERVER=h,notaport", "TIMEOUT=abc", "SERVER2=h", "SERVER=h,,WAIT", "NOSUCH"])
def test_bad_jdls_is_78_for_dls_lock(env: dict[str, str], jdls: str) -> None:
    env["JDLS"] = jdls
    done = subprocess.run([str(BIN / "dls-lock"), env["DATA"], "KEY", "true"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout) == (78, ""), done.stderr
    assert done.stderr.startswith("dls-lock: JDLS") and "Traceback" not in done.stderr

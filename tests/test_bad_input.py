"""Bad input from a user is a one-line message naming what is wrong and the documented exit status, in every
tool, never a traceback (the second audit of issue 12).

The tools are run as real programs (a user calls them from a shell): JDLS, JBCPORTNO and JBCRELEASEDIR
that no program can use, host names DNS cannot carry, numbers in other scripts' digits, record keys and
file names a shell hands over as bytes. Nothing is reached before the refusal, so no service runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
CONFIG = 78
#: The client tools that read JDLS (jdls -C tests it; dls-lock needs a file, a key and a command).
CLIENT_TOOLS = (["dls-test"], ["dls-lock", "DATA", "KEY", "true"], ["show-item-locks"], ["list-open-files"],
                ["jdls", "-C", "hello"])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("JDLS", "JBCPORTNO", "DLS_IPC_KEY", "JDLS_PORT")}
    data = tmp_path / "data"
    data.write_text("")
    return {**base, "JBCRELEASEDIR": str(tmp_path / "release"), "JDLS_LOCK_DIR": str(tmp_path / "jbase"),
            "JDLS_BINARY_LOCK_DIR": str(tmp_path / "jbase_lock"), "DATA": str(data)}


def run(argv: Sequence[str | bytes], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``argv`` run as a real program (its first word from this venv's bin), DATA standing for the data file."""
    words = [str(BIN / str(argv[0])), *(env["DATA"] if a == "DATA" else a for a in argv[1:])]
    return subprocess.run(words, env=env, capture_output=True, text=True, errors="replace", timeout=60)


def one_line(done: subprocess.CompletedProcess[str], status: int, *says: str) -> None:
    """The program ended with ``status`` and said one line on standard error, containing each of ``says``."""
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == status, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    for said in says:
        assert said in done.stderr, done.stderr


@pytest.mark.parametrize("argv", CLIENT_TOOLS, ids=lambda a: a[0] if a[0] != "jdls" else "jdls-C")
@pytest.mark.parametrize(("jdls", "says"), [
    ("SERVER=a..b", "host 'a..b' has an empty label"),
    (f"SERVER={'a' * 64}", "has a label longer than 63 characters"),
    (f"SERVER={'abcdefghi.' * 26}", "a host name is at most 253"),
    ("SERVER=h,SERVER2=a..b,50003", "JDLS SERVER2: host 'a..b'"),
    ("SERVER=localhost:50002,SERVER2=localhost:50002", "JDLS SERVER2 (localhost,50002) is the same service as "
                                                       "SERVER (localhost,50002)"),
    ("SERVER=h:\u0663\u0663", "JDLS SERVER: port '\u0663\u0663' is not a number from 1 to 65535"),
    ("TIMEOUT=\u0663", "JDLS TIMEOUT: '\u0663' is not a number of seconds"),
])
def test_a_jdls_no_client_can_use_is_78_everywhere(env: dict[str, str], argv: list[str], jdls: str,
                                                    says: str) -> None:
    env["JDLS"] = jdls
    one_line(run(argv, env), CONFIG, says)


@pytest.mark.parametrize("argv", [["dls-test"], ["dls-lock", "DATA", "KEY", "true"], ["jdls", "-C", "hello"]],
                         ids=lambda a: a[0] if a[0] != "jdls" else "jdls-C")
@pytest.mark.parametrize("jdls", [None, "SERVER=127.0.0.1,1"])
def test_jbcportno_in_other_digits_is_78(env: dict[str, str], argv: list[str], jdls: str | None) -> None:
    if jdls is not None:
        env["JDLS"] = jdls
    env["JBCPORTNO"] = "\u0663"
    one_line(run(argv, env), CONFIG, "JBCPORTNO='\u0663' is not a port number")


@pytest.mark.parametrize(("argv", "says"), [
    (["dls-lock", "-w", "\u0663", "DATA", "KEY", "true"], "'\u0663' is not a number of seconds"),
    (["dls-lock", "-E", "\u0663", "DATA", "KEY", "true"], "'\u0663' is not an exit status"),
    (["jdls", "-ibs", "\u0661\u0660\u0660\u0660,\u0661\u0660"], "invalid table size"),
    (["jdls", "-ib", "--port", "\u0663\u0663"], "invalid port"),
    (["jdls", "-ib", "--lock-delay", "\u0663"], "invalid lock-delay"),
    (["show-item-locks", "--port", "\u0663"], "invalid port"),
    (["show-item-locks", "--server", "a..b"], "host 'a..b' has an empty label"),
    (["dls-dump", "--key", "\u0663"], "is not a number"),
])
def test_numbers_are_ascii_digits_on_command_lines(env: dict[str, str], argv: list[str], says: str) -> None:
    done = run(argv, env)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr

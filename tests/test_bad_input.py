"""Bad input from a user is a one-line message naming what is wrong and the documented exit status, in every
tool, never a traceback (the second audit of issue 12).

The tools are run as real programs (a user calls them from a shell): JDLS, JBCPORTNO and JBCRELEASEDIR
that no program can use, host names DNS cannot carry, numbers in other scripts' digits, record keys and
file names a shell hands over as bytes. Nothing is reached before the refusal, so no service runs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from dls_client import DlsError, FileRef, InvalidRequest
from dls_proto import MAX_KEY
from dls_proto.text import amount
from dls_testkit import Service
from dls_testkit.clients import client_for, data_file
from dls_testkit.fixtures import tool_env  # noqa: F401 - the fixture env

BIN = Path(sys.executable).parent
CONFIG = 78
#: The client tools that read JDLS (jdls -C tests it; dls-lock needs a file, a key and a command).
CLIENT_TOOLS = (["dls-test"], ["dls-lock", "DATA", "KEY", "true"], ["show-item-locks"], ["list-open-files"],
                ["jdls", "-C", "hello"])


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


@pytest.mark.parametrize("argv", [["jdls", "-C", "x", "--host", "a..b"], ["jdls", "-ib", "--bind", "a..b"],
                                  ["show-item-locks", "--server", "a..b"], ["list-open-files", "--server", "a..b,5"]],
                         ids=" ".join)
def test_a_host_on_the_command_line_is_checked_as_jdls_checks_it(env: dict[str, str], argv: list[str]) -> None:
    done = run(argv, env)
    assert done.returncode == 2 and "host 'a..b' has an empty label" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


PORT_ZERO = ("invalid port '0': expected 1 to 65535 (0, a port of the system's choosing, is refused: clients must "
             "know it)")


@pytest.mark.parametrize("argv", [["jdls", "-Cx", "--port", "0"], ["jdls", "-ibD", "--port", "0"]], ids=" ".join)
def test_port_0_is_a_usage_error_naming_the_option(env: dict[str, str], argv: list[str]) -> None:
    """Audit i12b F7a/b: -C tried to connect to port 0; -ibD listened on a port of the system's choosing that
    jdls -d never showed. Both are refused at once, nothing started."""
    done = run(argv, {**env, "JDLS": "SERVER=localhost,47999"})
    assert done.returncode == 2 and f"jdls: error: argument --port: {PORT_ZERO}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


# -- record keys and file names (a running service: they reach the wire) ------------------------------------


def run_bytes(service: Service, *argv: str | bytes) -> subprocess.CompletedProcess[str]:
    """dls-lock with ``argv`` (bytes as the shell would hand them over) against ``service``."""
    return subprocess.run([str(BIN / "dls-lock"), *argv], env=service.env, capture_output=True, text=True,
                          errors="replace", timeout=60)


def test_a_key_that_is_not_utf8_is_locked_as_its_bytes(service: Service, tmp_path: Path) -> None:
    """``dls-lock FILE $'\\xff' CMD``: the key is the bytes the shell gave (as --hold and -u take it), so the
    same bytes from another dls-lock are the same record: it is refused while the first holds it."""
    data = data_file(tmp_path)
    inner = f"{BIN / 'dls-lock'} -n {data} \"$(printf '\\377')\" true"
    done = run_bytes(service, str(data).encode(), b"\xff", b"sh", b"-c", inner.encode())
    assert (done.returncode, done.stderr) == (1, ""), done.stderr  # the inner dls-lock found it held
    assert run_bytes(service, str(data).encode(), b"\xff", b"true").returncode == 0


def test_a_file_name_that_is_not_utf8_can_be_locked(service: Service, tmp_path: Path) -> None:
    name = os.fsencode(tmp_path) + b"/d\xffx"
    with open(name, "wb"):
        pass
    done = run_bytes(service, name, b"KEY", b"true")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_a_key_longer_than_a_request_carries_is_a_usage_error(service: Service, tmp_path: Path) -> None:
    done = run_bytes(service, str(data_file(tmp_path)), "k" * 70000, "true")
    one_line(done, 2, f"dls-lock: KEY: record key of 70000 bytes: a key is at most {MAX_KEY} bytes")


def test_the_library_refuses_what_no_request_can_carry_and_keeps_its_connection(service: Service,
                                                                                 tmp_path: Path) -> None:
    """A key that is not text or too long, a file name that is not text, a request larger than the server's
    --max-frame: InvalidRequest (a DlsError and a ValueError) before anything is sent; the connection and
    its locks stay."""
    data = data_file(tmp_path)
    client = client_for(service)
    try:
        with client.lock(data, "held"):
            for key in ("\udcff", b"k" * (MAX_KEY + 1), "k" * (MAX_KEY + 1), b"k" * MAX_KEY):
                with pytest.raises(InvalidRequest) as caught:
                    client.lock(data, key)
                assert isinstance(caught.value, (DlsError, ValueError)), caught.value
            with pytest.raises(InvalidRequest, match=r"more than lock service .* takes"):
                client.lock(data, b"k" * MAX_KEY)
            with pytest.raises(InvalidRequest, match="cannot send a Lock request"):
                client.lock(FileRef(os.stat(data).st_ino, "d\udcffx"), "k")
            assert client.status(data, "held")[0] != 0  # still held: the connection was not lost
            with client.lock(data, "k" * 1000):
                pass
    finally:
        client.close()


# -- JBCRELEASEDIR that cannot be an instance's directory --------------------------------------------------

#: Every tool that reads the instance's directory, as a user runs it.
INSTANCE_TOOLS = (["jdls", "-d"], ["jdls", "-k"], ["jdls", "-K"], ["jdls", "-ib"], ["show-item-locks"],
                  ["show-item-locks", "--local"], ["list-open-files"], ["dls-dump"], ["dls-ipcrm"])


@pytest.mark.parametrize("argv", INSTANCE_TOOLS, ids=" ".join)
@pytest.mark.parametrize(("where", "says"), [
    ("a regular file", "not a directory"),
    ("under a regular file", "Not a directory"),
    ("a name too long", "File name too long"),
    ("a path too long", "File name too long"),
])
def test_a_release_dir_that_cannot_be_an_instance_is_78(env: dict[str, str], tmp_path: Path, argv: list[str],
                                                        where: str, says: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    env["JBCRELEASEDIR"] = str({"a regular file": afile, "under a regular file": afile / "release",
                                "a name too long": tmp_path / ("x" * 300),
                                "a path too long": tmp_path.joinpath(*["abcdefghij"] * 400)}[where])
    one_line(run(argv, env), CONFIG, f"{Path(argv[0]).name}: JBCRELEASEDIR=", says)
    assert afile.read_text() == ""


# -- what messages call things ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jdls", "jDLS", "JDLS"])
def test_the_usage_names_the_command_as_called(env: dict[str, str], name: str) -> None:
    assert run([name, "-h"], env).stdout.startswith(f"usage: {name} [-h]")
    done = run([name, "-i", "--port", "x"], env)
    assert done.returncode == 2 and done.stderr.startswith(f"usage: {name} ") and f"\n{name}: error:" in done.stderr


def test_a_one_second_timeout_is_one_second(env: dict[str, str]) -> None:
    """JDLS TIMEOUT=1 and a server that accepts the connection but never answers: the message says
    "1 second" (dls_proto.text.amount), not "1 seconds"."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        env["JDLS"] = f"SERVER=127.0.0.1,{silent.getsockname()[1]},TIMEOUT=1"
        done = run(["dls-lock", "DATA", "KEY", "true"], env)
    one_line(done, 69, "did not answer within 1 second\n")


@pytest.mark.parametrize(("value", "unit", "said"), [(1, "second", "1 second"), (1.0, "second", "1 second"),
                                                       (0.5, "second", "0.5 seconds"), (30, "minute", "30 minutes"),
                                                       (0, "second", "0 seconds")])
def test_amount(value: float, unit: str, said: str) -> None:
    assert amount(value, unit) == said

"""JDLS VERBOSE and TRACE=file: one readable line for each request and each reply, and for each connection
(issue 12, item 8).

Real processes: a real service, ``dls-lock`` with VERBOSE (standard error) or TRACE=file, on a key holding an
escape sequence and a newline (printed escaped: the trace must not drive the operator's terminal nor forge
lines), and a waiter behind a holder (its Waiting lines).
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from dls_testkit import DLS_LOCK, KEY, Service, data_file, lock_holder, make_service, running

pytestmark = pytest.mark.slow

#: A key an application may well use, with an escape sequence and a newline in it.
NASTY_KEY = "CUST\x1b[2J\nFORGED"


def _dls_lock(service: Service, data: Path, key: str, *options: str) -> subprocess.CompletedProcess[str]:
    env = dict(service.env, JDLS=service.jdls_value(*options))
    return subprocess.run([DLS_LOCK, str(data), key, "true"], env=env, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def test_verbose_shows_each_request_and_reply_escaped(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    done = _dls_lock(service, data, NASTY_KEY, "VERBOSE")
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "\x1b" not in err and "\nFORGED" not in err, err
    where = f"127.0.0.1,{service.port}"
    inode = data.stat().st_ino
    lines = err.splitlines()

    def line(pattern: str) -> str:
        found = [text for text in lines if re.search(pattern, text)]
        assert found, f"no line matching {pattern!r} in:\n{err}"
        return found[0]

    line(rf"^Client: to {re.escape(where)}: Hello #\d+ versions 2\.\.4, port \d+")
    line(rf"^Client: from {re.escape(where)}: Welcome #\d+ protocol version 4, lock server pid \d+, lock table, "
         r"lock-delay [\d.]+ s after [\d.]+ ms$")
    line(rf"^Client: to {re.escape(where)}: Settings #\d+ acknowledgement timeout 30 s$")
    lock = line(rf"^Client: to {re.escape(where)}: Lock #(\d+) {re.escape(str(data))} \(inode {inode}\) key "
                r"'CUST\\x1b\[2J\\x0aFORGED' EX, wait forever$")
    rid = re.search(r"Lock #(\d+)", lock).group(1)  # type: ignore[union-attr]
    line(rf"^Client: from {re.escape(where)}: Acquired #{rid} granted EX, handle 0x[0-9a-f]+, token \d+ "
         r"after [\d.]+ ms$")
    line(rf"^Client: to {re.escape(where)}: Unlock #\d+ handle 0x[0-9a-f]+$")


def test_trace_file_shows_the_wait_and_its_interim_messages(service: Service, tmp_path: Path) -> None:
    data = data_file(tmp_path)
    trace = tmp_path / "trace.txt"
    with running(lock_holder(service, data, tmp_path / "held", seconds=3)):
        done = _dls_lock(service, data, KEY, f"TRACE={trace}", "TIMEOUT=3")
    assert done.returncode == 0, done.stderr
    text = trace.read_text()
    assert "Client: to " not in done.stderr, "TRACE=file sends the trace to the file, not to standard error"
    waits = [line for line in text.splitlines() if re.search(r"Waiting #\d+ still waiting after [\d.]+ s, held EX "
                                                                r"by port \d+, pid \d+ on ", line)]
    assert len(waits) >= 2, text  # at once, then about every second (TIMEOUT=3)
    assert re.search(r"Acquired #\d+ granted EX, handle 0x[0-9a-f]+, token \d+ after \d{4,}\.\d+ ms", text), text


def test_trace_file_is_not_followed_through_a_planted_symlink(service: Service, tmp_path: Path) -> None:
    """TRACE=file opens the file as the error trace is opened (audit F7): a symlink planted at its name is not
    followed (the file it points to is left alone), and the client says so once, naming the file and why, and
    traces to standard error instead of dropping the trace without a word."""
    data, victim, trace = data_file(tmp_path), tmp_path / "victim", tmp_path / "trace.txt"
    victim.write_text("precious\n")
    trace.symlink_to(victim)
    done = _dls_lock(service, data, KEY, f"TRACE={trace}")
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious\n"
    told = [line for line in done.stderr.splitlines() if "JDLS TRACE" in line]
    assert told == [f"Client: JDLS TRACE: cannot append to {trace} (a symbolic link, not followed): tracing to "
                    "standard error instead"], done.stderr
    assert "Client: to " in done.stderr  # the trace itself, on standard error


def test_trace_file_is_made_0640_whatever_the_umask(service: Service, tmp_path: Path) -> None:
    data, trace = data_file(tmp_path), tmp_path / "trace.txt"
    env = dict(service.env, JDLS=service.jdls_value(f"TRACE={trace}"))
    done = subprocess.run(["sh", "-c", 'umask 0; exec "$@"', "sh", DLS_LOCK, str(data), KEY, "true"], env=env,
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stderr) == (0, "")
    assert stat.S_IMODE(trace.stat().st_mode) == 0o640
    assert "Client: to " in trace.read_text()


#: Threads tracing at once, as the threads of SERVER and SERVER2 do: every line must come out whole.
HAMMER = textwrap.dedent("""
    import sys, threading
    from dls_client.config import parse
    from dls_client.trace import Tracer
    tracer = Tracer(parse(sys.argv[1]))
    def run(n):
        for i in range(2000):
            tracer.verbose(f"Client: thread {n} line {i} " + "x" * 60)
    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
""")


@pytest.mark.parametrize("where", ["VERBOSE", "TRACE"])
def test_lines_of_threads_tracing_at_once_never_interleave(tmp_path: Path, where: str) -> None:
    trace = tmp_path / "trace.txt"
    jdls = "VERBOSE" if where == "VERBOSE" else f"TRACE={trace}"
    done = subprocess.run([sys.executable, "-c", HAMMER, jdls], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    lines = (done.stderr if where == "VERBOSE" else trace.read_text()).splitlines()
    assert len(lines) == 8000
    glued = [line for line in lines if not re.fullmatch(r"Client: thread \d line \d+ x{60}", line)]
    assert glued == [], glued[:5]


def test_server_and_server2_trace_whole_lines(tmp_path: Path) -> None:
    """dls-lock with SERVER and SERVER2 and VERBOSE: both servers' threads trace at once; every line of
    standard error is one whole trace line (or dls-lock's own), none glued to another."""
    primary, secondary = make_service(tmp_path / "primary"), make_service(tmp_path / "secondary")
    try:
        primary.start()
        secondary.start()
        data = data_file(tmp_path)
        env = dict(primary.env, JDLS=f"SERVER=127.0.0.1,{primary.port},SERVER2=127.0.0.1,{secondary.port},VERBOSE")
        for _ in range(3):
            done = subprocess.run([DLS_LOCK, str(data), KEY, "true"], env=env, capture_output=True, text=True,
                                  timeout=30, stdin=subprocess.DEVNULL)
            assert done.returncode == 0, done.stderr
            lines = done.stderr.splitlines()
            assert any(f",{secondary.port}: " in line for line in lines), done.stderr
            glued = [line for line in lines if line.count("Client: ") != 1 or not line.startswith("Client: ")]
            assert glued == [], done.stderr
    finally:
        try:
            primary.stop_and_check()
        finally:
            secondary.stop_and_check()

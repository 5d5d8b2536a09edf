"""JDLS VERBOSE and TRACE=file: one readable line for each request and each reply, and for each connection
(issue 12, item 8).

Real processes: a real service, ``dls-lock`` with VERBOSE (standard error) or TRACE=file, on a key holding an
escape sequence and a newline (printed escaped: the trace must not drive the operator's terminal nor forge
lines), and a waiter behind a holder (its Waiting lines).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from dls_testkit import DLS_LOCK, KEY, Service, data_file, lock_holder, running

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

    line(rf"^Client: to {re.escape(where)}: Hello #\d+ versions 2\.\.3, port \d+")
    line(rf"^Client: from {re.escape(where)}: Welcome #\d+ protocol version 3, lock server pid \d+, lock table, "
         r"lock-delay [\d.]+ s after [\d.]+ ms$")
    line(rf"^Client: to {re.escape(where)}: Settings #\d+ acknowledgement timeout 30 s$")
    lock = line(rf"^Client: to {re.escape(where)}: Lock #(\d+) {re.escape(str(data))} \(inode {inode}\) key "
                r"'CUST\\x1b\[2J\\x0aFORGED' EX, wait forever$")
    rid = re.search(r"Lock #(\d+)", lock).group(1)  # type: ignore[union-attr]
    line(rf"^Client: from {re.escape(where)}: Granted #{rid} granted EX, handle 0x[0-9a-f]+ after [\d.]+ ms$")
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
    assert re.search(r"Granted #\d+ granted EX, handle 0x[0-9a-f]+ after \d{4,}\.\d+ ms", text), text

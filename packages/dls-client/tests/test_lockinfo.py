"""Lock information in proc/info/<port>, against a real lock service on this host.

As test_local: each test starts its own ``jdls -ib`` with JBCRELEASEDIR,
JDLS_LOCK_DIR and JDLS_BINARY_LOCK_DIR under ``tmp_path``, and stops it (``-k``)
and removes its table (``-K``) at the end, failing if a process or IPC
resource of the instance is left.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
from dls_client import Client, Config, LocalClient, Server
from dls_client.lockinfo import LockInfo, to_json
from dls_testkit import KEY, wait_for
from dls_utils import show_item_locks
from hypothesis import given
from hypothesis import strategies as st

HOLDER_PORT, WAITER_PORT, LOCAL_PORT = 71001, 71002, 71003


@pytest.fixture
def service(local_env: Path, running_daemon: Callable[..., Any]) -> Iterator[tuple[Path, int]]:
    """(JBCRELEASEDIR, listener port) of a lock service of the test's own (see conftest's local_env)."""
    with running_daemon(local_env, "-ib") as svc:
        yield local_env, svc.port


def remote(port: int, jbcportno: int, monkeypatch: pytest.MonkeyPatch) -> Client:
    monkeypatch.setenv("JBCPORTNO", str(jbcportno))
    try:
        return Client(Config(server=Server("127.0.0.1", port)))
    finally:
        monkeypatch.delenv("JBCPORTNO")


def info_file(root: Path, port: int) -> Path:
    """The port's document: a local client's at 0.0.0.0, the others' (remote, through loopback) at 127.0.0.1."""
    return root / "proc" / "info" / f"{port}@{'0.0.0.0' if port == LOCAL_PORT else '127.0.0.1'}"


def read_info(root: Path, port: int) -> dict[str, Any]:
    document = json.loads(info_file(root, port).read_text())
    assert isinstance(document, dict)
    return document


def show_item_locks_output() -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert show_item_locks.main([]) == 0
    return out.getvalue()


def test_holder_and_waiter_publish_their_information(service: tuple[Path, int], data: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root, port = service
    holder, waiter = remote(port, HOLDER_PORT, monkeypatch), remote(port, WAITER_PORT, monkeypatch)
    try:
        held = holder.lock(data, KEY)  # the first lock in this file: published by the lock itself
        wait_for(lambda: info_file(root, HOLDER_PORT).exists() and read_info(root, HOLDER_PORT)["locks"],
                 what="the holder's information")
        doc = read_info(root, HOLDER_PORT)
        assert doc["port"] == HOLDER_PORT and doc["pid"] == os.getpid() and doc["ip"] == "127.0.0.1"
        assert doc["files"] == [{"path": str(data), "inode": data.stat().st_ino}]
        assert [(lk["path"], lk["key"], lk["mode"], lk["state"]) for lk in doc["locks"]] == [
            (str(data), KEY, "EX", "held")]

        waiting = threading.Event()
        got: list[bool] = []

        def wait_for_it() -> None:
            with waiter.lock(data, KEY, timeout=10, on_wait=lambda h: waiting.set()):
                got.append(True)

        thread = threading.Thread(target=wait_for_it)
        thread.start()
        try:
            assert waiting.wait(5)
            # sent when the first Waiting reply came; the lock server writes it in its own time
            wait_for(lambda: info_file(root, WAITER_PORT).exists() and read_info(root, WAITER_PORT)["locks"],
                     what="the waiter's information")
            doc = read_info(root, WAITER_PORT)
            assert [(lk["path"], lk["key"], lk["state"]) for lk in doc["locks"]] == [(str(data), KEY, "waiting")]
            assert doc["files"] == [{"path": str(data), "inode": data.stat().st_ino}]

            shown = show_item_locks_output()
            rows = [line.split() for line in shown.splitlines() if KEY in line]
            assert len(rows) == 1, shown
            row = rows[0]
            assert row[:2] == ["127.0.0.1", str(HOLDER_PORT)]
            assert str(data) in row and str(WAITER_PORT) in row[-1], shown
        finally:
            held.release()
            thread.join(10)
        assert got
        # no longer waiting: granted, published by the waiter itself
        wait_for(lambda: [lk["state"] for lk in read_info(root, WAITER_PORT)["locks"]] == ["held"], what="the grant")
    finally:
        holder.close()
        waiter.close()
    wait_for(lambda: not info_file(root, HOLDER_PORT).exists() and not info_file(root, WAITER_PORT).exists(),
             what="the lock servers to remove the information")


def test_a_local_client_writes_its_own_file(service: tuple[Path, int], data: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = service
    monkeypatch.setenv("JBCPORTNO", str(LOCAL_PORT))
    client = LocalClient()
    try:
        path = info_file(root, LOCAL_PORT)
        doc = read_info(root, LOCAL_PORT)  # written when initialised
        assert doc["ip"] == "0.0.0.0" and doc["pid"] == os.getpid() and doc["locks"] == []
        held = client.lock(data, KEY)  # the first lock in this file publishes, so that its name shows
        assert [(lk["path"], lk["state"]) for lk in read_info(root, LOCAL_PORT)["locks"]] == [(str(data), "held")]
        again = client.lock(data, "ANOTHER")  # another lock in a known file publishes nothing
        assert len(read_info(root, LOCAL_PORT)["locks"]) == 1
        assert client.publish_info()  # until the application says so
        assert len(read_info(root, LOCAL_PORT)["locks"]) == 2
        again.release()
        assert client.publish_info()
        before = (path.stat().st_mtime_ns, path.read_text())
        assert [(lk["path"], lk["state"]) for lk in read_info(root, LOCAL_PORT)["locks"]] == [(str(data), "held")]
        time.sleep(0.02)
        assert not client.publish_info()  # unchanged: nothing written
        assert (path.stat().st_mtime_ns, path.read_text()) == before
        held.release()
        assert client.publish_info()
        assert read_info(root, LOCAL_PORT)["locks"] == []
    finally:
        client.close()
    assert not info_file(root, LOCAL_PORT).exists()


def test_a_local_waiter_publishes_when_it_starts_and_stops_waiting(service: tuple[Path, int], data: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root, port = service
    holder = remote(port, HOLDER_PORT, monkeypatch)
    monkeypatch.setenv("JBCPORTNO", str(LOCAL_PORT))
    client = LocalClient()
    try:
        held = holder.lock(data, KEY)
        states: list[list[str]] = []

        def published_then_release() -> None:  # once it has waited a moment (LONG_WAIT): most waits are shorter
            wait_for(lambda: [lk["state"] for lk in read_info(root, LOCAL_PORT)["locks"]] == ["waiting"], 5,
                     "the wait published")
            states.append(["waiting"])
            held.release()

        def on_wait(_: object) -> None:
            states.append([lk["state"] for lk in read_info(root, LOCAL_PORT)["locks"]])
            threading.Thread(target=published_then_release).start()

        with client.lock(data, KEY, timeout=10, on_wait=on_wait):
            assert states == [[], ["waiting"]]  # not written for a wait that may last microseconds
            assert [lk["state"] for lk in read_info(root, LOCAL_PORT)["locks"]] == ["held"]
    finally:
        client.close()
        holder.close()
    assert not info_file(root, LOCAL_PORT).exists()


def test_a_local_process_removes_its_file_at_exit(service: tuple[Path, int]) -> None:
    root, _ = service
    env = {**os.environ, "JBCPORTNO": str(LOCAL_PORT)}
    code = ("import os, sys; from dls_client import LocalClient; c = LocalClient(); "
            "assert os.path.exists(sys.argv[1]), 'not written'")
    subprocess.run([sys.executable, "-c", code, str(info_file(root, LOCAL_PORT))], env=env, check=True, timeout=30)
    assert not info_file(root, LOCAL_PORT).exists()


def test_the_record_is_cheap_and_marks_changes() -> None:
    info = LockInfo()
    written: list[dict[str, Any]] = []
    assert info.publish(written.append) and not info.publish(written.append)
    info.granted(7, "/d/F", 12, b"K", 5, 1)
    token = info.wait_started("/d/G", 13, b"L", 3, 2)
    assert info.publish(written.append)
    assert written[-1]["files"] == [{"path": "/d/F", "inode": 12}, {"path": "/d/G", "inode": 13}]
    assert [(lk["key"], lk["mode"], lk["state"]) for lk in written[-1]["locks"]] == [
        ("K", "EX", "held"), ("L", "PR", "waiting")]
    info.wait_ended(token)
    info.released(7)
    assert info.publish(written.append) and written[-1]["locks"] == []
    info.released(7)  # not held: no change
    assert not info.publish(written.append)


_DOCUMENTS = st.recursive(st.text() | st.integers(), lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                          max_leaves=30)


@given(_DOCUMENTS)
def test_a_document_is_written_as_json_writes_it(document: Any) -> None:
    """The client writes its InfoPut's document without the json module, the very text json.dumps gives."""
    assert to_json(document) == json.dumps(document)


def test_odd_text_is_written_as_json_writes_it() -> None:
    """A path that is not UTF-8 (os.fsdecode's surrogates), control characters, quotes, non-ASCII text."""
    info = LockInfo()
    info.granted(1, "/d/caf\udce9 \"é\"\n\t\x00\u2028", 1 << 63, b"K\xff\\", 5, 2**64 - 1)
    document = info.document()
    assert to_json(document) == json.dumps(document)
    assert json.loads(to_json(document)) == document
    with pytest.raises(TypeError):
        to_json({"x": 1.5})

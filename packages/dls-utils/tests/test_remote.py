"""show-item-locks --server against a real jdls: the snapshot travels over the wire protocol.

The daemon runs as a real program (``python -m dls_daemon``) on a free port
with a private JBCRELEASEDIR; clients are raw dls-proto sockets, so that this
test also says exactly what a client sends. Teardown stops (-k) and removes
(-K) the service and fails if IPC or a process of it is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dls_proto import (
    WAIT_FOREVER,
    Acquired,
    Connection,
    Echo,
    EchoReply,
    InfoPut,
    Lock,
    LockFlag,
    Mode,
    Welcome,
)
from dls_shm import resource_value
from dls_testkit import KEY, greet, receive, wait_for
from dls_testkit import Service as Daemon
from dls_utils.show_item_locks import main

pytestmark = pytest.mark.slow


@pytest.fixture
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            daemon_in: Callable[[Path], contextlib.AbstractContextManager[Daemon]]) -> Iterator[Daemon]:
    # show-item-locks itself must not find a table or JDLS of its own by accident.
    for name in ("JDLS", "DLS_IPC_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JBCRELEASEDIR", str(tmp_path / "elsewhere"))
    with daemon_in(tmp_path / "service") as svc:
        yield svc


def client(svc: Daemon, port: int) -> tuple[socket.socket, Connection, Welcome]:
    """A connected client that says it is ``port``: the socket, its connection and the Welcome."""
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
    svc.sockets.append(sock)
    conn, welcome = greet(sock, port)
    return sock, conn, welcome


def describe(sock: socket.socket, conn: Connection, path: Path) -> None:
    """Send the client's lock information, and wait until the lock server has written it."""
    document = {"files": [{"path": str(path), "inode": path.stat().st_ino}], "locks": []}
    sock.sendall(conn.send(InfoPut(8, json.dumps(document).encode())))
    sock.sendall(conn.send(Echo(9, b"sync")))
    receive(sock, conn, EchoReply)


def snapshot_rows(capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, Any]]:
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    return rows


def test_a_lock_through_the_listener(service: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "FBNK.ACCOUNT"
    data.write_text("")
    inode = data.stat().st_ino
    sock, conn, welcome = client(service, 4)
    sock.sendall(conn.send(Lock(2, Mode.EX, 0, 0, 1, inode, -1, KEY.encode(), str(data))))
    receive(sock, conn, Acquired)
    describe(sock, conn, data)
    lock_no = f"0x{resource_value(inode, -1, KEY.encode()):08x},W"
    server = f"127.0.0.1,{service.port}"

    assert main(["--server", server]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"show-item-locks information retrieved from the lock table and proc/info of the "
                               f"lock service at {server} on host ")
    assert lines[2:] == [
        "IPADDR\tPORT\tPID\tFILENAME\tRECORD KEY\tLOCK#\tPORT/-PID",
        f"127.0.0.1\t4\t{welcome.server_pid}\t{data}\t{KEY}\t{lock_no}\t---",
    ]
    (row,) = snapshot_rows(capsys, "--server", server)
    assert row["pid"] == welcome.server_pid != os.getpid()
    assert row["client_pid"] == os.getpid()

    # A second client waits for the lock: its port shows in the holder's row.
    sock2, conn2, _ = client(service, 5)
    sock2.sendall(conn2.send(Lock(2, Mode.EX, LockFlag.NO_INTERIM, WAIT_FOREVER, 1, inode, -1, KEY.encode(),
                                  str(data))))
    rows: list[dict[str, Any]] = []

    def waiter_shown() -> bool:
        rows[:] = snapshot_rows(capsys, "--server", server)
        return bool(rows[0]["waiters"] == [5])

    wait_for(waiter_shown, 10, "port 5 among the waiters of the held lock", poll=0.05)
    assert len(rows) == 1 and rows[0]["port"] == 4

    # JDLS's SERVER is used when no --server is given.
    monkeypatch.setenv("JDLS", f"SERVER=127.0.0.1,{service.port}")
    assert [r["port"] for r in snapshot_rows(capsys)] == [4]
    assert [r["port"] for r in snapshot_rows(capsys, "--file", "CUSTOMER")] == []

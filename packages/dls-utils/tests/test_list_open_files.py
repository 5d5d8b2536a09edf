"""list-open-files from real proc/info documents, and from a real jdls over the protocol."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import pytest
from dls_proto import Echo, EchoReply, InfoPut
from dls_shm import Instance, info
from dls_testkit import greet, receive
from dls_utils.list_open_files import get_parser, main
from dls_utils.source import this_host


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_local_documents(clean_env: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    info.write(clean_env, 1000, {"pid": 15031, "ip": "10.44.1.55", "files": [
        {"path": "cu/FBNK.CUSTOMER", "inode": 77}, {"path": "ac/FBNK.ACCOUNT", "inode": 5}]})
    info.write(clean_env, 2, {"pid": 15071, "ip": "0.0.0.0", "files": [
        {"path": "ac/FBNK.ACCOUNT", "inode": 5}, {"path": "ac/FBNK.ACCOUNT", "inode": 5}], "locks": []})
    info.write(clean_env, 3, {"pid": 3, "files": []})
    code, lines, err = run(capsys)
    assert code == 0, err
    assert lines[0] == (f"list-open-files information retrieved from proc/info of JBCRELEASEDIR={clean_env.root} "
                        f"on host {this_host()}")
    assert lines[1:] == [
        "",
        "IPADDR\tPORT\tPID\tFILENAME",
        "0.0.0.0\t2\t15071\tac/FBNK.ACCOUNT",
        "10.44.1.55\t1000\t15031\tac/FBNK.ACCOUNT",
        "10.44.1.55\t1000\t15031\tcu/FBNK.CUSTOMER",
    ]
    _, lines, _ = run(capsys, "--file", "CUSTOMER")
    assert lines[3:] == ["10.44.1.55\t1000\t15031\tcu/FBNK.CUSTOMER"]
    _, lines, _ = run(capsys, "--port", "2")
    assert lines[3:] == ["0.0.0.0\t2\t15071\tac/FBNK.ACCOUNT"]
    _, lines, _ = run(capsys, "--port", "3")
    assert lines[2:] == ["(no open files)"]
    code, lines, _ = run(capsys, "--json", "--port", "1000")
    assert code == 0
    assert json.loads("\n".join(lines)) == [
        {"ipaddr": "10.44.1.55", "port": 1000, "pid": 15031, "filename": "ac/FBNK.ACCOUNT", "inode": 5},
        {"ipaddr": "10.44.1.55", "port": 1000, "pid": 15031, "filename": "cu/FBNK.CUSTOMER", "inode": 77},
    ]


def test_no_information_directory(clean_env: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, err = run(capsys)
    assert (code, lines) == (1, [])
    assert err == (f"list-open-files: no proc/info directory for JBCRELEASEDIR={clean_env.root} "
                   "(is jdls running there?)\n")
    assert run(capsys, "--server", "h", "--local")[0] == 2
    assert "exit status" in get_parser().format_help()


@pytest.mark.slow
def test_from_a_real_service(daemon: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                             tmp_path: Any) -> None:
    daemon.start()
    data = tmp_path / "FBNK.ACCOUNT"
    data.write_text("")
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        conn, welcome = greet(sock, 4)
        document = {"files": [{"path": str(data), "inode": data.stat().st_ino}], "locks": []}
        sock.sendall(conn.send(InfoPut(8, json.dumps(document).encode())))
        sock.sendall(conn.send(Echo(9, b"sync")))
        receive(sock, conn, EchoReply)
        server = f"127.0.0.1,{daemon.port}"
        code, lines, err = run(capsys, "--server", server)
        assert code == 0, err
        assert lines[0].startswith(f"list-open-files information retrieved from proc/info of the lock service at "
                                   f"{server} on host ")
        assert lines[2:] == ["IPADDR\tPORT\tPID\tFILENAME", f"127.0.0.1\t4\t{os.getpid()}\t{data}"]
        # JDLS's SERVER is used when there is no --server; --local reads this host's documents.
        monkeypatch.setenv("JDLS", f"SERVER={server}")
        code, lines, err = run(capsys, "--json")
        assert code == 0, err
        (row,) = json.loads("\n".join(lines))
        assert (row["port"], row["filename"], row["inode"]) == (4, str(data), data.stat().st_ino)
        code, lines, err = run(capsys, "--local")
        assert code == 0, err
        assert lines[-1] == f"127.0.0.1\t4\t{os.getpid()}\t{data}"
        assert welcome.server_pid != os.getpid()

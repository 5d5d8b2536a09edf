"""A client's lock information that is not text (JSON's ``\\ud800`` escape makes a lone surrogate) is shown
with U+FFFD in its place by the operator's tools, never a traceback (issue 15's attack, L3).

Real processes: a real service, a raw client publishing its document through it, the real tools.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from dls_proto import Echo, EchoReply, InfoPut
from dls_testkit import Service, greet, receive

DOCUMENT = b'{"files": [{"path": "/data/FBNK\\ud800.ACCOUNT", "inode": 4711}], "program": "evil\\udcff"}'


def test_lock_information_that_is_not_text_is_shown_replaced(service: Service, tmp_path: Path) -> None:
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    service.sockets.append(sock)
    conn, _ = greet(sock, 1000)
    sock.sendall(conn.send(InfoPut(2, DOCUMENT)))
    sock.sendall(conn.send(Echo(3, b"")))
    receive(sock, conn, EchoReply)
    for tool in ("dls_utils.list_open_files", "dls_utils.show_item_locks"):
        done = subprocess.run([sys.executable, "-m", tool], env=service.env, capture_output=True, timeout=30)
        assert done.returncode == 0 and b"Traceback" not in done.stderr, (tool, done.stderr)
        if tool.endswith("list_open_files"):
            assert "/data/FBNK\ufffd".encode() in done.stdout, done.stdout

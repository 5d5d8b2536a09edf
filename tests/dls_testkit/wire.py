"""A client that speaks the protocol by hand over a real socket, so that a test says exactly what is sent."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from dls_proto import PROTOCOL_VERSIONS, Connection, Hello, Role, Waiting, Welcome
from dls_proto import receive as proto_receive


def receive(sock: socket.socket, conn: Connection, kind: Any, timeout: float = 10.0) -> Any:
    """The next event on ``conn`` (dls-proto's ``receive``, reading ``sock``), which must be of ``kind`` (a class
    or a union of them): any other fails the test, and so does the peer's close unless ``kind`` takes the
    ConnectionClosed it gives."""
    sock.settimeout(timeout)
    event = proto_receive(conn, lambda: sock.recv(65536))
    assert isinstance(event, kind), f"unexpected {event!r}"
    return event


def receive_final(sock: socket.socket, conn: Connection, kind: Any, timeout: float = 10.0) -> Any:
    """The next event on ``conn`` but interim Waiting messages, which must be of ``kind``: a waiting request's
    answer."""
    while isinstance(event := receive(sock, conn, kind | Waiting, timeout), Waiting):
        pass
    return event


def hello(port: int = 4242, *, thread: int = 1, pid: int | None = None, host: str = "test-host",
          max_version: int = PROTOCOL_VERSIONS[1]) -> Hello:
    """The Hello of a test client that says it is ``port`` (the versions this dls-proto speaks, up to
    ``max_version``: a client of an earlier version)."""
    return Hello(1, PROTOCOL_VERSIONS[0], max_version, 0, port, os.getpid() if pid is None else pid, thread, host,
                 "pytest")


def greet(sock: socket.socket, port: int = 4242, *, thread: int = 1, expect: Any = Welcome,
          **who: Any) -> tuple[Connection, Any]:
    """Say ``hello(port, ...)`` on ``sock``: the client's Connection and the answer (of kind ``expect``)."""
    conn = Connection(Role.CLIENT)
    sock.sendall(conn.send(hello(port, thread=thread, **who)))
    return conn, receive(sock, conn, expect)


def dribble(sock: socket.socket, data: bytes, pause: float = 0.25) -> float | None:
    """Send ``data`` a byte every ``pause`` seconds, as a slow-loris peer does; the seconds until the other side
    closed the connection (or reset it), or None if it let every byte through and kept it open."""
    sock.settimeout(pause)
    started = time.monotonic()
    for byte in data:
        try:
            sock.send(bytes([byte]))
            if sock.recv(100) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - started
    return None

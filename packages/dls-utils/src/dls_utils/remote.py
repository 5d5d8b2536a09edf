"""Asking a lock service for its snapshot over TCP, as a client on another host would.

A utility on an application server has no lock table of its own: the locks
live on the lock server host. So it speaks the same protocol as a client
(Hello, then requests), asks once for an information snapshot (InfoGet) and
hangs up. Only dls-proto is used: the utilities never borrow the client
library's code, so they keep working whatever state that library is in.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from typing import Any, NamedTuple

from dls_proto import (
    PROTOCOL_VERSIONS,
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    InfoGet,
    InfoSnapshot,
    NeedData,
    ProtocolError,
    Role,
    Welcome,
)

#: The lock service's port when none is named (as in JDLS).
DEFAULT_PORT = 50002
#: A snapshot lists every lock of the table and every info document: allow big frames.
MAX_FRAME = 16 * 1024 * 1024
#: Seconds to wait for the connection and each answer: an operator is waiting too.
DEFAULT_TIMEOUT = 10.0
PROGRAM = "show-item-locks"


class Server(NamedTuple):
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"{self.host},{self.port}"


class RemoteError(Exception):
    """The snapshot could not be had; the message names the server and why."""


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{where}: port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_server(text: str) -> Server:
    """``host`` or ``host,port`` (the JDLS spelling, which keeps IPv6 addresses unambiguous)."""
    host, comma, port = text.strip().partition(",")
    host = host.strip()
    if not host:
        raise ValueError(f"server {text!r}: expected host or host,port")
    return Server(host, _port(port.strip(), f"server {text!r}")) if comma else Server(host)


def server_from_jdls(value: str) -> Server | None:
    """The SERVER of a JDLS value (``SERVER=host`` optionally followed by a port token), or None.

    Only SERVER matters here; the client library owns the rest of JDLS and
    rejects what it does not know, so other options are skipped, not judged.
    """
    tokens = [t.strip() for t in value.split(",")]
    for i, token in enumerate(tokens):
        name, eq, host = token.partition("=")
        if name.strip().upper() != "SERVER" or not eq:
            continue
        host = host.strip()
        if not host:
            raise ValueError(f"JDLS={value!r}: SERVER names no host")
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if following[:1].isdigit() and "=" not in following:
            return Server(host, _port(following, f"JDLS SERVER={host}"))
        return Server(host)
    return None


def _own_port() -> int:
    """Who we say we are in Hello: JBCPORTNO when set, else our pid (as a client does)."""
    text = os.environ.get("JBCPORTNO", "")
    return int(text) if text.isdigit() and int(text) < 1 << 32 else os.getpid()


def _hello() -> Hello:
    return Hello(
        1, PROTOCOL_VERSIONS[0], PROTOCOL_VERSIONS[1], 0, _own_port(), os.getpid(),
        threading.get_native_id(), socket.gethostname()[:255],
        os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else PROGRAM,
    )


def fetch_snapshot(server: Server, *, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """The service's snapshot: {"host", "mechanism", "locks": [entry_json...], "info": [documents]}."""
    where = f"lock service at {server.host}, port {server.port}"
    try:
        sock = socket.create_connection((server.host, server.port), timeout=timeout)
    except OSError as exc:
        raise RemoteError(f"cannot connect to the {where}: {exc.strerror or exc}") from None
    try:
        with sock:
            conn = Connection(Role.CLIENT, max_frame=MAX_FRAME)
            sock.sendall(conn.send(_hello()))
            welcome = _receive(sock, conn, where)
            if not isinstance(welcome, Welcome):
                raise RemoteError(f"the {where} refused the connection: {_describe(welcome)}")
            sock.sendall(conn.send(InfoGet(2, 0)))
            reply = _receive(sock, conn, where)
            if not isinstance(reply, InfoSnapshot):
                raise RemoteError(f"the {where} gave no snapshot: {_describe(reply)}")
    except TimeoutError:
        raise RemoteError(f"the {where} did not answer within {timeout:g} seconds") from None
    except ProtocolError as exc:
        raise RemoteError(f"the {where} does not speak the dls protocol as expected: {exc}") from None
    except OSError as exc:
        raise RemoteError(f"connection to the {where} failed: {exc.strerror or exc}") from None
    try:
        document = json.loads(reply.payload)
    except ValueError as exc:
        raise RemoteError(f"the {where} sent a snapshot that is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RemoteError(f"the {where} sent a snapshot that is not a JSON object")
    return document


def _receive(sock: socket.socket, conn: Connection, where: str) -> object:
    """The next event that is not NEED_DATA; a closed connection is an error here."""
    while True:
        event = conn.next_event()
        if isinstance(event, ConnectionClosed):
            raise RemoteError(f"the {where} closed the connection")
        if not isinstance(event, NeedData):
            return event
        conn.receive_data(sock.recv(65536))


def _describe(event: object) -> str:
    if isinstance(event, Error):
        return f"{event.reason} (error {event.code})"
    return f"unexpected {type(event).__name__}"

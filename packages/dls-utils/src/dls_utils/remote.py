"""Asking a lock service for its snapshot over TCP, as a client on another host would.

A utility on an application server has no lock table of its own: the locks
live on the lock server host. So it speaks the same protocol as a client
(Hello, then requests), asks once for an information snapshot (InfoGet) and
hangs up. Only dls-proto is used: the utilities never borrow the client
library's code, so they keep working whatever state that library is in.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

from dls_proto import (
    CLIENT_MAX_FRAME,
    ConfigurationError,
    Connection,
    ConnectionClosed,
    Error,
    InfoGet,
    InfoSnapshot,
    ProtocolError,
    Role,
    Server,
    Welcome,
    exchange,
    identity,
    jdls,
    tls,
)
from dls_proto.text import amount

#: Seconds to wait for the connection and each answer: an operator is waiting too.
DEFAULT_TIMEOUT = 10.0


class RemoteError(Exception):
    """The snapshot could not be had; the message names the server and why."""


#: The key under which fetch_snapshot adds the address it reached the service at (not the service's word).
PEER_ADDRESS = "peer_address"


def fetch_snapshot(server: Server, *, timeout: float = DEFAULT_TIMEOUT,
                   tls_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """The service's snapshot: {"host", "mechanism", "locks": [entry_json...], "info": [documents]}, with the
    address the service was reached at added under PEER_ADDRESS; over TLS with ``tls_context`` (JDLS TLS),
    the server's certificate verified for ``server.host``."""
    where = f"lock service at {server.host}, port {server.port}"
    try:
        hello = identity.hello()
    except ConfigurationError as exc:
        raise RemoteError(str(exc)) from None
    try:
        sock = jdls.connect(server, timeout)
        if tls_context is not None:
            sock = tls.wrap(sock, tls_context, server.host, timeout)
    except OSError as exc:
        raise RemoteError(f"cannot connect to the {where}: {tls.failure(exc)}") from None
    try:
        with sock:
            address = str(sock.getpeername()[0])
            conn = Connection(Role.CLIENT, max_frame=CLIENT_MAX_FRAME)
            welcome = exchange(sock, conn, hello)
            if not isinstance(welcome, Welcome):
                raise RemoteError(f"the {where} refused the connection: {_describe(welcome)}")
            reply = exchange(sock, conn, InfoGet(1, 0))
            if not isinstance(reply, InfoSnapshot):
                raise RemoteError(f"the {where} gave no snapshot: {_describe(reply)}")
    except TimeoutError:
        raise RemoteError(f"the {where} did not answer within {amount(timeout, 'second')}") from None
    except ProtocolError as exc:
        raise RemoteError(f"the {where} does not speak the dls protocol as expected: {exc}") from None
    except OSError as exc:
        raise RemoteError(f"connection to the {where} failed: {tls.failure(exc)}") from None
    try:
        document = json.loads(reply.payload)
    except ValueError as exc:
        raise RemoteError(f"the {where} sent a snapshot that is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise RemoteError(f"the {where} sent a snapshot that is not a JSON object")
    document[PEER_ADDRESS] = address
    return document


def _describe(event: object) -> str:
    if isinstance(event, ConnectionClosed):
        return "it closed the connection"
    if isinstance(event, Error):
        return f"{event.reason} (error {event.code})"
    return f"unexpected {type(event).__name__}"

"""The test of a client's configuration, jDLS's ``-C teststring``: ``jdls -C`` and ``dls-test`` both run it.

The point of the test is to find out, before an application does, whether the
clients of this host can use the lock service as they are configured. So it
reads JDLS and JBCPORTNO as every client reads them (``jdls.parse``,
``environment.port_number``: a value a client refuses is refused here, by
name, with EX_CONFIG), and reaches each server JDLS names (SERVER, then
SERVER2) as a client reaches it: TCP within ``jdls.CONNECT_TIMEOUT``, TLS when
JDLS says TLS (with its CA, CERT and KEY), then the greeting and the echo,
each answered within JDLS's TIMEOUT. It prints what it used and what came
back in the words of the jDLS guide ("Client: Using host 'localhost', service
'50002'"); the reasons of a failure go to standard error.

One module for both commands, so that ``jdls -C`` on the lock server's host and
``dls-test`` on an application server cannot drift apart. It speaks the
protocol directly (dls-daemon, which has ``jdls -C``, does not depend on the
client library); the client library connects the same way (its channel uses
the same connect timeout, TLS context and Hello).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO, TypeVar

from . import environment, identity, jdls, tls
from .connection import Connection, Role
from .errors import ConfigurationError, ProtocolError
from .messages import ConnectionClosed, Echo, EchoReply, Error, Mechanism, Message, Welcome
from .transport import exchange

#: The longest test string: the Echo message's length field is 16 bits (a lock server may take less:
#: its largest frame, which its Welcome says).
MAX_TEST_STRING = 0xFFFF
#: An Echo's body beyond its data: the length field.
_ECHO_OVERHEAD = 2
#: The exit statuses: the string came back from every server; it did not (or a server was not reached);
#: the test string is too long (a usage error); JDLS or JBCPORTNO is refused (EX_CONFIG, as every client).
OK, FAILED, USAGE, CONFIG = os.EX_OK, 1, 2, os.EX_CONFIG

T = TypeVar("T")


class _Failed(Exception):
    """The test of one server failed; the message says why (the lines to print)."""


def run(
    teststring: str, *, prog: str, server: jdls.Server | None = None, verbose: bool = False,
    environ: Mapping[str, str] | None = None, out: TextIO | None = None, err: TextIO | None = None,
    trace: Callable[[str], None] | None = None,
) -> int:
    """Test the client configuration of ``environ`` (default: this process's) with ``teststring``; the exit
    status (OK, FAILED, USAGE, CONFIG). ``server`` replaces the servers of JDLS (the rest of JDLS still
    applies); ``prog`` prefixes the refusals; ``trace`` also gets each failure (a client's error trace)."""
    out = out or sys.stdout
    err = err or sys.stderr
    environ = os.environ if environ is None else environ
    data = os.fsencode(teststring)
    if len(data) > MAX_TEST_STRING:
        print(f"{prog}: the test string is {len(data)} bytes long; an echo carries at most {MAX_TEST_STRING}",
              file=err)
        return USAGE
    value = environ.get(jdls.VARIABLE)
    try:
        config = jdls.parse(value or "")
        port = environment.port_number(environ)
        context = config.ssl_context()
    except ConfigurationError as exc:
        print(f"{prog}: {exc}", file=err)
        return CONFIG
    if server is not None:
        servers = [("", server)]
    elif config.server2 is not None:
        servers = [("primary lock service (JDLS SERVER)", config.server),
                   ("secondary lock service (JDLS SERVER2)", config.server2)]
    else:
        if value is None:
            print(f"Client: {jdls.VARIABLE} is not set; testing the default of a set but empty {jdls.VARIABLE}, "
                  f"{config.server}", file=out, flush=True)
        servers = [("", config.server)]
    worst = OK
    for what, one in servers:
        if what:
            print(f"Client: testing the {what}", file=out, flush=True)
        try:
            _test(one, config, context, port, prog, data, verbose, out)
        except _Failed as exc:
            out.flush()
            print(exc, file=err, flush=True)
            if trace is not None:
                for line in str(exc).splitlines():
                    trace(line)
            worst = FAILED
    return worst


def _test(server: jdls.Server, config: jdls.Config, context: ssl.SSLContext | None, port: int, prog: str,
          data: bytes, verbose: bool, out: TextIO) -> None:
    """Connect to ``server``, greet it and have ``data`` echoed; _Failed says what went wrong."""
    host = server.host
    print(f"Client: Using host '{host}', service '{server.port}'", file=out, flush=True)
    try:
        sock = jdls.connect(server, jdls.CONNECT_TIMEOUT)
        if context is not None:
            sock = tls.wrap(sock, context, host, jdls.CONNECT_TIMEOUT)
    except TimeoutError:
        raise _Failed(f"Client: Unable to allocate socket\nClient: connection failed for host '{host}', service "
                      f"'{server.port}', error no answer within {jdls.CONNECT_TIMEOUT:g} s") from None
    except OSError as exc:
        raise _Failed(f"Client: Unable to allocate socket\nClient: connection failed for host '{host}', service "
                      f"'{server.port}', error {tls.failure(exc)}") from None
    where = f"host '{host}', service '{server.port}'"
    # A client waits TIMEOUT for each answer (WAIT: without limit, but a test must end).
    timeout = config.timeout
    try:
        with sock:
            sock.settimeout(timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(Role.CLIENT)
            welcome = _expect(sock, conn, identity.hello(prog, port=port), Welcome, where)
            if isinstance(sock, ssl.SSLSocket):
                print(f"Client: {sock.version()}, the server's certificate verified for '{host}'", file=out)
            how = "shared memory lock table" if welcome.mechanism == Mechanism.TABLE else "OS file locks"
            print(f"Client: connected to lock server pid {welcome.server_pid} on '{welcome.server_host or host}' "
                  f"(protocol version {welcome.version}, {how})", file=out)
            print(f"Client: the lock server sees this client as {welcome.peer}", file=out)
            if verbose:
                print(f"Client: its largest frame is {welcome.max_frame} bytes; answers awaited {timeout:g} s "
                      f"(JDLS TIMEOUT)", file=out)
            if len(data) + _ECHO_OVERHEAD > welcome.max_frame:
                raise _Failed(f"Client: the test string is {len(data)} bytes long; this lock server takes at most "
                              f"{welcome.max_frame - _ECHO_OVERHEAD} in an echo (its largest frame, jdls "
                              "--max-frame)")
            started = time.perf_counter()
            reply = _expect(sock, conn, Echo(1, data), EchoReply, where)
            took = time.perf_counter() - started
    except TimeoutError:
        raise _Failed(f"Client: no answer from {where} within {timeout:g} s (JDLS TIMEOUT)") from None
    except OSError as exc:
        raise _Failed(f"Client: connection to {where} failed: {tls.failure(exc)}") from None
    except ProtocolError as exc:
        raise _Failed(f"Client: connection to {where} failed: {exc}") from None
    text = os.fsdecode(data)
    shown = reply.data.decode("utf-8", "backslashreplace")
    if reply.data != data:
        raise _Failed(f"Client: sent '{text}' but received '{shown}'")
    print(f"Client: received '{shown}' in {took * 1000:.3f} ms (round trip)", file=out, flush=True)


def _expect(sock: socket.socket, conn: Connection, message: Message, kind: type[T], where: str) -> T:
    """Send ``message``; its answer, which must be a ``kind`` (_Failed says what came instead)."""
    event = exchange(sock, conn, message)
    if isinstance(event, kind):
        return event
    if isinstance(event, Error):
        raise _Failed(f"Client: the lock service at {where} answered with an error: {event.reason}")
    if isinstance(event, ConnectionClosed):
        raise _Failed(f"Client: the lock service at {where} closed the connection")
    raise _Failed(f"Client: unexpected {type(event).__name__} from {where}")

"""The monitor's HTTP server (``jdls -i --http ADDR:PORT``): ``/metrics`` and the status page.

Why a thread of the monitor rather than a companion process: what it serves is
the monitor's (the table it has mapped, its tidy and deadlock counts, the lock
servers' figures it gathers), so a thread reads them where they are, with no
second channel to keep them in step; and a companion would be one more process
to start, stop and reap in each of the monitor's lives (background, foreground
beside the listener, -A). The thread is started only once the monitor has
forked what it forks (``Monitor.run``): a fork never copies it half way through
a request.

Why a thread cannot stall the monitor's loop: the server is http.server's
``ThreadingHTTPServer`` (one daemon thread per connection) with bounds of its
own. A connection has REQUEST_TIMEOUT seconds for each read and write and its
whole request (a client that trickles a byte at a time is cut off), and at most
MAX_CONNECTIONS are served at once: one more is closed at accept, unanswered
(logged, rate-limited). Threads waiting on a socket hold no lock the loop
needs, and the GIL is released while they wait, so garbage, half requests and
a thousand idle connections cost the loop nothing; the most a scrape takes
from it is the copy of one group at a time (``metrics``). A handler's
exception is logged and answered 500 with a short body: never a traceback to
the client, never the monitor down.

Who may load anything: the ``--admin-allow`` networks (those that may read
the lock snapshot; default this host). Others get 403 and a short body, and
the log names their address (rate-limited by the log's filter). Only GET (and
HEAD) are served; others get 405.

Why a request cannot make the monitor work without bound: the bounds above
limit connections, not the CPU a handler takes (the GIL is the monitor's
too). So each route's answer is computed by one request at a time and shared
(``_Shared``): requests that come meanwhile wait for it, and one that comes
while the last answer is fresh gets it again. An answer stays fresh for
FRESH seconds, or twice what it took to compute if that is longer: however
many clients scrape or keep the page open, a route costs the monitor at
most about a third of the CPU, and a client that leaves leaves no
computation of its own behind.

A stranger (an address outside ``--admin-allow``) never takes one of the
MAX_CONNECTIONS the operator's scrapes need: its connections are counted
apart (at most STRANGERS at once, each with STRANGER_TIMEOUT for its request),
and whatever it sends is answered 403.

Routes: ``WebServer.add(path, handler)``; a handler gets the query parameters
(``urllib.parse.parse_qs``'s dict) and returns a Reply (status, content type,
body bytes). ``/`` serves the package's ``data/status.html``.
"""

from __future__ import annotations

import argparse
import http.server
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from .context import Network, address_in

#: Seconds a connection has for each read and write, and for its whole request line and headers.
REQUEST_TIMEOUT = 5.0
#: Connections served at once; one more is closed at accept.
MAX_CONNECTIONS = 64
#: Connections of addresses outside --admin-allow served (answered 403) at once, and the seconds each has.
STRANGERS = 16
STRANGER_TIMEOUT = 1.0
#: Seconds a route's answer is given again to the requests that come after it (see ``_Shared``).
FRESH = 1.0
#: What a browser may do with what is served: the page's own inline script and style, its data from this
#: address, nothing else (no other origin, no frame around it, no form, no plug-in).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
#: The status page, in the package's data (dls_daemon/data).
STATUS_PAGE = "status.html"


class Reply(NamedTuple):
    """What a route answers: an HTTP status, a content type and the body."""

    status: int
    content_type: str
    body: bytes


Query = dict[str, list[str]]
Handler = Callable[[Query], Reply]


class _Shared:
    """One route's answers, computed one at a time and shared while fresh (the module docstring says why)."""

    #: Different queries remembered at once (the page asks for one or two).
    KEPT = 8

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.lock = threading.Lock()
        self.answers: dict[tuple[tuple[str, tuple[str, ...]], ...], tuple[float, Reply]] = {}

    def __call__(self, query: Query) -> Reply:
        key = tuple(sorted((name, tuple(values)) for name, values in query.items()))
        with self.lock:
            now = time.monotonic()
            kept = self.answers.get(key)
            if kept is not None and now < kept[0]:
                return kept[1]
            reply = self.handler(query)
            took = time.monotonic() - now
            if len(self.answers) >= self.KEPT:
                self.answers.clear()
            self.answers[key] = (now + took + max(FRESH, 2 * took), reply)
            return reply


def text(status: int, message: str) -> Reply:
    """A short plain-text answer (errors, refusals)."""
    return Reply(status, "text/plain; charset=utf-8", (message + "\n").encode())


def parse_address(value: str) -> tuple[str, int]:
    """``--http ADDR:PORT`` (``127.0.0.1:9102``, ``[::1]:9102``) as (address, port); argparse's type."""
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address without brackets: ambiguous
    try:
        ip = ipaddress.ip_address(host)
        port = int(port_text) if port_text.isascii() and port_text.isdigit() else 0
    except ValueError:
        port = 0
        ip = None
    if not sep or ip is None or not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid HTTP address {value!r}: expected ADDR:PORT, an IP address and a port 1 to 65535 "
            "(127.0.0.1:9102, [::1]:9102)")
    return str(ip), port


def shown(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class _Server(http.server.ThreadingHTTPServer):
    """http.server's threading server, bounded: at most MAX_CONNECTIONS at once, each in a daemon thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, web: WebServer, address: tuple[str, int]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.web = web
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.stranger_slots = threading.BoundedSemaphore(STRANGERS)
        super().__init__(address, _RequestHandler)

    def _slots_of(self, peer: str) -> threading.BoundedSemaphore:
        return self.slots if address_in(peer, self.web.allow) else self.stranger_slots

    def verify_request(self, request: Any, client_address: Any) -> bool:
        slots = self._slots_of(client_address[0])
        if slots.acquire(blocking=False):
            return True
        if slots is self.slots:
            self.web.log.warning("http: %s connections open already: one from %s closed unanswered",
                                 MAX_CONNECTIONS, client_address[0])
        else:
            self.web.log.warning("http: %s refused: not in --admin-allow (closed: %s such connections open)",
                                 client_address[0], STRANGERS)
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots_of(client_address[0]).release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.web.log.warning("http: request from %s failed", client_address[0], exc_info=True)


class _RequestHandler(http.server.BaseHTTPRequestHandler):
    """One connection: GET routes only, from the allowed networks only, within REQUEST_TIMEOUT."""

    server: _Server
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive connection to hold
    server_version = "dls"
    sys_version = ""

    def setup(self) -> None:
        self.stranger = not address_in(self.client_address[0], self.server.web.allow)
        self.limit = STRANGER_TIMEOUT if self.stranger else REQUEST_TIMEOUT
        super().setup()
        self.connection.settimeout(self.limit)

    def handle_one_request(self) -> None:
        # The whole request line and headers within the timeout, not each read: a trickle is cut off.
        watchdog = threading.Timer(self.limit, self._cut_off)
        watchdog.daemon = True
        watchdog.start()
        try:
            super().handle_one_request()
        except (OSError, ValueError):
            self.close_connection = True
        finally:
            watchdog.cancel()

    def _cut_off(self) -> None:
        """The request took too long: shut the socket, which ends any read the handler waits in."""
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _refuse_method(self) -> None:
        if self._refused_stranger():
            return
        self._send(text(405, "405 only GET and HEAD are served here"), extra={"Allow": "GET, HEAD"})

    def _refused_stranger(self) -> bool:
        """An address outside --admin-allow is answered 403, whatever it asked, and logged."""
        if not self.stranger:
            return False
        self.server.web.log.warning("http: %s refused: not in --admin-allow", self.client_address[0])
        self._send(text(403, "403 forbidden: this address may not read the lock service's state"))
        return True

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse_method

    def _serve(self, *, head: bool) -> None:
        if self._refused_stranger():
            return
        web = self.server.web
        parts = urlsplit(self.path)
        handler = web.routes.get(parts.path)
        if handler is None:
            self._send(text(404, "404 not found"))
            return
        try:
            reply = handler(parse_qs(parts.query, max_num_fields=100))
        except Exception:
            web.log.exception("http: %s %s failed", self.command, parts.path)
            reply = text(500, "500 internal error (the jdls log says why)")
        self._send(reply, head=head)

    def _send(self, reply: Reply, *, head: bool = False, extra: dict[str, str] | None = None) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(reply.body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a bad request line, 501 for an unknown method) as a short plain body that
        echoes nothing of the request (http.server's message may quote it)."""
        self.close_connection = True
        if code == 501:
            code = 405
        if self.stranger:
            code = 403
        try:
            self._send(text(code, f"{code} {self.responses.get(code, ('error',))[0]}"),
                       head=self.command == "HEAD")
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        self.server.web.log.debug("http: %s %s", self.client_address[0], format % args)


class WebServer:
    """The routes, who may load them, and the listening socket (bound at construction: a port in use fails
    the monitor's start); ``start`` serves in a thread, ``close`` stops it."""

    def __init__(self, address: tuple[str, int], allow: tuple[Network, ...], log: logging.Logger) -> None:
        self.allow = allow
        self.log = log
        self.routes: dict[str, Handler] = {}
        self._thread: threading.Thread | None = None
        self.server = _Server(self, address)
        self.add("/", status_page)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def add(self, path: str, handler: Handler) -> None:
        """Serve GET ``path`` (the URL's path, exact) with ``handler``, its answers shared (``_Shared``)."""
        self.routes[path] = _Shared(handler)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="dls-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
            self._thread = None
        self.server.server_close()


def status_page(query: Query) -> Reply:
    """``/``: the status page shipped in the package (dls_daemon/data/status.html)."""
    body = resources.files("dls_daemon").joinpath("data", STATUS_PAGE).read_bytes()
    return Reply(200, "text/html; charset=utf-8", body)

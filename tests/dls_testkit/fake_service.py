"""An in-process lock service for one client connection, scripted by the test: no daemon, no TCP port.

The client end of a socketpair (``client_socket``) goes to the code under test (dls-client's Channel
takes it as ``sock``); the service end is served by a thread through dls-proto's server-side
``Connection``, so every frame the fake sends is one a real lock server could send, unless the test
sends raw bytes on purpose.

The greeting is answered by ``greeting(hello)`` (default: Welcome with the highest common version and
the lock-delay the fake was given). Every request after it is answered by ``answer(request)`` when the
test gave one, else queued for the test, which takes it with ``next_request`` and replies with ``send``
(messages, or raw bytes), ``close``, or nothing at all (silence). Either callable returns what to send:
messages and raw bytes in order, and ``CLOSE`` to close the connection there. ``on_end`` hears how the
conversation ended: the service closed it (``close``, ``CLOSE``: a lock server killed) or the client did.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final

from dls_proto import (
    PROTOCOL_VERSIONS,
    Connection,
    ConnectionClosed,
    Hello,
    Mechanism,
    Message,
    NeedData,
    RemoteProtocolError,
    Role,
    Settings,
    Welcome,
    choose_version,
)


class _Close:
    """Sentinel: close the connection here."""


CLOSE: Final = _Close()
Reply = Message | bytes | _Close
Script = Callable[[Message], Sequence[Reply]]
#: The lock server pid the default Welcome names (no such process is needed).
SERVER_PID = 4242


def welcome(hello: Message, lock_delay_ms: int = 0) -> Sequence[Reply]:
    """The default greeting: Welcome with the highest version both sides speak, table mechanism, and
    ``lock_delay_ms`` (how long the service keeps a lost client's locks)."""
    assert isinstance(hello, Hello), hello
    version = choose_version(hello) or PROTOCOL_VERSIONS[0]
    return [Welcome(hello.request_id, version, Mechanism.TABLE, 0, SERVER_PID, 65536, lock_delay_ms,
                    "127.0.0.1", "fake")]


class FakeService:
    """One scripted lock server connection over a socketpair (see the module docstring).

    What the client did is kept: ``hello``, ``settings``, ``received`` (every request, answered or not),
    ``closed_by_client`` (the client closed its end) and ``protocol_error`` (the client broke the protocol)."""

    def __init__(self, *, greeting: Script | None = None, answer: Script | None = None, lock_delay_ms: int = 0,
                 on_end: Callable[[bool], None] | None = None) -> None:
        self.client_socket, self._sock = socket.socketpair()
        self._conn = Connection(Role.SERVER)
        self._greeting = greeting or (lambda hello: welcome(hello, lock_delay_ms))
        self._answer = answer
        self._on_end = on_end
        #: The service closed the connection (``close``, or CLOSE in a script), as a killed lock server would.
        self.closed_by_service = False
        self._send_lock = threading.Lock()
        self._requests: queue.Queue[Message] = queue.Queue()
        self.hello: Hello | None = None
        #: The Settings the client sent after Welcome (protocol version 3), kept apart from its requests.
        self.settings: Settings | None = None
        self.received: list[Message] = []
        self.closed_by_client = threading.Event()
        self.protocol_error: RemoteProtocolError | None = None
        self._thread = threading.Thread(target=self._serve, name="fake-service", daemon=True)
        self._thread.start()

    # -- what the test does ---------------------------------------------------------------

    def next_request(self, timeout: float = 2.0) -> Message:
        """The next request the client sent that no ``answer`` took (fails after ``timeout`` seconds)."""
        try:
            return self._requests.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the client sent no request within {timeout} s") from None

    def send(self, *replies: Reply) -> None:
        """Send messages (encoded by the server-side Connection) and raw bytes, in order; ``CLOSE`` closes."""
        with self._send_lock:
            for reply in replies:
                if isinstance(reply, _Close):
                    self._shut()
                    return
                self._sock.sendall(reply if isinstance(reply, bytes) else self._conn.send(reply))

    def close(self) -> None:
        """Close the service's end: the client reads the end of the stream."""
        with self._send_lock:
            self._shut()

    def stop(self) -> None:
        """Close both ends and wait for the serving thread (the test's end of the fake)."""
        self.close()
        self.client_socket.close()
        self._thread.join(5)
        assert not self._thread.is_alive(), "the fake service's thread did not end"

    def __enter__(self) -> FakeService:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- the serving thread ---------------------------------------------------------------

    def _shut(self, *, by_service: bool = True) -> None:
        self.closed_by_service = self.closed_by_service or by_service
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _serve(self) -> None:
        while True:
            try:
                event = self._conn.next_event()
            except RemoteProtocolError as exc:
                self.protocol_error = exc
                self._shut(by_service=False)  # the client's fault: a lock server frees its locks at once
                if self._on_end is not None:
                    self._on_end(False)
                return
            if isinstance(event, NeedData):
                try:
                    data = self._sock.recv(65536)
                except OSError:
                    data = b""
                self._conn.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                if not self.closed_by_service:
                    self.closed_by_client.set()
                if self._on_end is not None:
                    self._on_end(self.closed_by_service)
                return
            if isinstance(event, Hello):
                self.hello = event
                self.send(*self._greeting(event))
            elif isinstance(event, Settings):  # part of the greeting (version 3), unanswered
                self.settings = event
            elif isinstance(event, Message):
                self.received.append(event)
                if self._answer is None:
                    self._requests.put(event)
                else:
                    self.send(*self._answer(event))


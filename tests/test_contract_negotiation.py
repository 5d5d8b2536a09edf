"""Contract: version negotiation and bad input between peers of different ages, never a crash.

Against a real daemon (``jdls -ib``), in raw bytes over TCP:

- a Hello offering only versions the daemon does not speak (below its minimum, above its
  maximum) is answered with an Error (code VERSION) naming both ranges, and the connection
  is closed; the daemon goes on serving other clients;
- a Hello of an older client (a range reaching below the daemon's) or of a newer one (a
  range reaching above) is answered with Welcome and the highest common version;
- a client of an older version (today's 3, or 2) is served in that version as before: its Lock is
  answered with Granted, never with a message a later version added (Acquired);
- a client of version 4 gets Acquired (with a fencing token); a request kind of version 4 (Convert) sent in a
  conversation of version 3 is unknown there (Error UNKNOWN_MESSAGE), and the conversation goes on;
- after Welcome, a frame of a kind the daemon does not know is answered with Error
  (UNKNOWN_MESSAGE, same request id) and the conversation goes on (an Echo is answered);
- a frame that breaks the protocol (a reply kind sent by a client, a frame longer than
  the limit, a wrong frame version, a body whose fields do not add up, bytes that are
  not dls at all) is answered with Error (PROTOCOL) and the connection closed, while the
  daemon and the other clients (a dls_client.Client holding a lock all along) carry on.

And the client side, against a fake server (a plain socket in a thread): a server that
answers Hello with an unknown kind, an Error, a version the client did not offer, garbage,
or nothing but a close makes dls_client raise ServiceUnavailable with a clear message,
promptly.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dls_client import Client, Config, LockRefused, Server, ServiceUnavailable
from dls_proto import (
    FRAME_VERSION,
    PROTOCOL_VERSIONS,
    Acquired,
    ConnectionClosed,
    Convert,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Granted,
    Hello,
    Kind,
    Lock,
    LockFlag,
    Mode,
    NeedData,
    RemoteProtocolError,
    Role,
    Unlock,
    Welcome,
    choose_version,
    encode,
)
from dls_proto import Connection as ProtoConnection
from dls_testkit import Service, client_for, data_file

pytestmark = pytest.mark.slow

LOW, HIGH = PROTOCOL_VERSIONS
#: A kind byte no version of the protocol uses.
UNKNOWN_KIND = 0x7E
HEADER = struct.Struct(">IBBHI")


def hello(min_version: int, max_version: int, rid: int = 1) -> Hello:
    return Hello(rid, min_version, max_version, 0, 40000 + min_version, 4321, 99, "contract-host", "contract-test")


def frame(kind: int, body: bytes, rid: int = 5, version: int = FRAME_VERSION, length: int | None = None) -> bytes:
    return HEADER.pack(len(body) if length is None else length, version, kind, 0, rid) + body


class Raw:
    """A client socket speaking bytes; what comes back is decoded by a client-side Connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = ProtoConnection(Role.CLIENT)

    def send_hello(self, message: Hello) -> None:
        self.sock.sendall(self.conn.send(message))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def event(self) -> object:
        """The next event from the daemon (ConnectionClosed at its end)."""
        while True:
            event = self.conn.next_event()
            if not isinstance(event, NeedData):
                return event
            self.conn.receive_data(self.sock.recv(65536))

    def closed_by_peer(self) -> bool:
        """The daemon closed: EOF (or a reset) with nothing more to read."""
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def witness(daemon: Service, tmp_path: Path) -> Iterator[tuple[Client, Path]]:
    """A client holding a lock across the test: the daemon must serve it before and after."""
    client = client_for(daemon)
    data = data_file(tmp_path)
    held = client.lock(data, "WITNESS", timeout=10)
    listener = daemon.pid("listener")
    yield client, data
    assert daemon.pid("listener") == listener, "the listener changed during the test"
    assert client.echo(b"still there")[0] == b"still there"
    other = client_for(daemon)
    try:
        with pytest.raises(LockRefused):
            other.try_lock(data, "WITNESS").release()  # still held by the witness
        held.release()  # an Unlock is not answered: the other lock server may see it a moment later
        other.lock(data, "WITNESS", timeout=5).release()
        assert other.echo(b"new client")[0] == b"new client"
    finally:
        other.close()
        client.close()


def welcome_for(daemon: Service, offer: tuple[int, int]) -> tuple[Raw, Welcome]:
    raw = Raw(daemon.port)
    raw.send_hello(hello(*offer))
    event = raw.event()
    assert isinstance(event, Welcome), f"Hello {offer} answered with {event!r}"
    return raw, event


# -- versions -------------------------------------------------------------------------------


@pytest.mark.parametrize("offer", [(0, LOW - 1), (HIGH + 1, HIGH + 5), (200, 255)],
                         ids=["below", "above", "far-above"])
def test_hello_without_a_common_version_gets_an_error_and_a_close(
    daemon: Service, witness: object, offer: tuple[int, int]
) -> None:
    assert choose_version(hello(*offer)) is None
    raw = Raw(daemon.port)
    try:
        raw.send_hello(hello(*offer, rid=77))
        event = raw.event()
        assert isinstance(event, Error), f"Hello {offer} answered with {event!r}"
        assert event.request_id == 77
        assert event.code == ErrorCode.VERSION
        assert f"{offer[0]}..{offer[1]}" in event.reason, event.reason
        assert f"{LOW}..{HIGH}" in event.reason, event.reason
        assert raw.closed_by_peer(), "the daemon kept the connection open after refusing the Hello"
    finally:
        raw.close()


@pytest.mark.parametrize("offer", [(0, HIGH), (LOW, HIGH), (LOW, HIGH + 3), (0, 255)],
                         ids=["older", "same", "newer", "widest"])
def test_hello_with_a_common_version_gets_welcome_with_the_highest(
    daemon: Service, witness: object, offer: tuple[int, int]
) -> None:
    raw, welcome = welcome_for(daemon, offer)
    try:
        assert welcome.version == HIGH == choose_version(hello(*offer))
        assert welcome.request_id == 1
        assert raw.conn.version == HIGH
        raw.send(encode(Echo(2, b"ping")))
        assert raw.event() == EchoReply(2, b"ping")
    finally:
        raw.close()


@pytest.mark.parametrize("version", range(LOW, HIGH), ids=lambda v: f"version-{v}")
def test_a_client_of_an_older_version_is_served_in_it(
    daemon: Service, witness: object, tmp_path: Path, version: int
) -> None:
    """A client that speaks at most ``version`` (3: today's clients) gets that version, and its lock as before:
    a Granted, nothing of a later version (its Connection would read an Acquired as an UnknownMessage)."""
    raw, welcome = welcome_for(daemon, (LOW, version))
    try:
        assert welcome.version == version == raw.conn.version
        data = data_file(tmp_path)
        lock = Lock(2, Mode.EX, LockFlag.NO_INTERIM, 0, 1, data.stat().st_ino, -1, b"OLD", str(data))
        raw.send(raw.conn.send(lock))
        granted = raw.event()
        assert type(granted) is Granted and granted.request_id == 2 and granted.mode == Mode.EX, granted
        raw.send(raw.conn.send(Unlock(3, granted.handle)) + raw.conn.send(Echo(4, b"after")))
        assert raw.event() == EchoReply(4, b"after")  # the Unlock is answered only when it fails
    finally:
        raw.close()


def test_a_client_of_version_4_gets_acquired_and_an_older_one_no_version_4_request(
    daemon: Service, witness: object, tmp_path: Path
) -> None:
    """Version 4 answers a Lock with Acquired (a fencing token); in a conversation of version 3 a request kind of
    version 4 (Convert) is unknown: Error UNKNOWN_MESSAGE, and the conversation goes on as before."""
    data = data_file(tmp_path)
    raw, welcome = welcome_for(daemon, (LOW, 4))
    try:
        assert welcome.version == 4
        raw.send(raw.conn.send(Lock(2, Mode.EX, LockFlag.NO_INTERIM, 0, 1, data.stat().st_ino, -1, b"NEW", str(data))))
        acquired = raw.event()
        assert type(acquired) is Acquired and acquired.request_id == 2 and acquired.token > 0, acquired
        raw.send(raw.conn.send(Unlock(3, acquired.handle)))
    finally:
        raw.close()
    raw, welcome = welcome_for(daemon, (LOW, 3))
    try:
        assert welcome.version == 3
        convert = Convert(5, 1, Mode.PR, 0, 0, 0, b"")
        raw.send(encode(convert))  # encoded outside the conversation: its Connection would refuse it
        event = raw.event()
        assert isinstance(event, Error) and event.code == ErrorCode.UNKNOWN_MESSAGE and event.request_id == 5, event
        assert event.reason == "message kind 0x19 needs protocol version 4; this conversation speaks version 3"
        raw.send(encode(Echo(6, b"after")))
        assert raw.event() == EchoReply(6, b"after")
    finally:
        raw.close()


# -- unknown and broken frames ------------------------------------------------------------------


def test_unknown_kind_is_answered_with_an_error_and_the_conversation_goes_on(
    daemon: Service, witness: object
) -> None:
    raw, _welcome = welcome_for(daemon, (LOW, HIGH))
    try:
        assert UNKNOWN_KIND not in {int(k) for k in Kind}
        raw.send(frame(UNKNOWN_KIND, b"a future request", rid=31))
        event = raw.event()
        assert isinstance(event, Error), event
        assert event.request_id == 31
        assert event.code == ErrorCode.UNKNOWN_MESSAGE
        assert "0x7e" in event.reason
        # An empty body, and two unknown frames in one segment with an Echo between them.
        raw.send(frame(UNKNOWN_KIND, b"", rid=32) + encode(Echo(33, b"between")) + frame(0xEE, b"x" * 100, rid=34))
        assert raw.event() == Error(32, ErrorCode.UNKNOWN_MESSAGE, "message kind 0x7e is not known to this server")
        assert raw.event() == EchoReply(33, b"between")
        last = raw.event()
        assert isinstance(last, Error) and last.request_id == 34 and last.code == ErrorCode.UNKNOWN_MESSAGE
        raw.send(encode(Echo(35, b"after")))
        assert raw.event() == EchoReply(35, b"after")
    finally:
        raw.close()


BROKEN_AFTER_WELCOME: dict[str, Callable[[int], bytes]] = {
    # A reply kind, known to the daemon, that a client may not send.
    "reply-kind-from-client": lambda limit: frame(Kind.GRANTED, bytes(13)),
    "longer-than-the-limit": lambda limit: frame(Kind.ECHO, b"", length=limit + 1),
    "huge-length": lambda limit: frame(Kind.ECHO, b"", length=0xFFFFFFFF),
    "wrong-frame-version": lambda limit: frame(Kind.ECHO, b"\x00\x00", version=FRAME_VERSION + 1),
    "fields-do-not-add-up": lambda limit: frame(Kind.ECHO, b"\x00\x0a" + b"abc"),
    "body-too-short": lambda limit: frame(Kind.UNLOCK, b"\x00\x01"),
    "hello-again": lambda limit: encode(hello(LOW, HIGH, rid=9)),
}


@pytest.mark.parametrize("case", list(BROKEN_AFTER_WELCOME))
def test_broken_frame_after_welcome_gets_an_error_and_a_close(daemon: Service, witness: object, case: str) -> None:
    raw, welcome = welcome_for(daemon, (LOW, HIGH))
    try:
        raw.send(BROKEN_AFTER_WELCOME[case](welcome.max_frame))
        event = raw.event()
        assert isinstance(event, Error), f"{case}: answered with {event!r}"
        assert event.code == ErrorCode.PROTOCOL
        assert event.reason
        assert raw.closed_by_peer(), f"{case}: the daemon kept the connection open"
    finally:
        raw.close()


BROKEN_BEFORE_HELLO = {
    "http": b"GET / HTTP/1.1\r\nHost: lockhost\r\n\r\n",
    "bad-magic": frame(Kind.HELLO, b"JDLS" + encode(hello(LOW, HIGH))[16:]),
    "welcome-from-client": encode(Welcome(1, HIGH, 1, 0, 1, 65536, 0, "x", "y")),
    "unknown-kind-first": frame(UNKNOWN_KIND, b"hello?"),
    "hello-fields-do-not-add-up": encode(hello(LOW, HIGH))[:-3],
}


@pytest.mark.parametrize("case", list(BROKEN_BEFORE_HELLO))
def test_garbage_instead_of_hello_gets_an_error_and_a_close(daemon: Service, witness: object, case: str) -> None:
    data = BROKEN_BEFORE_HELLO[case]
    if case == "hello-fields-do-not-add-up":  # a complete frame whose header claims the cut length
        data = HEADER.pack(len(data) - 12, FRAME_VERSION, Kind.HELLO, 0, 1) + data[12:]
    raw = Raw(daemon.port)
    raw.conn.send(hello(LOW, HIGH))  # not sent: only so that our side expects Welcome or Error
    try:
        raw.send(data)
        try:
            event = raw.event()
        except RemoteProtocolError as exc:  # our client Connection refuses to read before sending Hello
            pytest.fail(f"{case}: {exc}")
        assert isinstance(event, Error), f"{case}: answered with {event!r}"
        assert event.code == ErrorCode.PROTOCOL
        assert raw.closed_by_peer(), f"{case}: the daemon kept the connection open"
    finally:
        raw.close()


def test_close_in_the_middle_of_a_frame_is_harmless(daemon: Service, witness: object) -> None:
    raw, _welcome = welcome_for(daemon, (LOW, HIGH))
    raw.send(encode(Echo(3, b"cut short"))[:-4])
    raw.sock.shutdown(socket.SHUT_WR)
    event = raw.event()  # an Error, or a plain close: either way the daemon lets go
    assert isinstance(event, (Error, ConnectionClosed)), event
    raw.close()


# -- the client against a server that says the wrong thing ----------------------------------------


class FakeServer:
    """Accepts one connection, reads the Hello, answers with ``reply`` (bytes) and closes."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.hello: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
            with sock:
                sock.settimeout(10)
                conn = ProtoConnection(Role.SERVER)
                while True:
                    event = conn.next_event()
                    if not isinstance(event, NeedData):
                        break
                    conn.receive_data(sock.recv(65536))
                self.hello = event
                if self.reply:
                    sock.sendall(self.reply)
                time.sleep(0.2)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.listener.close()

    def join(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive()
        assert self.error is None, f"fake server: {self.error!r}"


FAKE_REPLIES = {
    "unknown-kind": (frame(UNKNOWN_KIND, b"\x01\x02", rid=0), "kind 0x7e"),
    "version-error": (encode(Error(0, ErrorCode.VERSION, "client speaks versions 1..1, server speaks 7..9")),
                      "refused the connection: client speaks versions 1..1, server speaks 7..9"),
    "unoffered-version": (encode(Welcome(0, HIGH + 1, 1, 0, 1, 65536, 0, "127.0.0.1", "fake")),
                          f"version {HIGH + 1}"),
    "reply-instead-of-welcome": (encode(EchoReply(0, b"hi")), "kind 0x25"),
    "garbage": (b"HTTP/1.1 400 Bad Request\r\n\r\n", "bad data"),
    "close": (None, "closed the connection"),
}


@pytest.mark.parametrize("case", list(FAKE_REPLIES))
def test_client_gets_service_unavailable_from_a_server_that_answers_hello_wrongly(case: str) -> None:
    reply, expected = FAKE_REPLIES[case]
    fake = FakeServer(reply)
    client = Client(Config(server=Server("127.0.0.1", fake.port), timeout=5))
    start = time.monotonic()
    with pytest.raises(ServiceUnavailable) as raised:
        client.echo(b"x")
    took = time.monotonic() - start
    client.close()
    fake.join()
    assert took < 3, f"{case}: the client took {took:.1f} s to give up"
    message = str(raised.value)
    assert expected in message, f"{case}: unclear message {message!r}"
    assert "127.0.0.1" in message or str(fake.port) in message, message
    hello_received = fake.hello
    assert isinstance(hello_received, Hello), hello_received
    assert (hello_received.min_version, hello_received.max_version) == PROTOCOL_VERSIONS

"""The sans-IO connection: who speaks first, the greeting, framing, limits and malformed input."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import dls_proto
import pytest
from dls_proto import (
    DEFAULT_MAX_FRAME,
    MAX_VALUE_BLOCK,
    NEED_DATA,
    PROTOCOL_VERSIONS,
    Acquired,
    Blocking,
    BlockStatus,
    Cancel,
    Connection,
    ConnectionClosed,
    Convert,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Granted,
    Hello,
    InfoGet,
    InfoPut,
    InfoSnapshot,
    Kind,
    LocalProtocolError,
    Lock,
    LockFlag,
    Mode,
    ProtocolError,
    Refused,
    Release,
    RemoteProtocolError,
    Role,
    Settings,
    State,
    Status,
    StatusReply,
    UnknownMessage,
    Unlock,
    UnlockAll,
    Unlocked,
    ValueFlag,
    Waiting,
    Welcome,
    choose_version,
    encode,
)
from hypothesis import given, settings
from hypothesis import strategies as st

KIND_OF = dls_proto.codec.KINDS
HELLO = Hello(0, 2, 2, 0, 7001, 4242, 1, "client-host", "jsh")
WELCOME = Welcome(0, 2, 1, 0, 99, DEFAULT_MAX_FRAME, 10000, "127.0.0.1", "server-host")
LOCK = Lock(1, 5, 0, 1000, 1, 42, 7, b"CUST*1", "/data/CUST")
GRANTED = Granted(1, 0x100000003, 5, 12345)

REQUESTS = [
    LOCK,
    Unlock(2, 0x100000003),
    UnlockAll(3, 1),
    Status(4, 1, 42, 7, b"CUST*1"),
    InfoPut(5, b"{}"),
    InfoGet(6, 0),
    Echo(7, b"ping"),
]
REPLIES = [
    GRANTED,
    Refused(1, 1, 5, 10, 7002, 11, 2, "10.0.0.1"),
    Waiting(1, 500, 5, 10, 7002, 11, 2, "10.0.0.1"),
    StatusReply(4, 2, 5, 10, 7002, 11, 2, "10.0.0.1"),
    InfoSnapshot(6, b"{}"),
    EchoReply(7, b"ping"),
    Unlocked(3, 2),
    Error(2, ErrorCode.NOT_HELD, "not held"),
]
UNKNOWN_KIND = 0x7E


def name(event: Any) -> str:
    return type(event).__name__


def frame(kind: int, body: bytes = b"", rid: int = 0, *, version: int = 1, length: int | None = None) -> bytes:
    """A frame built by hand, so that it can break the rules."""
    return struct.pack(">IBBHI", len(body) if length is None else length, version, kind, 0, rid) + body


def open_pair(*, max_frame: int = DEFAULT_MAX_FRAME) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, max_frame=max_frame)
    server = Connection(Role.SERVER, max_frame=max_frame)
    server.receive_data(client.send(HELLO))
    assert server.next_event() == HELLO
    client.receive_data(server.send(WELCOME))
    assert client.next_event() == WELCOME
    return client, server


def drain(conn: Connection) -> list[Any]:
    events = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


# -- who speaks first --------------------------------------------------------------------------------


@pytest.mark.parametrize("event", [*REQUESTS, WELCOME, *REPLIES], ids=name)
def test_client_must_send_hello_first(event: Any) -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="may not send"):
        client.send(event)
    assert client.state is State.OPENING
    assert client.send(HELLO) == encode(HELLO)
    assert client.state is State.GREETING


@pytest.mark.parametrize("event", [*REQUESTS, HELLO], ids=name)
def test_client_may_not_send_before_welcome(event: Any) -> None:
    client = Connection(Role.CLIENT)
    client.send(HELLO)
    with pytest.raises(LocalProtocolError):
        client.send(event)


@pytest.mark.parametrize("event", [*REQUESTS, WELCOME, *REPLIES], ids=name)
def test_server_receiving_anything_but_hello_first(event: Any) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode(event))
    with pytest.raises(RemoteProtocolError, match="Hello"):
        server.next_event()


def test_server_receiving_an_unknown_kind_first() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame(UNKNOWN_KIND, b"xyz"))
    with pytest.raises(RemoteProtocolError, match="0x7e"):
        server.next_event()


@pytest.mark.parametrize("event", [WELCOME, *REPLIES[:-1]], ids=name)
def test_server_may_not_speak_before_hello(event: Any) -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send(event)
    assert server.state is State.OPENING


def test_server_may_refuse_before_hello_and_is_then_closed() -> None:
    server = Connection(Role.SERVER)
    data = server.send(Error(0, ErrorCode.LIMIT, "too many clients"))
    assert data == encode(Error(0, ErrorCode.LIMIT, "too many clients"))
    assert server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.send(WELCOME)


def test_client_rejects_a_welcome_it_did_not_ask_for() -> None:
    """A server may speak only after the client's Hello: a Welcome before it breaks the protocol."""
    client = Connection(Role.CLIENT)
    client.receive_data(encode(WELCOME))
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    # ... and in no case may the client then skip its Hello.
    with pytest.raises(LocalProtocolError):
        client.send(LOCK)


def test_server_rejects_requests_pipelined_behind_hello() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode(HELLO) + encode(LOCK))
    assert server.next_event() == HELLO
    with pytest.raises(RemoteProtocolError):
        server.next_event()


# -- the greeting and version negotiation --------------------------------------------------------------


def test_full_greeting_then_requests_and_replies() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    assert (client.state, server.state) == (State.OPENING, State.OPENING)
    assert client.version is None and server.version is None

    server.receive_data(client.send(HELLO))
    assert client.state is State.GREETING
    hello = server.next_event()
    assert hello == HELLO
    assert server.state is State.GREETING
    assert server.next_event() is NEED_DATA

    assert isinstance(hello, Hello)
    version = choose_version(hello)
    assert version == 2
    welcome = WELCOME._replace(version=version)
    client.receive_data(server.send(welcome))
    assert server.state is State.READY and server.version == 2
    assert client.next_event() == welcome
    assert client.state is State.READY and client.version == 2

    for request in REQUESTS:
        server.receive_data(client.send(request))
        assert server.next_event() == request
    for reply in REPLIES:
        client.receive_data(server.send(reply))
        assert client.next_event() == reply
    # the greeting messages are over once the conversation is open
    with pytest.raises(LocalProtocolError):
        client.send(HELLO)
    with pytest.raises(LocalProtocolError):
        server.send(WELCOME)
    with pytest.raises(LocalProtocolError):
        client.send(GRANTED)
    with pytest.raises(LocalProtocolError):
        server.send(LOCK)
    # an Error reply does not end an open conversation
    server.send(Error(9, ErrorCode.BAD_REQUEST, "no"))
    assert server.state is State.READY


@pytest.mark.parametrize(
    ("offered", "supported", "chosen"),
    [
        ((1, 1), (1, 1), 1),
        ((1, 3), (1, 1), 1),
        ((1, 3), (2, 5), 3),
        ((2, 7), (1, 4), 4),
        ((3, 3), (1, 5), 3),
        ((2, 3), (1, 1), None),
        ((1, 1), (2, 3), None),
        ((5, 9), (1, 4), None),
    ],
)
def test_choose_version(offered: tuple[int, int], supported: tuple[int, int], chosen: int | None) -> None:
    hello = HELLO._replace(min_version=offered[0], max_version=offered[1])
    assert choose_version(hello, supported) == chosen


def test_choose_version_defaults_to_this_package() -> None:
    assert choose_version(HELLO._replace(max_version=PROTOCOL_VERSIONS[1])) == PROTOCOL_VERSIONS[1]
    assert choose_version(HELLO) == 2  # a client of version 2 is spoken to in version 2
    too_new = HELLO._replace(min_version=PROTOCOL_VERSIONS[1] + 1, max_version=PROTOCOL_VERSIONS[1] + 5)
    assert choose_version(too_new) is None


def test_no_common_version_the_server_refuses_and_closes() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    too_new = HELLO._replace(min_version=PROTOCOL_VERSIONS[1] + 1, max_version=PROTOCOL_VERSIONS[1] + 2)
    server.receive_data(client.send(too_new))
    hello = server.next_event()
    assert isinstance(hello, Hello)
    assert choose_version(hello) is None
    refusal = Error(0, ErrorCode.VERSION, "this server speaks version 2 only")
    client.receive_data(server.send(refusal))
    assert server.state is State.CLOSED
    assert client.next_event() == refusal
    assert client.state is State.GREETING  # nothing is open
    with pytest.raises(LocalProtocolError):
        client.send(LOCK)
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()
    assert client.state is State.CLOSED


@pytest.mark.parametrize("version", [0, 1, 3, 255])
def test_client_rejects_a_version_it_did_not_offer(version: int) -> None:
    client = Connection(Role.CLIENT)
    client.send(HELLO)
    client.receive_data(encode(WELCOME._replace(version=version)))
    with pytest.raises(RemoteProtocolError, match=f"version {version}"):
        client.next_event()


# -- framing -------------------------------------------------------------------------------------------


def test_frames_split_byte_by_byte() -> None:
    client, server = open_pair()
    stream = b"".join(encode(r) for r in REQUESTS)
    events = []
    for i in range(len(stream)):
        server.receive_data(stream[i : i + 1])
        events.extend(drain(server))
        assert server.buffered < 64
    assert events == REQUESTS
    assert server.buffered == 0

    stream = b"".join(encode(r) for r in REPLIES)
    events = []
    for i in range(len(stream)):
        client.receive_data(stream[i : i + 1])
        events.extend(drain(client))
    assert events == REPLIES


def test_greeting_split_byte_by_byte() -> None:
    server = Connection(Role.SERVER)
    data = encode(HELLO)
    for b in data[:-1]:
        server.receive_data(bytes([b]))
        assert server.next_event() is NEED_DATA
        assert server.state is State.OPENING
    server.receive_data(data[-1:])
    assert server.next_event() == HELLO


def test_several_frames_in_one_chunk() -> None:
    _client, server = open_pair()
    stream = b"".join(encode(r) for r in REQUESTS)
    server.receive_data(stream + encode(LOCK)[:5])
    assert drain(server) == REQUESTS
    assert server.buffered == 5
    server.receive_data(encode(LOCK)[5:] + encode(LOCK))
    assert drain(server) == [LOCK, LOCK]
    assert server.buffered == 0


@given(cuts=st.lists(st.integers(0, 400), max_size=12))
@settings(max_examples=100, deadline=None)
def test_any_split_decodes_the_same(cuts: list[int]) -> None:
    _client, server = open_pair()
    stream = b"".join(encode(r) for r in REQUESTS)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    events = []
    for start, end in itertools.pairwise(bounds):
        server.receive_data(stream[start:end])
        events.extend(drain(server))
    assert events == REQUESTS


# -- limits and malformed frames -------------------------------------------------------------------------


def test_frame_over_max_frame_is_refused_from_its_header() -> None:
    _client, server = open_pair()
    server.receive_data(frame(Kind.ECHO, length=70000)[:12])  # the header alone is enough
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert "70000" in str(info.value)
    assert str(DEFAULT_MAX_FRAME) in str(info.value)


def test_max_frame_boundary() -> None:
    _client, server = open_pair(max_frame=100)
    at_limit = Echo(1, b"x" * 98)  # body 2 + 98 = 100
    server.receive_data(encode(at_limit))
    assert server.next_event() == at_limit
    server.receive_data(encode(Echo(2, b"x" * 99)))
    with pytest.raises(RemoteProtocolError, match=r"101 bytes.*limit of 100"):
        server.next_event()


def test_client_limits_what_the_server_sends() -> None:
    client, _server = open_pair(max_frame=50)
    client.receive_data(encode(InfoSnapshot(1, b"{" + b" " * 60 + b"}")))
    with pytest.raises(RemoteProtocolError, match="limit of 50"):
        client.next_event()


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_frame_version(version: int) -> None:
    server = Connection(Role.SERVER)
    data = bytearray(encode(HELLO))
    data[4] = version
    server.receive_data(bytes(data))
    with pytest.raises(RemoteProtocolError, match=f"frame version {version}"):
        server.next_event()


@pytest.mark.parametrize("side", ["opening", "ready"])
@given(garbage=st.binary(min_size=1, max_size=300))
@settings(max_examples=200, deadline=None)
def test_random_garbage(side: str, garbage: bytes) -> None:
    """Garbage yields events, NEED_DATA or RemoteProtocolError, nothing else, and never hangs."""
    server = Connection(Role.SERVER) if side == "opening" else open_pair()[1]
    server.receive_data(garbage)
    try:
        for _ in range(len(garbage)):
            event = server.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(event, (Hello, UnknownMessage, *(type(r) for r in REQUESTS)))
        server.receive_data(b"")
        while not isinstance(server.next_event(), ConnectionClosed):
            pass
    except RemoteProtocolError:
        pass


@given(garbage=st.binary(min_size=1, max_size=300))
@settings(max_examples=200, deadline=None)
def test_random_garbage_to_a_client(garbage: bytes) -> None:
    client, _server = open_pair()
    client.receive_data(garbage)
    try:
        for _ in range(len(garbage)):
            if client.next_event() is NEED_DATA:
                break
    except RemoteProtocolError:
        pass


def test_garbage_that_looks_like_text_is_refused() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        server.next_event()


@pytest.mark.parametrize("cut", [1, 5, 11, 12, 13, 30])
def test_half_a_frame_then_eof(cut: int) -> None:
    _client, server = open_pair()
    data = encode(LOCK)
    assert cut < len(data)
    server.receive_data(data[:cut])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=f"{cut} bytes pending"):
        server.next_event()


def test_clean_eof() -> None:
    client, server = open_pair()
    server.receive_data(encode(LOCK))
    server.receive_data(b"")
    assert server.next_event() == LOCK
    assert server.next_event() == ConnectionClosed()
    assert server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")
    fresh = Connection(Role.SERVER)
    fresh.receive_data(b"")
    assert fresh.next_event() == ConnectionClosed()
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed()


def test_unknown_kind_when_ready_is_skipped() -> None:
    client, server = open_pair()
    server.receive_data(frame(UNKNOWN_KIND, b"future stuff", rid=77) + frame(0x1F, rid=78) + encode(LOCK))
    assert server.next_event() == UnknownMessage(77, UNKNOWN_KIND)
    assert server.next_event() == UnknownMessage(78, 0x1F)
    assert server.next_event() == LOCK
    assert server.state is State.READY
    client.receive_data(frame(0x3F, b"\x00" * 40, rid=5) + encode(GRANTED))
    assert client.next_event() == UnknownMessage(5, 0x3F)
    assert client.next_event() == GRANTED


def test_unknown_kind_split_across_chunks() -> None:
    _client, server = open_pair()
    data = frame(UNKNOWN_KIND, b"0123456789", rid=3) + encode(LOCK)
    server.receive_data(data[:15])
    assert server.next_event() is NEED_DATA
    server.receive_data(data[15:])
    assert drain(server) == [UnknownMessage(3, UNKNOWN_KIND), LOCK]


@pytest.mark.parametrize("event", [*REPLIES, HELLO, WELCOME], ids=name)
def test_server_receiving_a_reply_kind(event: Any) -> None:
    _client, server = open_pair()
    server.receive_data(encode(event))
    with pytest.raises(RemoteProtocolError, match="may not be sent by the client"):
        server.next_event()


@pytest.mark.parametrize("event", [*REQUESTS, HELLO, WELCOME], ids=name)
def test_client_receiving_a_request_kind(event: Any) -> None:
    client, _server = open_pair()
    client.receive_data(encode(event))
    with pytest.raises(RemoteProtocolError, match="may not be sent by the server"):
        client.next_event()


@pytest.mark.parametrize(
    "event",
    [
        LOCK._replace(mode=300),
        LOCK._replace(request_id=-1),
        LOCK._replace(request_id=1 << 32),
        LOCK._replace(timeout_ms=1 << 32),
        LOCK._replace(thread_id=1 << 64),
        LOCK._replace(device=1 << 63),
        LOCK._replace(key="text, not bytes"),
        LOCK._replace(path=b"bytes, not text"),
        LOCK._replace(path="\udc80"),  # a lone surrogate has no UTF-8 form
        Unlock(1, -1),
        UnlockAll(1, 1 << 64),
        Echo(1, b"x" * 65536),
    ],
    ids=lambda e: f"{name(e)}-{e!r:.60}",
)
def test_field_out_of_range_on_send(event: Any) -> None:
    client, _server = open_pair()
    with pytest.raises(LocalProtocolError, match=f"cannot encode {name(event)}"):
        client.send(event)
    assert client.state is State.READY


@pytest.mark.parametrize(
    "event",
    [HELLO._replace(host="h" * 256), HELLO._replace(program="\u00e9" * 128), HELLO._replace(pid=-5)],
    ids=["host", "program", "pid"],
)
def test_bad_hello_is_not_sent_and_leaves_the_state(event: Hello) -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(event)
    assert client.state is State.OPENING
    client.send(HELLO._replace(host="h" * 255))
    assert client.state is State.GREETING


def test_bad_utf8_in_a_text_field() -> None:
    client, server = open_pair()
    # Error: code 7, reason_len 2, reason ff fe
    client.receive_data(frame(Kind.ERROR, bytes.fromhex("0007 0002 fffe"), rid=4))
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        client.next_event()
    good = encode(LOCK._replace(path="ab"))
    bad = good[:-2] + b"\xc3\x28"
    server.receive_data(bad)
    with pytest.raises(RemoteProtocolError, match="LOCK with text that is not UTF-8"):
        server.next_event()


def test_bad_utf8_in_hello() -> None:
    server = Connection(Role.SERVER)
    data = encode(HELLO._replace(host="abc"))
    start = data.index(b"abc")
    server.receive_data(data[:start] + b"a\xffc" + data[start + 3 :])
    with pytest.raises(RemoteProtocolError, match="UTF-8"):
        server.next_event()


def test_lock_key_longer_than_65535() -> None:
    client, _server = open_pair()
    with pytest.raises(LocalProtocolError, match="cannot encode Lock"):
        client.send(LOCK._replace(key=b"k" * 65536))
    assert len(client.send(LOCK._replace(key=b"k" * 65535))) > 65535


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        (Kind.UNLOCK, b"\x00" * 7, "at least 8"),
        (Kind.UNLOCK, b"\x00" * 9, "8 expected"),
        (Kind.UNLOCK_ALL, b"", "at least 8"),
        (Kind.ECHO, bytes.fromhex("000a") + b"short", "do not add up"),
        (Kind.ECHO, bytes.fromhex("0001") + b"long", "do not add up"),
        (Kind.LOCK, b"\x05" * 10, "at least"),
    ],
)
def test_malformed_request_bodies(kind: int, body: bytes, message: str) -> None:
    _client, server = open_pair()
    server.receive_data(frame(kind, body))
    with pytest.raises(RemoteProtocolError, match=message):
        server.next_event()


def test_hello_with_bad_magic() -> None:
    server = Connection(Role.SERVER)
    data = encode(HELLO).replace(b"jDLS", b"HTTP")
    server.receive_data(data)
    with pytest.raises(RemoteProtocolError, match="magic"):
        server.next_event()


def test_error_classes() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


def _opened(version: int) -> tuple[Connection, Connection]:
    """A client and a server Connection whose conversation is open in protocol ``version``."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(HELLO._replace(max_version=PROTOCOL_VERSIONS[1])))
    assert isinstance(server.next_event(), Hello)
    client.receive_data(server.send(WELCOME._replace(version=version)))
    assert isinstance(client.next_event(), Welcome)
    return client, server


def test_settings_travel_in_version_3() -> None:
    client, server = _opened(3)
    told = Settings(5, 0, 2000)
    server.receive_data(client.send(told))
    assert server.next_event() == told


def test_settings_are_not_sent_in_version_2_and_are_unknown_there() -> None:
    """A conversation of version 2 goes as it did before version 3 existed: the client may not send Settings,
    and a server receiving its kind takes it as a kind it does not know (as a version-2 server did)."""
    client, server = _opened(2)
    with pytest.raises(LocalProtocolError, match="Settings"):
        client.send(Settings(5, 0, 2000))
    server.receive_data(encode(Settings(5, 0, 2000)))
    assert server.next_event() == UnknownMessage(5, int(Kind.SETTINGS))


# -- the lock path's encoders, checked once ---------------------------------------------------------------


def test_an_encoder_and_a_packer_make_the_frames_send_makes() -> None:
    """A client's lock path encodes its Locks and packs its Unlocks without ``send``'s checks at every message:
    the same bytes, and the server reads them as the same messages."""
    client, server = open_pair()
    unlock = Unlock(2, 0x100000003)
    lock_frame, unlock_frame = client.encoder(Lock)(LOCK), client.packer(Unlock)(*unlock)
    assert (lock_frame, unlock_frame) == (encode(LOCK), encode(unlock))
    server.receive_data(lock_frame + unlock_frame)
    assert drain(server) == [LOCK, unlock]


def test_an_encoder_only_for_what_this_side_may_send_once_open() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="may not send Lock in state opening"):
        client.encoder(Lock)  # before the greeting: every message goes through send's checks
    client, server = open_pair()
    with pytest.raises(LocalProtocolError, match="the client may not send Granted"):
        client.encoder(Granted)
    with pytest.raises(LocalProtocolError, match="the server may not send Unlock"):
        server.packer(Unlock)
    with pytest.raises(TypeError, match="Lock has fields that are not numbers"):
        client.packer(Lock)  # a key and a path: only its encoder makes its frame


def test_decoded_messages_are_the_message_classes() -> None:
    """The decoders make their tuples directly (not through the classes' own __new__): still the classes."""
    client, server = open_pair()
    client.receive_data(server.send(GRANTED))
    (granted,) = drain(client)
    assert type(granted) is Granted and granted == GRANTED and granted.handle == GRANTED.handle


# -- version 4: conversions, value blocks, fencing tokens, cancel, blocking notices -------------------------

CONVERT = Convert(21, 0x100000003, Mode.PR, LockFlag.VALUE_BLOCK | LockFlag.NOTIFY, ValueFlag.WRITE, 0, b"v" * 64)
RELEASE = Release(22, 0x100000003, ValueFlag.INVALIDATE, b"")
CANCEL = Cancel(23, 21)
ACQUIRED = Acquired(21, 0x100000003, Mode.PR, 12345, 1 << 40, BlockStatus.NOT_VALID, b"v" * 64)
BLOCKING = Blocking(1, 0x100000003, Mode.EX)
V4_REQUESTS = [CONVERT, RELEASE, CANCEL]
V4_REPLIES = [ACQUIRED, BLOCKING]


def _greeted(client_versions: tuple[int, int], server_versions: tuple[int, int]) -> tuple[Connection, Connection]:
    """A client offering ``client_versions`` and a server speaking ``server_versions`` (both sides this
    package's Connection: an older peer is one whose Hello offers, or whose Welcome chooses, no more)."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    hello = HELLO._replace(min_version=client_versions[0], max_version=client_versions[1])
    server.receive_data(client.send(hello))
    assert server.next_event() == hello
    version = choose_version(hello, server_versions)
    assert version is not None
    client.receive_data(server.send(WELCOME._replace(version=version)))
    assert isinstance(client.next_event(), Welcome)
    assert client.version == server.version == version
    return client, server


def test_version_4_is_spoken_and_2_and_3_still_are() -> None:
    assert PROTOCOL_VERSIONS == (2, 4)
    for version in (2, 3, 4):
        client, _server = _greeted((version, version), PROTOCOL_VERSIONS)
        assert client.version == version


@pytest.mark.parametrize("event", V4_REQUESTS, ids=name)
def test_version_4_requests_travel_in_version_4(event: Any) -> None:
    client, server = _greeted(PROTOCOL_VERSIONS, PROTOCOL_VERSIONS)
    assert client.version == 4
    server.receive_data(client.send(event) + client.encoder(type(event))(event))
    assert drain(server) == [event, event]


@pytest.mark.parametrize("event", [*V4_REPLIES, GRANTED], ids=name)
def test_version_4_replies_travel_in_version_4(event: Any) -> None:
    """Acquired and Blocking; and Granted still (the answer to a Reclaim, and a lock server's until it
    answers a Lock with Acquired)."""
    client, server = _greeted(PROTOCOL_VERSIONS, PROTOCOL_VERSIONS)
    client.receive_data(server.send(event))
    assert drain(client) == [event]


@pytest.mark.parametrize("event", V4_REPLIES, ids=name)
def test_a_client_of_version_3_never_sees_acquired_or_blocking(event: Any) -> None:
    """A client of today (versions 2..3) against a server side of version 4: they agree on 3, the server may
    not send what version 4 added, and a client of version 3 takes such a kind as one it does not know."""
    client, server = _greeted((2, 3), PROTOCOL_VERSIONS)
    assert server.version == 3
    message = f"the client speaks protocol version 3: {name(event)} needs version 4"
    with pytest.raises(LocalProtocolError, match=message):
        server.send(event)
    with pytest.raises(LocalProtocolError, match=f"{name(event)} needs version 4"):
        server.encoder(type(event))
    client.receive_data(encode(event) + server.send(GRANTED))
    assert drain(client) == [UnknownMessage(event.request_id, int(KIND_OF[type(event)])), GRANTED]
    assert server.state is client.state is State.READY


@pytest.mark.parametrize("event", V4_REQUESTS, ids=name)
def test_a_client_of_version_4_against_a_server_of_version_3(event: Any) -> None:
    """A new client against today's service (versions 2..3): they agree on 3, and the client's Connection
    refuses Convert, Release and Cancel saying what the peer lacks (the client library tells its user the
    service lacks value blocks or conversions); a server of version 3 would not know their kinds."""
    client, server = _greeted(PROTOCOL_VERSIONS, (2, 3))
    assert client.version == 3
    message = f"the server speaks protocol version 3: {name(event)} needs version 4"
    with pytest.raises(LocalProtocolError, match=message):
        client.send(event)
    with pytest.raises(LocalProtocolError, match=message):
        client.encoder(type(event))
    server.receive_data(encode(event) + client.send(LOCK))
    assert drain(server) == [UnknownMessage(event.request_id, int(KIND_OF[type(event)])), LOCK]


def test_version_2_says_settings_needs_version_3() -> None:
    client, _server = _greeted((2, 2), PROTOCOL_VERSIONS)
    with pytest.raises(LocalProtocolError, match="the server speaks protocol version 2: Settings needs version 3"):
        client.send(Settings(5, 0, 2000))


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (CONVERT._replace(block=b"v" * (MAX_VALUE_BLOCK + 1)), "value block of 65 bytes, at most 64"),
        (CONVERT._replace(mode=6), "lock mode 6 is not one of 0..5"),
        (CONVERT._replace(value_flags=4), "value flags 0x04: bits 0x04 are not defined"),
        (CONVERT._replace(value_flags=0x83), "value flags 0x83: bits 0x80 are not defined"),
        (RELEASE._replace(block=b"v" * 255), "value block of 255 bytes, at most 64"),
        (RELEASE._replace(value_flags=8), "value flags 0x08"),
        (ACQUIRED._replace(block=b"v" * (MAX_VALUE_BLOCK + 1)), "value block of 65 bytes"),
    ],
    ids=lambda e: f"{e!r:.40}",
)
def test_version_4_bounds_on_send_and_on_receipt(event: Any, message: str) -> None:
    """What the fields' widths carry but the protocol does not allow: a LocalProtocolError to send (the
    encoder's, for a caller of ``encoder``, too), and a RemoteProtocolError naming it when a peer sends it."""
    client, server = _greeted(PROTOCOL_VERSIONS, PROTOCOL_VERSIONS)
    sender, receiver = (client, server) if type(event) in (Convert, Release) else (server, client)
    with pytest.raises(LocalProtocolError, match=f"cannot encode {name(event)}: {message}"):
        sender.send(event)
    with pytest.raises(LocalProtocolError, match=message):
        sender.encoder(type(event))(event)
    assert sender.state is State.READY
    spec = dls_proto.spec.DEFINITIONS[KIND_OF[type(event)]]
    fields = event._asdict()
    del fields["request_id"]
    body = spec.build(fields)  # the specification's bytes: the width allows them
    receiver.receive_data(frame(KIND_OF[type(event)], body, rid=event.request_id))
    with pytest.raises(RemoteProtocolError, match=f"{KIND_OF[type(event)].name}: {message}"):
        receiver.next_event()


def test_version_4_bounds_reach_their_limits() -> None:
    """A block of MAX_VALUE_BLOCK bytes, EX, and every value flag pass."""
    client, server = _greeted(PROTOCOL_VERSIONS, PROTOCOL_VERSIONS)
    most = CONVERT._replace(mode=Mode.EX, value_flags=ValueFlag.WRITE | ValueFlag.INVALIDATE)
    assert len(most.block) == MAX_VALUE_BLOCK
    server.receive_data(client.send(most) + client.send(RELEASE._replace(block=most.block)))
    assert drain(server) == [most, RELEASE._replace(block=most.block)]
    client.receive_data(server.send(ACQUIRED))
    assert drain(client) == [ACQUIRED]


def test_version_4_flags_and_constants() -> None:
    """The new LockFlag bits leave the old ones as they were, and fit Lock's (and Convert's) 8-bit flags."""
    assert [int(f) for f in (LockFlag.NO_INTERIM, LockFlag.OSLOCK, LockFlag.BINARY)] == [1, 2, 4]
    assert (int(LockFlag.VALUE_BLOCK), int(LockFlag.NOTIFY)) == (8, 16)
    assert (int(ValueFlag.NONE), int(ValueFlag.WRITE), int(ValueFlag.INVALIDATE)) == (0, 1, 2)
    assert [int(s) for s in BlockStatus] == [0, 1, 2]
    assert MAX_VALUE_BLOCK == 64
    client, server = _greeted(PROTOCOL_VERSIONS, PROTOCOL_VERSIONS)
    every = LOCK._replace(flags=int(LockFlag.NO_INTERIM | LockFlag.OSLOCK | LockFlag.BINARY | LockFlag.VALUE_BLOCK
                                    | LockFlag.NOTIFY))
    server.receive_data(client.send(every))
    assert drain(server) == [every]


def test_packer_refuses_a_bounded_message() -> None:
    client, _server = _greeted(PROTOCOL_VERSIONS, PROTOCOL_VERSIONS)
    with pytest.raises(TypeError, match="only its encoder"):
        client.packer(Convert)
    assert client.packer(Cancel)(*CANCEL) == encode(CANCEL)

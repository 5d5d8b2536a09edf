"""Golden bytes for every dls message, and the fast codec checked against the construct specification.

Each golden frame below was worked out by hand from the construct definitions in
``dls_proto.spec`` (network byte order): a 12-byte header ``>IBBHI`` (body
length, frame version 1, kind, reserved 0, request id), then the fixed part of
the body, then the variable fields in order. Spaces and ``|`` in the hex are for
the reader: the header is left of ``|``, and each field is its own group.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from typing import Any

import dls_proto
import pytest
from construct import Const, FormatField, Rebuild, Renamed, StringEncoded
from dls_proto import (
    ALL_THREADS,
    HEADER,
    HEADER_SIZE,
    MESSAGES,
    PROTOCOL_VERSIONS,
    Acquired,
    Blocking,
    Cancel,
    Connection,
    Convert,
    Echo,
    EchoReply,
    Error,
    Granted,
    Hello,
    InfoGet,
    InfoPut,
    InfoSnapshot,
    Lock,
    Reclaim,
    Refused,
    Release,
    Role,
    Settings,
    Status,
    StatusReply,
    Unlock,
    UnlockAll,
    Unlocked,
    Waiting,
    Welcome,
)
from dls_proto.codec import DECODERS, LAYOUTS
from dls_proto.messages import BOUNDS
from hypothesis import given, settings
from hypothesis import strategies as st

SPECS = {cls: (kind, spec) for kind, spec, cls in MESSAGES}

# (event, golden frame). One per message kind, in the order of MESSAGES.
GOLDEN: list[tuple[Any, str]] = [
    (
        Hello(request_id=1, min_version=1, max_version=1, flags=0, port=0x1234, pid=4321, thread_id=7,
              host="host1", program="jsh"),
        # length 34 = magic 4 + 1 + 1 + flags 2 + port 4 + pid 4 + thread 8 + host_len 1 + program_len 1 + 5 + 3
        "00000022 01 01 0000 00000001 |"
        " 6a444c53 01 01 0000 00001234 000010e1 0000000000000007 05 03"
        " 686f737431 6a7368",
    ),
    (
        Welcome(request_id=1, version=2, mechanism=1, flags=0, server_pid=999, max_frame=65536,
                lock_delay_ms=10000, peer="10.0.0.2", server_host="srv"),
        # length 29 = 1 + 1 + 2 + 4 + 4 + 4 + peer_len 1 + server_host_len 1 + 8 + 3
        "0000001d 01 02 0000 00000001 |"
        " 02 01 0000 000003e7 00010000 00002710 08 03"
        " 31302e302e302e32 737276",
    ),
    (
        Lock(request_id=2, mode=5, flags=1, timeout_ms=1500, thread_id=3, inode=0x0102030405060708, device=-2,
             key=b"CUST*1", path="/data/CUST"),
        # length 50 = 1 + 1 + 4 + 8 + 8 + 8 + key_len 2 + path_len 2 + 6 + 10; device is signed (-2)
        "00000032 01 10 0000 00000002 |"
        " 05 01 000005dc 0000000000000003 0102030405060708 fffffffffffffffe 0006 000a"
        " 435553542a31 2f646174612f43555354",
    ),
    (
        Unlock(request_id=3, handle=0x0000000100000007),
        "00000008 01 11 0000 00000003 | 0000000100000007",
    ),
    (
        UnlockAll(request_id=4, thread_id=ALL_THREADS),
        "00000008 01 12 0000 00000004 | ffffffffffffffff",
    ),
    (
        Status(request_id=5, thread_id=3, inode=42, device=7, key=b"K1"),
        # length 28 = 8 + 8 + 8 + key_len 2 + 2
        "0000001c 01 13 0000 00000005 |"
        " 0000000000000003 000000000000002a 0000000000000007 0002 4b31",
    ),
    (
        InfoPut(request_id=6, payload=b'{"a":1}'),
        # the payload length is 32 bits
        "0000000b 01 14 0000 00000006 | 00000007 7b2261223a317d",
    ),
    (
        InfoGet(request_id=7, flags=1),
        "00000002 01 15 0000 00000007 | 0001",
    ),
    (
        Echo(request_id=8, data=b"ping"),
        "00000006 01 16 0000 00000008 | 0004 70696e67",
    ),
    (
        Reclaim(request_id=9, handle=0x0000000200000003, mode=5, thread_id=3, inode=0x0102030405060708, device=-2,
                key=b"CUST*1"),
        # length 41 = 8 + 1 + 8 + 8 + 8 + key_len 2 + 6
        "00000029 01 17 0000 00000009 | 0000000200000003 05 0000000000000003 0102030405060708 fffffffffffffffe"
        " 0006 435553542a31",
    ),
    (
        Settings(request_id=10, flags=0, ack_timeout_ms=2000),
        # length 6 = flags 2 + ack_timeout_ms 4
        "00000006 01 18 0000 0000000a | 0000 000007d0",
    ),
    (
        Convert(request_id=18, handle=0x0000000200000003, mode=3, flags=8, value_flags=1, timeout_ms=0, block=b"v1"),
        # length 18 = handle 8 + mode 1 + flags 1 + value_flags 1 + timeout 4 + block_len 1 + 2; a conversion
        # down to PR that writes the value block "v1" and reads it back (VALUE_BLOCK), without waiting
        "00000012 01 19 0000 00000012 | 0000000200000003 03 08 01 00000000 02 7631",
    ),
    (
        Release(request_id=19, handle=0x0000000200000003, value_flags=1, block=b"\x00\x01\xff"),
        # length 13 = handle 8 + value_flags 1 + block_len 1 + 3
        "0000000d 01 1a 0000 00000013 | 0000000200000003 01 03 0001ff",
    ),
    (
        Cancel(request_id=20, target=2),
        "00000004 01 1b 0000 00000014 | 00000002",
    ),
    (
        Granted(request_id=2, handle=0x0000000200000003, mode=5, value=0xDEADBEEF),
        "0000000d 01 20 0000 00000002 | 0000000200000003 05 deadbeef",
    ),
    (
        Refused(request_id=2, reason=1, holder_mode=5, holder_pid=100, holder_port=7001, holder_client_pid=200,
                holder_thread=9, holder_ip="10.0.0.9"),
        # length 31 = reason 1 + mode 1 + pid 4 + port 4 + client pid 4 + thread 8 + ip_len 1 + 8
        "0000001f 01 21 0000 00000002 |"
        " 01 05 00000064 00001b59 000000c8 0000000000000009 08 31302e302e302e39",
    ),
    (
        Waiting(request_id=2, waited_ms=2500, holder_mode=3, holder_pid=100, holder_port=7001,
                holder_client_pid=200, holder_thread=9, holder_ip="::1"),
        # length 29 = waited 4 + mode 1 + 4 + 4 + 4 + 8 + ip_len 1 + 3
        "0000001d 01 22 0000 00000002 |"
        " 000009c4 03 00000064 00001b59 000000c8 0000000000000009 03 3a3a31",
    ),
    (
        StatusReply(request_id=5, state=2, holder_mode=5, holder_pid=100, holder_port=7001, holder_client_pid=200,
                    holder_thread=9, holder_ip="10.0.0.9"),
        "0000001f 01 23 0000 00000005 |"
        " 02 05 00000064 00001b59 000000c8 0000000000000009 08 31302e302e302e39",
    ),
    (
        InfoSnapshot(request_id=7, payload=b"{}"),
        "00000006 01 24 0000 00000007 | 00000002 7b7d",
    ),
    (
        EchoReply(request_id=8, data=b"ping"),
        "00000006 01 25 0000 00000008 | 0004 70696e67",
    ),
    (
        Unlocked(request_id=4, count=3),
        "00000004 01 26 0000 00000004 | 00000003",
    ),
    (
        Acquired(request_id=2, handle=0x0000000200000003, mode=5, value=0xDEADBEEF, token=0x0000000100000002,
                 block_status=2, block=b"last"),
        # length 27 = handle 8 + mode 1 + value 4 + token 8 + block_status 1 + block_len 1 + 4; NOT_VALID (2)
        "0000001b 01 27 0000 00000002 | 0000000200000003 05 deadbeef 0000000100000002 02 04 6c617374",
    ),
    (
        Blocking(request_id=2, handle=0x0000000200000003, mode=3),
        # length 9 = handle 8 + mode 1: the lock taken by request 2 blocks a request for PR
        "00000009 01 28 0000 00000002 | 0000000200000003 03",
    ),
    (
        Error(request_id=9, code=6, reason="not held: \u00e9"),
        # the reason is 12 bytes of UTF-8: "é" is c3 a9
        "00000010 01 2f 0000 00000009 | 0006 000c 6e6f742068656c643a20c3a9",
    ),
]

REQUEST_CLASSES = {Lock, Unlock, UnlockAll, Status, InfoPut, InfoGet, Echo, Reclaim, Settings, Convert, Release,
                   Cancel}
REPLY_CLASSES = {Granted, Refused, Waiting, StatusReply, InfoSnapshot, EchoReply, Unlocked, Error, Acquired, Blocking}


def golden_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace("|", " "))


def fields_of(event: Any) -> dict[str, Any]:
    """The body fields of an event: everything but the request id, which lives in the header."""
    values: dict[str, Any] = event._asdict()
    del values["request_id"]
    return values


def receiver_for(cls: type[Any]) -> Connection:
    """A connection in the state where a message of ``cls`` may arrive."""
    hello = Hello(0, *PROTOCOL_VERSIONS, 0, 1, 2, 3, "h", "p")
    welcome = Welcome(0, PROTOCOL_VERSIONS[1], 1, 0, 4, 65536, 10000, "peer", "server")
    if cls is Hello:
        return Connection(Role.SERVER)
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    server.receive_data(client.send(hello))
    assert server.next_event() == hello
    if cls is Welcome:
        return client
    client.receive_data(server.send(welcome))
    assert client.next_event() == welcome
    return server if cls in REQUEST_CLASSES else client


def golden_id(item: tuple[Any, str]) -> str:
    return type(item[0]).__name__


def test_golden_covers_every_message() -> None:
    assert len(MESSAGES) == 24
    assert [type(event) for event, _ in GOLDEN] == [cls for _, _, cls in MESSAGES]
    assert REQUEST_CLASSES | REPLY_CLASSES | {Hello, Welcome} == set(SPECS)


@pytest.mark.parametrize("item", GOLDEN, ids=golden_id)
def test_encode_gives_the_golden_frame(item: tuple[Any, str]) -> None:
    event, text = item
    assert dls_proto.encode(event).hex() == golden_bytes(text).hex()


@pytest.mark.parametrize("item", GOLDEN, ids=golden_id)
def test_golden_header(item: tuple[Any, str]) -> None:
    event, text = item
    golden = golden_bytes(text)
    kind, _spec = SPECS[type(event)]
    assert struct.unpack(">IBBHI", golden[:HEADER_SIZE]) == (len(golden) - HEADER_SIZE, 1, int(kind), 0,
                                                               event.request_id)
    header = HEADER.build({"length": len(golden) - HEADER_SIZE, "version": 1, "kind": int(kind), "reserved": 0,
                           "request_id": event.request_id})
    assert header == golden[:HEADER_SIZE]


@pytest.mark.parametrize("item", GOLDEN, ids=golden_id)
def test_construct_definition_gives_the_golden_body(item: tuple[Any, str]) -> None:
    event, text = item
    golden = golden_bytes(text)
    _kind, spec = SPECS[type(event)]
    assert spec.build(fields_of(event)).hex() == golden[HEADER_SIZE:].hex()
    parsed = spec.parse(golden[HEADER_SIZE:])
    for name, value in fields_of(event).items():
        assert parsed[name] == value, name


@pytest.mark.parametrize("item", GOLDEN, ids=golden_id)
def test_connection_decodes_the_golden_frame(item: tuple[Any, str]) -> None:
    event, text = item
    conn = receiver_for(type(event))
    conn.receive_data(golden_bytes(text))
    decoded = conn.next_event()
    assert decoded == event
    assert type(decoded) is type(event)
    assert conn.next_event() is dls_proto.NEED_DATA
    assert conn.buffered == 0


@pytest.mark.parametrize("item", GOLDEN, ids=golden_id)
def test_codec_decodes_the_golden_body(item: tuple[Any, str]) -> None:
    event, text = item
    golden = golden_bytes(text)
    kind, _spec = SPECS[type(event)]
    assert DECODERS[int(kind)](event.request_id, golden, HEADER_SIZE, len(golden) - HEADER_SIZE) == event


# -- property: random field values, fast codec against the construct definition -----------------------


def _field_strategies(spec: Any, cls: type[Any]) -> dict[str, st.SearchStrategy[Any]]:
    """A strategy per event field, read off the construct definition (so a new field is covered too), within
    the message's bounds (``messages.BOUNDS``: the codec refuses the rest, checked in test_connection)."""
    bounds = {bound.field: bound for bound in BOUNDS.get(cls, ())}
    limits: dict[str, int] = {}
    strategies: dict[str, st.SearchStrategy[Any]] = {}
    for sub in spec.subcons:
        assert isinstance(sub, Renamed)
        name, inner = sub.name, sub.subcon
        if isinstance(inner, Const):
            continue
        if isinstance(inner, Rebuild):
            limits[name[: -len("_len")]] = (1 << (8 * inner.subcon.sizeof())) - 1
        elif isinstance(inner, FormatField):
            bits = 8 * inner.sizeof()
            if inner.fmtstr[1].islower():
                strategies[name] = st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
            else:
                strategies[name] = st.integers(0, (1 << bits) - 1)
        elif isinstance(inner, StringEncoded):
            limit = limits[name]
            strategies[name] = st.text(st.characters(codec="utf-8"), max_size=min(limit, 300)).map(
                lambda s, limit=limit: s.encode("utf-8")[:limit].decode("utf-8", "ignore")
            )
        else:  # a bytes field whose length is in the fixed part
            strategies[name] = st.binary(max_size=min(limits[name], 600))
        if name in bounds:
            most = bounds[name].most
            if bounds[name].check == "length":
                strategies[name] = st.binary(max_size=most)
            elif bounds[name].check == "bits":
                strategies[name] = st.integers(0, most).map(lambda v, most=most: v & most)
            else:  # "mode"
                strategies[name] = st.integers(0, most)
    return strategies


EVENTS = {
    cls: st.builds(cls, request_id=st.integers(0, 0xFFFFFFFF), **_field_strategies(spec, cls))
    for _kind, spec, cls in MESSAGES
}


def test_the_codec_layouts_are_the_construct_definitions() -> None:
    """The codec generates from LAYOUTS, written down so that a client imports no construct: they must say
    what the definitions say, field by field, for every message and no other."""
    assert LAYOUTS == {kind: dls_proto.spec.layout(spec) for kind, spec, _ in MESSAGES}


def test_the_package_imports_no_construct() -> None:
    """Encoding and decoding (the lock path) need no construct; the definitions come with ``spec`` on first use."""
    code = ("import sys, dls_proto\n"
            "dls_proto.Connection(dls_proto.Role.CLIENT)\n"
            "assert 'construct' not in sys.modules and 'dls_proto.spec' not in sys.modules\n"
            "assert dls_proto.MESSAGES is dls_proto.spec.MESSAGES and dls_proto.HEADER.sizeof() == 12\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_strategies_cover_every_field() -> None:
    for _kind, spec, cls in MESSAGES:
        assert ["request_id", *_field_strategies(spec, cls)] == list(cls._fields)


@pytest.mark.parametrize("cls", [cls for _, _, cls in MESSAGES], ids=lambda cls: cls.__name__)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fast_codec_matches_construct(cls: type[Any], data: st.DataObject) -> None:
    event = data.draw(EVENTS[cls])
    kind, spec = SPECS[cls]
    frame = dls_proto.encode(event)
    body = spec.build(fields_of(event))
    assert frame[HEADER_SIZE:] == body
    assert frame[:HEADER_SIZE] == HEADER.build(
        {"length": len(body), "version": 1, "kind": int(kind), "reserved": 0, "request_id": event.request_id}
    )
    # decode(encode(x)) == x, by the codec and by the specification
    assert DECODERS[int(kind)](event.request_id, frame, HEADER_SIZE, len(body)) == event
    parsed = spec.parse(body)
    assert {name: parsed[name] for name in fields_of(event)} == fields_of(event)


@pytest.mark.parametrize("cls", [cls for _, _, cls in MESSAGES if cls is not Welcome], ids=lambda c: c.__name__)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_connection_round_trip(cls: type[Any], data: st.DataObject) -> None:
    event = data.draw(EVENTS[cls])
    conn = receiver_for(cls)
    conn.max_frame = 1 << 20
    conn.receive_data(dls_proto.encode(event))
    assert conn.next_event() == event


def test_each_kind_is_generated_on_first_use() -> None:
    """The codecs are generated when a kind is first looked up, its encoder and its decoder each when first
    asked for (a client encodes a few kinds and decodes a few others: dls-lock's start-up does not pay for
    the rest), yet every kind is known, and no other is, from the start."""
    code = ("from dls_proto import Kind, Unlock, codec\n"
            "assert not dict(codec.ENCODERS) and not dict(codec.DECODERS)\n"
            "assert all(int(k) in codec.DECODERS for k in Kind) and 0x7f not in codec.DECODERS\n"
            "assert Unlock in codec.ENCODERS and int not in codec.ENCODERS\n"
            "frame = codec.encode(Unlock(7, 42))\n"
            "assert set(dict(codec.ENCODERS)) == {Unlock} and not dict(codec.DECODERS)\n"
            "assert codec.DECODERS[int(Kind.UNLOCK)](7, frame, 12, len(frame) - 12) == Unlock(7, 42)\n"
            "assert set(dict(codec.DECODERS)) == {int(Kind.UNLOCK)} and set(dict(codec.ENCODERS)) == {Unlock}\n"
            "try:\n"
            "    codec.DECODERS[0x7f]\n"
            "except KeyError:\n"
            "    pass\n"
            "else:\n"
            "    raise AssertionError('an unknown kind decoded')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
